"""npe2 reader: whole-slide images (and plain RGB images) as lazy multiscale napari layers.

``get_reader(path)`` claims files with a slide or image extension (:data:`SLIDE_SUFFIXES`) and
folders of same-size RGB image patches; it returns ``None`` for anything else and for single-channel
TIFF/PNG files (label masks, fluorescence), which it leaves to other readers.

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

import dask.array as da
import numpy as np
from PIL import Image

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.slides.slide import SLIDE_SUFFIXES, Slide, open_slide

#: Suffixes of patch files taken from a folder.
PATCH_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

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
    return [_read_folder(Path(p)) if Path(p).is_dir() else slide_layer_data(open_slide(p)) for p in paths]


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
    }


# -- claiming files ---------------------------------------------------------------------------------
def _handles(p: Path) -> bool:
    if p.is_dir():
        return len(_patch_files(p)) > 0
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


def _patch_files(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name, dot-files skipped."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(PATCH_SUFFIXES)]


# -- patch folders ----------------------------------------------------------------------------------
def _read_folder(folder: Path) -> LayerData:
    """A folder of same-size RGB patches as one lazy ``(N, H, W, 3)`` stack, a patch per slice.

    Each patch is decoded only when napari shows its slice. Patches of different sizes cannot be
    stacked: that is a :class:`SlideError` naming the first odd file.
    """
    files = _patch_files(folder)
    if not files:
        raise SlideError(f"{folder}: the folder holds no PNG, JPEG or TIFF patches")
    with open_slide(files[0]) as first:
        width, height = first.dimensions
        mpp = first.mpp
    for f in files[1:]:  # header-only size check: a folder may hold thousands of patches
        try:
            with Image.open(f) as im:
                size = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise SlideError(f"{f}: cannot read the image header: {e}") from e
        if size != (width, height):
            raise SlideError(f"{f}: patch is {size[0]}x{size[1]} px, but {files[0].name} is {width}x{height}; a patch folder needs same-size images")
    slices = [da.from_delayed(_delayed_read(f), shape=(height, width, 3), dtype=np.uint8) for f in files]
    kwargs: dict[str, Any] = {
        "name": folder.name,
        "rgb": True,
        "contrast_limits": (0, 255),
        "scale": (1.0, mpp, mpp) if mpp else (1.0, 1.0, 1.0),
        "metadata": {"path": str(folder), "files": [f.name for f in files], "mpp": mpp},
    }
    return (da.stack(slices), kwargs, "image")


def _delayed_read(path: Path) -> Any:
    import dask

    def read() -> np.ndarray:
        with open_slide(path) as s:
            w, h = s.dimensions
            return s.read_region((0, 0), 0, (w, h))

    return dask.delayed(read, pure=True)()
