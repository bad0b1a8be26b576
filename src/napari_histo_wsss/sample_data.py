"""npe2 sample data: the real Aperio H&E slide shipped with the package.

``CMU-1-Small-Region.svs`` (2220 x 2967 px, 20x, 0.499 um/px; CC0, see ``data/README.md``) opens
through the same reader as any slide, so the sample is a lazy multiscale layer in micrometres.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.reader import LayerData, slide_layer_data

#: File name of the bundled slide inside the package's ``data/`` folder.
SAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Path of the bundled sample slide (package data, installed as a plain file)."""
    ref = resources.files("napari_histo_wsss") / "data" / SAMPLE_SLIDE
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled sample slide is missing from the installation")
    return path


def cmu_small_region() -> list[LayerData]:
    """The CMU-1-Small-Region Aperio slide as a lazy multiscale RGB layer."""
    return [slide_layer_data(open_slide(sample_slide_path()))]
