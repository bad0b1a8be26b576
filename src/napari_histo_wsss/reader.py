"""npe2 reader: whole-slide images (and plain RGB images) as lazy multiscale napari layers.

``get_reader(path)`` claims files with a slide or image extension (:data:`SLIDE_SUFFIXES`) and
folders of RGB image patches; it returns ``None`` for anything else and for single-channel
TIFF/PNG files (label masks, fluorescence), which it leaves to other readers. A patch folder opens
as one contact sheet of its images (``core/slides/mosaic.py``), so that it can be labelled and
reviewed like a slide.

A slide becomes one RGB image layer whose data is the list of pyramid levels from
:meth:`~napari_histo_wsss.core.slides.slide.Slide.pyramid` (dask arrays that read tiles on demand;
nothing is decoded until napari draws), with ``scale`` in micrometres when the slide states its
microns per pixel, and metadata (path, format, levels, level sizes and downsamples, mpp, objective
power) that the plugin's widgets read back. The slide file stays open while the layer lives.
Unreadable files raise :class:`~napari_histo_wsss.core.errors.SlideError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.slides.mosaic import patch_files
from napari_histo_wsss.core.slides.slide import SLIDE_SUFFIXES, Slide, open_slide

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader function for ``path`` (a file, a patch folder or a list of files), or ``None``
    when this plugin does not handle it."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_handles(Path(p)) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    """One lazy multiscale RGB layer per slide file or patch folder in ``path``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [slide_layer_data(open_slide(p)) for p in paths]


def slide_layer_data(slide: Slide) -> LayerData:
    """The napari layer data tuple of an open slide (the layer keeps reading through ``slide``)."""
    levels = slide.pyramid()
    scale = (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0)
    kwargs: dict[str, Any] = {
        "name": slide.path.name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "contrast_limits": (0, 255),
        "scale": scale,
        "metadata": slide_metadata(slide),
    }
    if slide.mpp:
        kwargs["units"] = ("micrometer", "micrometer")
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def slide_metadata(slide: Slide) -> dict[str, Any]:
    """JSON-friendly facts about a slide, as stored in the napari layer's ``metadata``."""
    return {
        "path": str(slide.path),
        "format": slide.format,
        "backend": slide.backend,
        "dimensions": list(slide.dimensions),
        "levels": len(slide.level_dimensions),
        "native_levels": slide.native_levels,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "mpp": slide.mpp,
        "objective_power": slide.objective_power,
        **({"files": [r.name for r in slide.regions]} if slide.regions else {}),
    }


# -- claiming files ---------------------------------------------------------------------------------
def _handles(p: Path) -> bool:
    if p.is_dir():
        return len(patch_files(p)) > 0
    name = p.name.lower()
    if not p.is_file() or name.startswith(".") or not name.endswith(SLIDE_SUFFIXES):
        return False
    if name.endswith((".tif", ".tiff", ".png")):
        return not _is_single_channel(p)
    return True


def _is_single_channel(p: Path) -> bool:
    """True for a readable grey/palette image (a label mask, not an H&E slide). Unreadable files
    count as ours so that the user gets this plugin's error naming the problem."""
    try:
        with open_slide(p) as slide:
            return slide.samples_per_pixel == 1
    except SlideError:
        return False


