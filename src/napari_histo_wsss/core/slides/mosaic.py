"""A folder of patches as one slide: a contact sheet of its images.

Patch folders (WSSS4LUAD, LUAD-HistoSeg, BCSS-WSSS, GlaS, a lab's own exported tiles) hold many
small RGB images, often of different sizes. :func:`open_patch_folder` lays them out, in file-name
order, on one white canvas and serves that canvas as a :class:`~.slide.Slide`. Everything a slide
gets then works on a patch folder unchanged: the napari layer (all patches at once, zoomable),
tissue detection, the patch grid, labels in the project, the feature cache, live CAMs,
suggestions, stage-one training on the project's labels, CAM layers and masks.

Layout (:func:`folder_layout`): shelf packing, row by row, in sorted file-name order; rows are
about as wide as the sheet is tall; images sit on :data:`ALIGN`-pixel positions and are kept
:data:`GUTTER` pixels apart, so a patch of up to ``2 * GUTTER`` pixels laid from one image's corner
never reaches into the next image, and the feature cache's tile margins see white glass between
images. The grid (``core/slides/grid.py``) tiles each image from its own top-left corner
(:attr:`~.slide.Slide.regions`): a folder of 224-px patches with 224-px grid patches gives one grid
patch per image.

The layout depends on the folder's file names and image sizes only, and its fingerprint
(``properties["patch-folder.layout"]``) is stored with the slide in a project: when images are
added, removed, renamed or resized later, labels and masks would point at other images, so the
project refuses to open the changed folder with a message instead (``core/data/project.py``).

Images are decoded on first read and kept in a bounded cache (:data:`CACHE_BYTES`); nothing is
written to the folder.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from napari_histo_wsss.core.errors import SlideError

__all__ = ["PATCH_SUFFIXES", "GUTTER", "ALIGN", "LAYOUT_KEY", "FolderImage", "patch_files", "folder_layout",
           "open_patch_folder", "boxes_at", "boxes_raster"]

#: Suffixes of the patch files taken from a folder (not recursive, dot-files skipped).
PATCH_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: White level-0 pixels between neighbouring images on the sheet.
GUTTER = 256
#: Image corners sit on multiples of this many pixels (the feature cache's cell size).
ALIGN = 32
#: Slide property holding the layout's fingerprint.
LAYOUT_KEY = "patch-folder.layout"
#: Decoded images kept in memory (bytes); the least recently read are dropped first.
CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class FolderImage:
    """One image of a patch folder and its box on the sheet (level-0 pixels)."""

    name: str
    x: int
    y: int
    width: int
    height: int


def patch_files(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name, dot-files skipped."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(PATCH_SUFFIXES)]


def boxes_at(regions: list[FolderImage], shape: tuple[int, int], downsample: float) -> list[tuple[int, int, int, int]]:
    """The images' boxes ``(y0, y1, x0, x1)`` on a raster of ``shape`` at ``downsample`` level-0
    pixels per pixel (at least one pixel each, clipped to the raster)."""
    h, w = shape
    ds = float(downsample)
    return [(min(h, int(r.y // ds)), min(h, max(int(r.y // ds) + 1, math.ceil((r.y + r.height) / ds))),
             min(w, int(r.x // ds)), min(w, max(int(r.x // ds) + 1, math.ceil((r.x + r.width) / ds)))) for r in regions]


def boxes_raster(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(h, w) int32: the index of the box under each pixel, -1 outside every box."""
    raster = np.full(shape, -1, dtype=np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        raster[y0:y1, x0:x1] = i
    return raster


def _up(v: float) -> int:
    return int(math.ceil(v / ALIGN) * ALIGN)


def folder_layout(folder: Path) -> tuple[list[FolderImage], tuple[int, int], float | None, str]:
    """``(images, (width, height), mpp, fingerprint)`` of a patch folder's sheet. Only the image
    headers are read. A folder without images, or an image whose header cannot be read, raises
    one :class:`SlideError` naming the folder or the file."""
    from napari_histo_wsss.core.slides.slide import _plausible_mpp

    files = patch_files(folder)
    if not files:
        raise SlideError(f"{folder}: the folder holds no PNG, JPEG or TIFF patches")
    sizes, mpps = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
                dpi = im.info.get("dpi")
                mpps.add(_plausible_mpp(25400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise SlideError(f"{f}: cannot read the image header: {e}") from e
        if min(sizes[-1]) < 1:
            raise SlideError(f"{f}: image is empty ({sizes[-1][0]}x{sizes[-1][1]})")
    area = sum((_up(w) + GUTTER) * (_up(h) + GUTTER) for w, h in sizes)
    row_width = max(max(_up(w) for w, _ in sizes), _up(math.sqrt(area)))
    images, x, y, row_h, width = [], 0, 0, 0, 0
    for f, (w, h) in zip(files, sizes):
        if x > 0 and x + w > row_width:  # next row
            x, y, row_h = 0, y + _up(row_h) + GUTTER, 0
        images.append(FolderImage(f.name, x, y, int(w), int(h)))
        width = max(width, x + w)
        row_h = max(row_h, h)
        x += _up(w) + GUTTER
    height = y + row_h
    text = "\n".join(f"{im.name}\t{im.width}\t{im.height}" for im in images)
    fingerprint = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    mpp = next(iter(mpps)) if len(mpps) == 1 else None  # images disagreeing on their pixel size: unknown
    return images, (int(width), int(height)), mpp, fingerprint


def _level_class():
    from napari_histo_wsss.core.slides.slide import _Level, _pil_to_rgb

    class _SheetLevel(_Level):
        """Level 0 of the sheet: white, with each image pasted in its box (decoded on demand)."""

        def __init__(self, folder: Path, images: list[FolderImage], **kw):
            super().__init__(**kw)
            self._folder = folder
            self._images = images
            self._x = np.array([im.x for im in images], dtype=np.int64)
            self._y = np.array([im.y for im in images], dtype=np.int64)
            self._w = np.array([im.width for im in images], dtype=np.int64)
            self._h = np.array([im.height for im in images], dtype=np.int64)
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._bytes = 0
            self._lock = threading.Lock()

        def _pixels(self, i: int) -> np.ndarray:
            with self._lock:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    return self._cache[i]
            im = self._images[i]
            path = self._folder / im.name
            try:
                with Image.open(path) as pil:
                    pil.load()
                    rgb = _pil_to_rgb(pil)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise SlideError(f"{path}: cannot decode image: {e}") from e
            if rgb.shape[:2] != (im.height, im.width):
                raise SlideError(f"{path}: image is now {rgb.shape[1]}x{rgb.shape[0]} px, it was {im.width}x{im.height} "
                                 "when the folder was opened; open the folder again")
            with self._lock:
                if i not in self._cache:
                    self._cache[i] = rgb
                    self._bytes += rgb.nbytes
                    while self._bytes > CACHE_BYTES and len(self._cache) > 1:
                        _, old = self._cache.popitem(last=False)
                        self._bytes -= old.nbytes
            return rgb

        def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
            out = np.full((h, w, 3), 255, dtype=np.uint8)
            hit = np.flatnonzero((self._x < x + w) & (self._x + self._w > x) & (self._y < y + h) & (self._y + self._h > y))
            for i in hit.tolist():
                ix, iy = int(self._x[i]), int(self._y[i])
                xa, ya = max(x, ix), max(y, iy)
                xb, yb = min(x + w, ix + int(self._w[i])), min(y + h, iy + int(self._h[i]))
                out[ya - y:yb - y, xa - x:xb - x] = self._pixels(i)[ya - iy:yb - iy, xa - ix:xb - ix]
            return out

    return _SheetLevel


def open_patch_folder(folder: Path):
    """The patch folder ``folder`` as a :class:`~.slide.Slide` (format ``"patch folder"``,
    backend ``"patch-folder"``) whose ``regions`` are its images' boxes."""
    from napari_histo_wsss.core.slides.slide import CHUNK_SIDE, Slide

    folder = Path(folder)
    images, (width, height), mpp, fingerprint = folder_layout(folder)
    level = _level_class()(folder, images, width=width, height=height, downsample=1.0, tile=(CHUNK_SIDE, CHUNK_SIDE))
    props = {LAYOUT_KEY: fingerprint, "patch-folder.images": str(len(images)), "patch-folder.gutter": str(GUTTER)}
    slide = Slide(folder, "patch folder", "patch-folder", [level], mpp, None, props, 3)
    slide.regions = images
    return slide
