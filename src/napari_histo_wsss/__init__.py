"""napari-histo-wsss: weakly supervised semantic segmentation of H&E whole-slide images in napari.

The scientific and I/O code lives in :mod:`napari_histo_wsss.core` (no napari/Qt imports); the
``histo-wsss`` command line (:mod:`napari_histo_wsss.cli`) and the dock widgets
(:mod:`napari_histo_wsss.widgets`) are two thin faces over it.
"""

__version__ = "0.1.0"
