import sys

from napari_histo_wsss.cli import main

sys.exit(main())
