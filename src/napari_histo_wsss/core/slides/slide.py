"""Open whole-slide images and plain images lazily, as a pyramid of RGB levels.

One :class:`Slide` API over three back ends, chosen per file by :func:`open_slide`:

* **OpenSlide** for the vendor formats (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Ventana
  BIF, Philips, Sakura, Trestle, Zeiss, DICOM). OpenSlide returns RGBA; transparent (outside-scan)
  pixels are composited onto white and the alpha channel is dropped.
* **tifffile + zarr** (``aszarr``) for OME-TIFF and generic (pyramidal or flat) TIFF: reads happen
  tile by tile in level pixel coordinates, with the pyramid levels tifffile finds (top-level IFDs
  or SubIFDs). A generic tiled TIFF whose reduced levels tifffile does not see as one series but
  OpenSlide does (no NewSubfileType flags) goes to OpenSlide instead.
* **Pillow** for plain PNG/JPEG/BMP images (decoded once, on first read, then cached).
* A **folder of patches** becomes one contact sheet of its images (``core/slides/mosaic.py``).

Every level is exposed as a lazy ``dask`` array ``(H, W, 3) uint8`` whose chunks call back into
the file, so opening costs the same for a 2k and a 100k pixel slide. Slides whose coarsest level
is still large (e.g. the single-level ``CMU-1-Small-Region.svs``) get coarser levels *built*:
2x2 box means of the level above, computed per chunk on demand, until the smaller side is at most
:data:`BUILT_LEVEL_MIN_SIDE` pixels, so that napari can display them smoothly.

Conventions: locations are level-0 pixels ``(x, y)``; sizes are ``(w, h)``; arrays are
``(rows, cols, 3)``. Reads outside the slide are white (255).

A TIFF's declared size is checked against its tile (or strip) tables before anything is read
(:func:`_check_tile_table`): a few-kilobyte file can declare a 200000 x 200000 image, and the
tiles it does not hold would otherwise read as blank, one 120 GB decode at a time. Reads that must
decode much of a large level (a thumbnail or tissue mask of a slide without small stored levels)
report their progress and can be stopped through :func:`read_progress`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import threading
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

import dask.array as da
import numpy as np
from PIL import Image

from napari_histo_wsss.core.errors import SlideError

#: Built (lazily downsampled) levels are added until the smaller side is at most this many pixels.
BUILT_LEVEL_MIN_SIDE = 512
#: Built levels read their source in blocks of at most this many source pixels a side, in parallel
#: (bounds memory, uses all cores).
BUILT_READ_SIDE = 1024
#: Target chunk side of the dask arrays (rounded to a multiple of the file's tile size).
CHUNK_SIDE = 512
#: Microns per pixel outside this range are treated as unknown (e.g. 72 dpi screen images).
PLAUSIBLE_MPP = (0.05, 20.0)
#: Relative tolerance when matching a requested downsample to a level's downsample.
_DOWNSAMPLE_TOL = 1e-3
#: A generic/OME TIFF level with more than this share of its tiles (or strips) without data is
#: refused as an empty placeholder; fewer is a :class:`SlideWarning` (those tiles read white, like
#: glass: some writers leave the tiles of unscanned glass out on purpose).
MAX_MISSING_TILE_SHARE = 0.9

#: tifffile's ``TiffFile.is_<kind>`` flags of vendor TIFF formats that OpenSlide reads.
_OPENSLIDE_TIFF_KINDS = {"svs": "Aperio SVS", "ndpi": "Hamamatsu NDPI", "scn": "Leica SCN", "bif": "Ventana BIF", "philips": "Philips TIFF"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Pillow formats treated as plain images (TIFF goes through tifffile instead).
_PIL_FORMATS = {"PNG", "JPEG", "BMP", "MPO", "WEBP", "GIF"}
_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


class SlideWarning(UserWarning):
    """A slide opens, but part of it does not read as stored (e.g. tiles without data)."""


class _TileTableError(SlideError):
    """A TIFF's declared size and its tile tables disagree: refused outright (no OpenSlide retry,
    whose generic-TIFF reader would read the same tables)."""


#: ``callback(blocks_done, blocks_total)`` of the large built-level reads made in this context.
_READ_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "histo_wsss_read_progress", default=None)


@contextlib.contextmanager
def read_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Report the progress of large reads of built levels made inside the ``with`` block.

    A built level of a slide whose coarsest stored level is large (a flat 100k-pixel TIFF) is
    computed from the whole stored level, in blocks: a thumbnail or tissue mask of it can take
    minutes. ``callback(blocks_done, blocks_total)`` runs in the reading thread after each block;
    it may raise (``KeyboardInterrupt``, :class:`~.errors.Cancelled`) to stop the read: blocks not
    started are dropped and the exception propagates.
    """
    token = _READ_PROGRESS.set(callback)
    try:
        yield
    finally:
        _READ_PROGRESS.reset(token)


# -- levels: one reader per pyramid level, in level pixel coordinates -----------------------------
class _Level:
    """One pyramid level: its size, its downsample relative to level 0 and a region reader.

    Subclasses implement :meth:`_read_inside` for a box fully inside the level; :meth:`read`
    clips any box to the level and fills the rest with white.
    """

    def __init__(self, width: int, height: int, downsample: float, tile: tuple[int, int], built: bool = False):
        self.width = int(width)
        self.height = int(height)
        self.downsample = float(downsample)
        self.tile = (max(1, int(tile[0])), max(1, int(tile[1])))
        self.built = built

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the box at level pixel ``(x, y)``; outside the level is white."""
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + w, self.width), min(y + h, self.height)
        if xb > xa and yb > ya:
            out[ya - y : yb - y, xa - x : xb - x] = self._read_inside(xa, ya, xb - xa, yb - ya)
        return out

    def read0(self, x0: float, y0: float, w: int, h: int) -> np.ndarray:
        """Like :meth:`read` with the top-left given in level-0 pixels."""
        return self.read(int(round(x0 / self.downsample)), int(round(y0 / self.downsample)), w, h)


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA onto white and drop alpha."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class _OpenSlideLevel(_Level):
    """A level read through OpenSlide (thread-safe, so no lock), which returns RGBA."""

    def __init__(self, osr: Any, index: int, path: Path, **kw: Any):
        super().__init__(**kw)
        self._osr = osr
        self._index = index
        self._path = path

    def _read_os(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        try:
            rgba = np.asarray(self._osr.read_region((x0, y0), self._index, (w, h)))
        except Exception as e:  # OpenSlideError, a closed handle (ctypes.ArgumentError), bad tiles: all "unreadable"
            raise SlideError(f"{self._path}: cannot read level {self._index} at level-0 ({x0}, {y0}) size {w}x{h}: {e}") from e
        return _rgba_to_rgb(rgba)

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._read_os(int(round(x * self.downsample)), int(round(y * self.downsample)), w, h)

    def read0(self, x0: float, y0: float, w: int, h: int) -> np.ndarray:
        # OpenSlide takes level-0 locations itself and renders outside-slide pixels transparent.
        return self._read_os(int(round(x0)), int(round(y0)), w, h)


class _ZarrLevel(_Level):
    """A level of a TIFF read through tifffile's zarr store; ``index`` maps (y, x) slices to the
    array's axes and ``to_rgb`` turns the sliced block into (h, w, 3) uint8."""

    def __init__(self, array: Any, index: Callable[[slice, slice], tuple], to_rgb: Callable[[np.ndarray], np.ndarray], path: Path, **kw: Any):
        super().__init__(**kw)
        self._array = array
        self._index = index
        self._to_rgb = to_rgb
        self._path = path

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            block = np.asarray(self._array[self._index(slice(y, y + h), slice(x, x + w))])
        except Exception as e:  # codec, truncated file or closed handle: all mean "unreadable"
            raise SlideError(f"{self._path}: cannot read TIFF region ({x}, {y}) size {w}x{h} of a {self.width}x{self.height} level: {type(e).__name__}: {e}") from e
        return self._to_rgb(block)


class _PILLevel(_Level):
    """A plain image: decoded once on first read (thread-safe), then served from memory."""

    def __init__(self, path: Path, **kw: Any):
        super().__init__(**kw)
        self._path = path
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                try:
                    with Image.open(self._path) as im:
                        im.load()
                        self._pixels = _pil_to_rgb(im)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    raise SlideError(f"{self._path}: cannot decode image: {e}") from e
            return self._pixels

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._load()[y : y + h, x : x + w]


class _BuiltLevel(_Level):
    """A coarser level computed on demand as ``factor x factor`` box means of a source level.

    Large reads are done in blocks of at most :data:`BUILT_READ_SIDE` source pixels a side, read
    in parallel threads: a thumbnail of a single-level 100k-pixel slide reads the whole slide but
    never holds it in memory.
    """

    def __init__(self, source: _Level, factor: int):
        super().__init__(
            width=source.width // factor,
            height=source.height // factor,
            downsample=source.downsample * factor,
            tile=(max(256, 2048 // factor),) * 2,
            built=True,
        )
        self._source = source
        self._factor = factor

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        f = self._factor
        step = max(1, BUILT_READ_SIDE // f)
        out = np.empty((h, w, 3), dtype=np.uint8)

        def fill(by: int, bx: int) -> None:
            bh, bw = min(step, h - by), min(step, w - bx)
            block = self._source.read((x + bx) * f, (y + by) * f, bw * f, bh * f)
            # Pillow's reduce = rounded f x f box mean, ~10x faster than a numpy reshape-sum
            out[by : by + bh, bx : bx + bw] = np.asarray(Image.fromarray(block).reduce(f))

        blocks = [(by, bx) for by in range(0, h, step) for bx in range(0, w, step)]
        progress = _READ_PROGRESS.get()
        if len(blocks) == 1:
            fill(*blocks[0])
        elif progress is None:  # decoding (OpenSlide, tifffile codecs) and Pillow release the GIL
            list(_block_pool().map(lambda b: fill(*b), blocks))  # list() re-raises a block's error
        else:
            futures = [_block_pool().submit(fill, *b) for b in blocks]
            try:
                for done, fut in enumerate(as_completed(futures), 1):
                    fut.result()  # re-raises a block's error
                    progress(done, len(blocks))
            finally:  # an error or a stop: blocks not started yet are dropped
                for fut in futures:
                    fut.cancel()
        return out


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _block_pool() -> ThreadPoolExecutor:
    """Shared threads for the blocks of a large built-level read (workers never submit work)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="histo-slide")
        return _POOL


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> (H, W, 3) uint8 RGB; transparency composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _rgba_to_rgb(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


class _LevelArray:
    """Array-like view of a level for :func:`dask.array.from_array` (slices only)."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, level: _Level):
        self._level = level
        self.shape = (level.height, level.width, 3)

    def __getitem__(self, key: tuple) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self._level.read(x0, y0, x1 - x0, y1 - y0)
        return block[(slice(None), slice(None)) + tuple(key[2:])] if len(key) > 2 else block


# -- the Slide -----------------------------------------------------------------------------------
class Slide:
    """An open slide: metadata, lazy pyramid levels, and region reads.

    Attributes follow the project contract (``docs/architecture.md``): ``path``, ``format``,
    ``dimensions`` (w, h), ``level_dimensions``, ``level_downsamples`` (including built levels),
    ``mpp`` (microns per level-0 pixel or ``None``), ``objective_power``, ``properties``.
    Extra: ``backend`` (``"openslide"``, ``"tifffile"``, ``"pillow"``, ``"patch-folder"``), ``regions``
    (a patch folder's image boxes, else None), ``native_levels`` (levels
    stored in the file; the rest are built) and ``samples_per_pixel`` of the file (1 = grey or
    palette, 3 = RGB, 4 = RGBA), which lets the napari reader leave label images to other readers;
    ``closed`` turns True after :meth:`close`.

    Use as a context manager or call :meth:`close`. Layers handed to napari keep reading through
    the slide, so it must stay open while they live (the reader never closes it).
    """

    def __init__(
        self,
        path: Path,
        format: str,
        backend: str,
        levels: list[_Level],
        mpp: float | None,
        objective_power: float | None,
        properties: dict[str, str],
        samples_per_pixel: int,
        closer: Callable[[], None] | None = None,
    ):
        self.path = path
        self.format = format
        self.backend = backend
        self.native_levels = len(levels)
        self.mpp = mpp
        self.objective_power = objective_power
        self.properties = properties
        self.samples_per_pixel = samples_per_pixel
        self._closer = closer
        self.closed = False
        #: the images of a patch folder (``core/slides/mosaic.py``), each a box of level 0 that
        #: the patch grid tiles on its own; None for a slide
        self.regions: list | None = None
        self._levels = list(levels)
        last = self._levels[-1]
        factor = 2
        while min(self._levels[-1].width, self._levels[-1].height) > BUILT_LEVEL_MIN_SIDE:
            self._levels.append(_BuiltLevel(last, factor))
            factor *= 2
        self._arrays: dict[int, da.Array] = {}
        stat = path.stat()
        self._token = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{id(self)}".encode()).hexdigest()[:16]

    # -- metadata ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return (self._levels[0].width, self._levels[0].height)

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lv.width, lv.height) for lv in self._levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [lv.downsample for lv in self._levels]

    def is_built_level(self, level: int) -> bool:
        """True for a level computed from the one above, False for a level stored in the file."""
        return self._levels[self._check_level(level)].built

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, format={self.format!r}, {w}x{h}, levels={self.level_count}, mpp={self.mpp})"

    # -- lazy arrays ---------------------------------------------------------------------------
    def level_array(self, level: int) -> da.Array:
        """Lazy ``(H, W, 3) uint8`` dask array of a level; chunks read the file on demand."""
        level = self._check_level(level)
        if level not in self._arrays:
            lv = self._levels[level]
            chunks = (_chunk_side(lv.tile[1], lv.height), _chunk_side(lv.tile[0], lv.width), 3)
            self._arrays[level] = da.from_array(
                _LevelArray(lv), chunks=chunks, name=f"histo-slide-{self._token}-{level}",
                lock=False, asarray=False, fancy=False, meta=np.empty((0, 0, 0), dtype=np.uint8),
            )
        return self._arrays[level]

    def pyramid(self) -> list[da.Array]:
        """All levels as lazy dask arrays, largest first (what napari's multiscale wants)."""
        return [self.level_array(i) for i in range(self.level_count)]

    # -- reads ---------------------------------------------------------------------------------
    def read_region(self, location: tuple[float, float], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB: ``size`` = (w, h) pixels at ``level``, top-left ``location`` in
        level-0 pixels. Parts outside the slide are white."""
        level = self._check_level(level)
        if self.closed:
            raise SlideError(f"{self.path}: the slide is closed")
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise SlideError(f"{self.path}: region size must be non-negative, got {size}")
        return self._levels[level].read0(float(location[0]), float(location[1]), w, h)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (0 if none)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + _DOWNSAMPLE_TOL):
                best = i
        return best

    def read_scaled(self, location: tuple[float, float], size0: tuple[float, float], out_size: tuple[int, int]) -> np.ndarray:
        """The level-0 box ``(x, y, w0, h0)`` resampled to ``out_size`` (w, h): read from the
        coarsest level that is at least as fine as needed, then area-averaged (box filter) or,
        when enlarging, bilinearly interpolated. Returns (h, w, 3) uint8."""
        w0, h0 = float(size0[0]), float(size0[1])
        ow, oh = int(out_size[0]), int(out_size[1])
        if ow <= 0 or oh <= 0 or w0 <= 0 or h0 <= 0:
            raise SlideError(f"{self.path}: read_scaled needs positive sizes, got size0={size0} out_size={out_size}")
        level = self.best_level_for_downsample(min(w0 / ow, h0 / oh))
        ds = self._levels[level].downsample
        lw, lh = max(1, int(math.ceil(w0 / ds - 1e-6))), max(1, int(math.ceil(h0 / ds - 1e-6)))
        region = self.read_region(location, level, (lw, lh))
        if (lw, lh) == (ow, oh):
            return region
        resample = Image.Resampling.BOX if (lw >= ow and lh >= oh) else Image.Resampling.BILINEAR
        # box= keeps the exact (possibly fractional) extent of the level-0 box inside the read.
        box = (0.0, 0.0, min(lw, w0 / ds), min(lh, h0 / ds))
        return np.asarray(Image.fromarray(region).resize((ow, oh), resample=resample, box=box))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, with its longer side at most ``max_size`` pixels (aspect kept)."""
        if not max_size >= 1:
            raise SlideError(f"{self.path}: a thumbnail needs a positive size in pixels, got {max_size}")
        w, h = self.dimensions
        scale = max(w, h) / float(max_size)
        if scale <= 1:
            return self.read_region((0, 0), 0, (w, h))
        return self.read_scaled((0, 0), (w, h), (max(1, round(w / scale)), max(1, round(h / scale))))

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle; later reads raise :class:`SlideError`."""
        self.closed = True
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_level(self, level: int) -> int:
        if not 0 <= int(level) < len(self._levels):
            raise SlideError(f"{self.path}: level {level} does not exist (slide has {len(self._levels)} levels)")
        return int(level)


def _chunk_side(tile: int, extent: int) -> int:
    """A dask chunk side: a multiple of the file's tile close to CHUNK_SIDE, at most the extent."""
    side = tile * max(1, round(CHUNK_SIDE / tile)) if tile < CHUNK_SIDE else tile
    return max(1, min(side, extent))


# -- opening -------------------------------------------------------------------------------------
#: Lower-case file suffixes opened as slides (OpenSlide vendor formats, TIFF, plain images).
SLIDE_SUFFIXES = (
    ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
    ".tif", ".tiff", ".png", ".jpg", ".jpeg",
)


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a whole-slide image, a plain image or a folder of patches (as one contact sheet,
    ``core/slides/mosaic.py``) lazily.

    Raises :class:`SlideError` naming the file and the problem for a missing, empty, truncated,
    damaged or unsupported file. A corner of level 0 and of the coarsest stored level is decoded
    to catch truncated files early; nothing else is read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideError(f"{p}: no such file")
    if p.is_dir():
        from napari_histo_wsss.core.slides.mosaic import open_patch_folder

        return open_patch_folder(p)  # a folder of patches: one contact sheet of its images
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise SlideError(f"{p}: cannot be read: {e.strerror or e}") from e
    if not head:
        raise SlideError(f"{p}: file is empty (0 bytes)")

    vendor = _openslide_vendor(p)
    if vendor is not None and vendor != "generic-tiff":
        if head[:4] in _TIFF_MAGIC and vendor != "hamamatsu":
            _check_vendor_tiff(p)
        slide = _open_openslide(p, vendor)
    elif head[:4] in _TIFF_MAGIC:
        slide = _open_tiff(p, vendor)
    else:
        slide = _open_pil(p)
    try:
        _validate(slide)
    except SlideError:
        slide.close()
        raise
    return slide


def _validate(slide: Slide) -> None:
    """Decode the bottom-right pixel of level 0 and of the coarsest stored level (one tile each)."""
    for level in sorted({0, slide.native_levels - 1}):
        w, h = slide.level_dimensions[level]
        if w < 1 or h < 1:
            raise SlideError(f"{slide.path}: level {level} is empty ({w}x{h})")
        try:
            slide._levels[level].read(w - 1, h - 1, 1, 1)
        except SlideError as e:
            raise SlideError(f"{e} (the file looks truncated or damaged)") from e


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide-bin is a hard dependency
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def _open_openslide(path: Path, vendor: str) -> Slide:
    import openslide

    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as e:
        raise SlideError(f"{path}: OpenSlide recognises a {vendor} slide but cannot open it: {e}") from e
    props = {str(k): str(v) for k, v in osr.properties.items()}
    levels: list[_Level] = []
    for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples)):
        tile = (int(props.get(f"openslide.level[{i}].tile-width", 256)), int(props.get(f"openslide.level[{i}].tile-height", 256)))
        levels.append(_OpenSlideLevel(osr, i, path, width=w, height=h, downsample=ds, tile=tile))
    mpp = _mean_mpp(props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y))
    objective = _float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    return Slide(path, props.get("openslide.vendor", vendor), "openslide", levels, mpp, objective, props, 4, osr.close)


def _open_pil(path: Path) -> Slide:
    try:
        im = Image.open(path)
    except Image.UnidentifiedImageError as e:
        raise SlideError(f"{path}: not a recognised slide or image format (OpenSlide, TIFF, PNG, JPEG)") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SlideError(f"{path}: cannot open image: {e}") from e
    with im:
        if im.format not in _PIL_FORMATS:
            raise SlideError(f"{path}: {im.format} images are not supported (use PNG, JPEG or TIFF)")
        w, h = im.size
        dpi = im.info.get("dpi")
        mpp = _plausible_mpp(25400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None
        props = {"image.format": str(im.format), "image.mode": str(im.mode)}
        samples = len(im.getbands()) if im.mode != "P" else 1
    level = _PILLevel(path, width=w, height=h, downsample=1.0, tile=(CHUNK_SIDE, CHUNK_SIDE))
    return Slide(path, "image", "pillow", [level], mpp, None, props, samples)


def _open_tiff(path: Path, vendor: str | None) -> Slide:
    """tifffile first; OpenSlide when tifffile fails or misses levels OpenSlide's generic-TIFF finds."""
    try:
        slide: Slide | None = _open_tifffile(path)
        error: SlideError | None = None
    except _TileTableError:
        raise
    except SlideError as e:
        slide, error = None, e
    if vendor == "generic-tiff" and (slide is None or slide.native_levels == 1):
        try:
            os_slide = _open_openslide(path, vendor)
        except SlideError:
            os_slide = None
        if os_slide is not None and (slide is None or os_slide.native_levels > slide.native_levels):
            if slide is not None:
                slide.close()
            return os_slide
        if os_slide is not None:
            os_slide.close()
    if slide is None:
        assert error is not None
        raise error
    return slide


@contextlib.contextmanager
def _tifffile_log_held(pass_on: bool = True) -> Iterator[None]:
    """Hold back what tifffile logs while a TIFF's structure is read. A damaged file is refused
    in one :class:`SlideError` line, so tifffile's own remark printed before it (such as "shaped
    series shape does not match page shape") is dropped; for a file that opens, the held records
    are passed on unchanged (``pass_on=False``: dropped too, for a check whose file is read again
    afterwards). Also a decorator."""
    import logging

    logger = logging.getLogger("tifffile")
    held: list[logging.LogRecord] = []

    class _Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            held.append(record)
            return False

    hold = _Hold()
    logger.addFilter(hold)
    ok = False
    try:
        yield
        ok = True
    finally:
        logger.removeFilter(hold)
        if ok and pass_on:
            for record in held:
                logger.handle(record)


@_tifffile_log_held()
def _open_tifffile(path: Path) -> Slide:
    import tifffile
    import zarr

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:
        raise SlideError(f"{path}: TIFF header or directory is damaged or truncated: {e}") from e
    try:
        if len(tf.pages) == 0:
            raise SlideError(f"{path}: TIFF holds no readable image directory (the file looks truncated or damaged)")
        vendor_kind = next((k for k in _OPENSLIDE_TIFF_KINDS if getattr(tf, f"is_{k}", False)), None)
        if vendor_kind is not None:
            # OpenSlide did not recognise a file that is tagged as its vendor format: the file is
            # damaged (typically truncated: directories of the associated images missing). Reading
            # the remains as a plain TIFF would silently lose the vendor metadata (mpp, objective).
            raise SlideError(f"{path}: {_OPENSLIDE_TIFF_KINDS[vendor_kind]} file that OpenSlide cannot open (the file looks truncated or damaged)")
        series_index, series, layout = _pick_series(tf, path)
        file_size = path.stat().st_size
        for i, lvl_series in enumerate(series.levels):
            _check_tile_table(lvl_series.keyframe, path, i, file_size)
        # Tiles without data (a minority, warned about above) read as white glass, not black.
        store = series.aszarr(fillvalue=int(np.iinfo(layout.dtype).max))
        node = zarr.open(store, mode="r")
        arrays = [node[str(i)] for i in range(len(series.levels))] if len(series.levels) > 1 else [node]
        axes = series.axes
        levels: list[_Level] = []
        w0 = h0 = None
        for i, (arr, lvl_series) in enumerate(zip(arrays, series.levels)):
            shape = dict(zip(axes, arr.shape))
            w, h = int(shape["X"]), int(shape["Y"])
            if i == 0:
                w0, h0 = w, h
            page = lvl_series.keyframe
            tile = (int(page.tilewidth or w), int(page.tilelength or page.rowsperstrip or 256))
            ds = 0.5 * (w0 / w + h0 / h)
            levels.append(_ZarrLevel(arr, layout.index, layout.to_rgb, path, width=w, height=h, downsample=ds, tile=tile))
        page0 = series.levels[0].keyframe
        is_ome = bool(tf.is_ome)
        mpp, objective = (None, None)
        if is_ome:
            mpp, objective = _ome_physical(tf.ome_metadata, series_index)
        if mpp is None:
            mpp = _tiff_resolution_mpp(page0)
        props = _tiff_properties(tf, page0, series)
    except SlideError:
        tf.close()
        raise
    except Exception as e:
        tf.close()
        raise SlideError(f"{path}: cannot read TIFF structure: {e}") from e
    return Slide(path, "ome-tiff" if is_ome else "generic-tiff", "tifffile", levels, mpp, objective, props, layout.samples, tf.close)


@_tifffile_log_held(pass_on=False)
def _check_vendor_tiff(path: Path) -> None:
    """:func:`_check_tile_table` on the tiled directories of a TIFF-based vendor slide (SVS, SCN,
    BIF, Philips) before OpenSlide opens it: OpenSlide accepts an SVS whose directory declares
    60000 x 60000 px over a table of 130 tiles and reads the rest as white. Missing tiles are
    left to OpenSlide (Philips writes sparse slides on purpose). A file tifffile cannot parse is
    left to OpenSlide too."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            pages = [pg for pg in tf.pages if getattr(pg, "is_tiled", False)]
            file_size = path.stat().st_size
            for i, page in enumerate(pages):
                _check_tile_table(page, path, i, file_size, sparse_ok=True)
    except _TileTableError:
        raise
    except Exception:  # noqa: BLE001 - OpenSlide has the last word on its own formats
        return


def _check_tile_table(page: Any, path: Path, level: int, file_size: int, sparse_ok: bool = False) -> None:
    """Refuse a TIFF level whose declared size its tile (or strip) table cannot back; warn when
    some of its tiles have no data. Reads only the tables, no tile.

    A forged or truncated directory can declare 200000 x 200000 pixels with one tile offset (or
    611,524 zero ones) in a few kilobytes; tifffile reads the tiles it lacks as empty, so such a
    file would open, and a thumbnail would decode 120 GB of nothing. Checked: one table entry per
    declared tile; no tile data past the end of the file; at most :data:`MAX_MISSING_TILE_SHARE`
    of the tiles without data (zero offset or byte count; ``sparse_ok`` skips this check);
    uncompressed tiles hold the bytes their pixels need.
    """
    width, height = int(page.imagewidth), int(page.imagelength)
    kind = "tile" if page.is_tiled else "strip"
    where = f"{path}: TIFF level {level} declares {width} x {height} px"
    expected = math.prod(int(n) for n in page.chunked)
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    counts = np.asarray(page.databytecounts, dtype=np.uint64)
    listed = min(len(offsets), len(counts))
    if listed < expected:
        raise _TileTableError(f"{where} in {expected} {kind}s but its {kind} table lists only {listed} "
                              "(the file looks truncated or damaged)")
    offsets, counts = offsets[:expected], counts[:expected]
    present = (offsets > 0) & (counts > 0)
    stored = int(np.count_nonzero(present))
    beyond = int(np.count_nonzero(offsets[present] + counts[present] > np.uint64(file_size)))
    if beyond:
        raise _TileTableError(f"{where}, but {beyond} of its {expected} {kind}s lie past the end of the file "
                              f"({file_size} bytes; the file looks truncated or damaged)")
    missing = expected - stored
    if missing > MAX_MISSING_TILE_SHARE * expected and not sparse_ok:
        raise _TileTableError(f"{where}, but {missing} of its {expected} {kind}s have no data (zero offset or byte "
                              "count): the file looks damaged or is an empty placeholder")
    if missing and not sparse_ok:
        warnings.warn(f"{path}: {missing} of the {expected} {kind}s of TIFF level {level} have no data; they read "
                      "as white", SlideWarning, stacklevel=5)
    if int(page.compression) == 1:  # COMPRESSION.NONE: the tiles' bytes follow from their pixels
        itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
        chunk_bytes = math.prod(int(n) for n in page.chunks) * itemsize
        needed = min(stored * chunk_bytes, math.prod(int(n) for n in page.shape) * itemsize)
        held = int(counts[present].sum())
        if 2 * held < needed:
            raise _TileTableError(f"{where} uncompressed ({needed} bytes of pixels), but its {kind}s hold only {held} "
                                  "bytes (the file looks truncated or damaged)")
        if 2 * file_size < needed:
            raise _TileTableError(f"{where} uncompressed ({needed} bytes of pixels), but the file has only "
                                  f"{file_size} bytes (the file looks truncated or damaged)")


class _Layout:
    """How to index a tifffile series' axes and convert a block to (h, w, 3) uint8."""

    def __init__(self, axes: str, shape: tuple[int, ...], dtype: np.dtype, path: Path):
        if "Y" not in axes or "X" not in axes:
            raise SlideError(f"{path}: TIFF image has axes {axes!r}, expected Y and X")
        self.axes = axes
        sizes = dict(zip(axes, shape))
        self.channel_axis = "S" if "S" in axes else ("C" if "C" in axes and sizes["C"] <= 4 else None)
        self.samples = int(sizes[self.channel_axis]) if self.channel_axis else 1
        if self.samples > 4:
            raise SlideError(f"{path}: TIFF image has {self.samples} channels; expected RGB(A) or grey brightfield")
        if dtype not in (np.uint8, np.uint16):
            raise SlideError(f"{path}: TIFF pixel type {dtype} is not supported (expected 8- or 16-bit RGB)")
        self.dtype = np.dtype(dtype)

    def index(self, ys: slice, xs: slice) -> tuple:
        key: list[Any] = []
        for ax in self.axes:
            if ax == "Y":
                key.append(ys)
            elif ax == "X":
                key.append(xs)
            elif ax == self.channel_axis:
                key.append(slice(None))
            else:
                key.append(0)
        return tuple(key)

    def to_rgb(self, block: np.ndarray) -> np.ndarray:
        kept = [ax for ax in self.axes if ax in ("Y", "X") or ax == self.channel_axis]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self.channel_axis)] if self.channel_axis else [])
        block = np.transpose(block, order)
        if block.ndim == 2:
            block = block[..., None]
        if self.dtype == np.uint16:
            block = (block >> 8).astype(np.uint8)
        c = block.shape[-1]
        if c == 1 or c == 2:
            return np.repeat(block[..., :1], 3, axis=-1)
        if c == 4:
            return _rgba_to_rgb(block)
        return np.ascontiguousarray(block)


def _pick_series(tf: Any, path: Path) -> tuple[int, Any, _Layout]:
    """The largest series with a supported pixel layout (skips labels/macros/thumbnails)."""
    best: tuple[int, int, Any, _Layout] | None = None
    reasons = []
    for i, s in enumerate(tf.series):
        try:
            layout = _Layout(s.axes, s.shape, s.dtype, path)
        except SlideError as e:
            reasons.append(str(e))
            continue
        sizes = dict(zip(s.axes, s.shape))
        area = int(sizes["Y"]) * int(sizes["X"])
        if best is None or area > best[0]:
            best = (area, i, s, layout)
    if best is None:
        raise SlideError(reasons[0] if reasons else f"{path}: TIFF file holds no image")
    return best[1], best[2], best[3]


def _tiff_resolution_mpp(page: Any) -> float | None:
    """mpp from XResolution/YResolution + ResolutionUnit (inch or centimetre)."""
    try:
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value if "YResolution" in page.tags else xr
    except (KeyError, TypeError, ValueError):
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if per_unit is None:
        return None
    vals = []
    for r in (xr, yr):
        num, den = (r if isinstance(r, tuple) else (r, 1))
        px = float(num) / float(den) if float(den) else 0.0
        if px > 0:
            vals.append(per_unit / px)
    return _plausible_mpp(sum(vals) / len(vals)) if vals else None


def _ome_physical(xml: str | None, series_index: int) -> tuple[float | None, float | None]:
    """(mpp, objective magnification) of an OME image from its OME-XML, when present."""
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    images = [el for el in root if local(el.tag) == "Image"]
    mpp = None
    if images:
        image = images[min(series_index, len(images) - 1)]
        pixels = next((el for el in image if local(el.tag) == "Pixels"), None)
        if pixels is not None:
            vals = []
            for axis in ("X", "Y"):
                size = _float_or_none(pixels.get(f"PhysicalSize{axis}"))
                unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
                if size and unit in _UNIT_TO_UM:
                    vals.append(size * _UNIT_TO_UM[unit])
            mpp = _plausible_mpp(sum(vals) / len(vals)) if vals else None
    objective = None
    for el in root.iter():
        if local(el.tag) == "Objective":
            objective = _float_or_none(el.get("NominalMagnification"))
            if objective:
                break
    return mpp, objective


def _tiff_properties(tf: Any, page: Any, series: Any) -> dict[str, str]:
    props = {
        "tifffile.series": str(series.name),
        "tifffile.axes": str(series.axes),
        "tifffile.levels": str(len(series.levels)),
        "tiff.Compression": str(getattr(page.compression, "name", page.compression)),
        "tiff.Photometric": str(getattr(page.photometric, "name", page.photometric)),
    }
    if page.is_tiled:
        props["tiff.TileWidth"], props["tiff.TileLength"] = str(page.tilewidth), str(page.tilelength)
    for tag in ("ImageDescription", "Software", "ResolutionUnit", "XResolution", "YResolution"):
        if tag in page.tags:
            value = page.tags[tag].value
            text = str(value)
            props[f"tiff.{tag}"] = text if len(text) <= 4096 else text[:4096] + "..."
    return props


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mean_mpp(x: Any, y: Any) -> float | None:
    vals = [v for v in (_float_or_none(x), _float_or_none(y)) if v is not None]
    return _plausible_mpp(sum(vals) / len(vals)) if vals else None


def _plausible_mpp(mpp: float | None) -> float | None:
    """Keep microscope-like resolutions only (a 72-dpi PNG is not 353 um/px tissue)."""
    if mpp is None or not (PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
        return None
    return float(mpp)
