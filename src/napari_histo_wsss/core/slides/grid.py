"""The patch grid: square patches over a slide's tissue, at a working resolution.

A :class:`PatchGrid` is a set of columns (numpy arrays), not a list of patch objects, so that a
grid of 100,000 patches costs a few megabytes and is built, searched and drawn in milliseconds.
Patches are laid on a lattice anchored at the slide's origin, with ``stride0`` level-0 pixels
between top-left corners; a patch is kept when its tissue share (:meth:`.TissueMask.box_fractions`)
reaches ``min_tissue``. Patches along the right and bottom edges may reach past the slide (by
less than half their side): the part outside reads as white glass and counts as non-tissue.

Identity: a patch is ``(x, y, size0)`` in level-0 pixels, and its id is ``f"{x}_{y}_{size0}"``.
Since the lattice is anchored at (0, 0), the same settings give the same ids on every run and
for every tissue mask, so patch labels stored in a project keep pointing at the same pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from napari_histo_wsss.core.errors import HistoWSSSError, SlideError
from napari_histo_wsss.core.slides.slide import Slide
from napari_histo_wsss.core.slides.tissue import TissueMask


@dataclass
class PatchGrid:
    """Square patches of ``size0`` level-0 pixels, read at ``patch_size`` pixels.

    ``x``/``y``: ``(N,)`` int64 level-0 top-left corners, in row-major order (by ``y``, then ``x``);
    ``tissue_fraction``: ``(N,)`` float32 tissue share of each patch (1 when laid without a mask);
    ``stride0``: level-0 pixels between neighbouring corners (``size0`` for non-overlapping patches).
    """

    x: np.ndarray
    y: np.ndarray
    size0: int
    patch_size: int
    tissue_fraction: np.ndarray
    stride0: int = 0

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.int64).ravel()
        self.y = np.asarray(self.y, dtype=np.int64).ravel()
        self.tissue_fraction = np.asarray(self.tissue_fraction, dtype=np.float32).ravel()
        self.size0 = int(self.size0)
        self.patch_size = int(self.patch_size)
        self.stride0 = int(self.stride0) or self.size0
        if not (len(self.x) == len(self.y) == len(self.tissue_fraction)):
            raise ValueError(f"x, y and tissue_fraction differ in length: {len(self.x)}, {len(self.y)}, {len(self.tissue_fraction)}")
        if self.size0 < 1 or self.patch_size < 1:
            raise ValueError(f"patch sizes must be positive, got size0={self.size0}, patch_size={self.patch_size}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def downsample(self) -> float:
        """Level-0 pixels per working-resolution pixel (``size0 / patch_size``)."""
        return self.size0 / self.patch_size

    @cached_property
    def ids(self) -> np.ndarray:
        """``(N,)`` str ids ``f"{x}_{y}_{size0}"``, stable across runs (see the module docstring)."""
        s = str(self.size0)
        return np.array([f"{a}_{b}_{s}" for a, b in zip(self.x.tolist(), self.y.tolist())], dtype=str)

    def read_patch(self, slide: Slide, i: int) -> np.ndarray:
        """Patch ``i`` as ``(patch_size, patch_size, 3)`` uint8 RGB, resampled from the best level."""
        i = self._check_index(i)
        return read_patch(slide, int(self.x[i]), int(self.y[i]), self.size0, self.patch_size)

    def index_at(self, x0: float, y0: float) -> int:
        """Index of the patch containing the level-0 point ``(x0, y0)``, or -1. Where overlapping
        patches (stride < size) share the point, the one whose centre is nearest wins."""
        inside = np.flatnonzero((self.x <= x0) & (x0 < self.x + self.size0) & (self.y <= y0) & (y0 < self.y + self.size0))
        if inside.size == 0:
            return -1
        if inside.size == 1:
            return int(inside[0])
        half = self.size0 / 2.0
        d2 = (self.x[inside] + half - x0) ** 2 + (self.y[inside] + half - y0) ** 2
        return int(inside[int(np.argmin(d2))])

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Sorted ``(K,)`` int64 indices of the patches meeting the level-0 box ``[x0, x1] x [y0, y1]``
        (corners in any order; a zero-size box is a point and selects the patches containing it)."""
        xa, xb = min(x0, x1), max(x0, x1)
        ya, yb = min(y0, y1), max(y0, y1)
        hit = (self.x <= xb) & (xa < self.x + self.size0) & (self.y <= yb) & (ya < self.y + self.size0)
        if xb > xa:
            hit &= self.x < xb
        if yb > ya:
            hit &= self.y < yb
        return np.flatnonzero(hit).astype(np.int64)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"patch index {i} out of range for a grid of {n} patches")
        return int(i) % n


def axis_starts(length: int, size: int, step: int, flush: bool = True) -> list[int]:
    """Start offsets along one axis of windows of ``size`` px every ``step`` px that cover
    ``length`` px (``[0]`` when ``length <= size``). The one tiler of the package: make-patches
    cropping, tiled CAMs, whole-slide and image prediction and the Review canvas all lay their
    tiles with it.

    ``flush=True``: the last window is moved back to end flush with the far edge (every window
    lies inside the image, the last overlap may be larger). ``flush=False``: a regular lattice
    every ``step`` px whose last window may reach past the far edge (the caller pads or crops);
    both give the same number of windows."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size if flush else starts[-1] + step)
    return starts


def cosine_window(tile: int, overlap: int) -> np.ndarray:
    """``(tile,)`` float32 blending weights of a tile: 1 inside, cosine ramps over ``overlap`` px
    at both ends with ``rise[i] + fall[i] == 1`` for tiles ``tile - overlap`` apart (a partition
    of unity, so a pointwise model gives the same result tiled as whole), and never 0 (so the
    weight sum can always be divided by). The one blending window of tiled CAMs and prediction."""
    if not 0 <= overlap <= tile // 2:
        raise HistoWSSSError(f"overlap must lie in [0, tile/2], got overlap={overlap} for tile={tile}")
    w = np.ones(tile, dtype=np.float64)
    if overlap:
        t = (np.arange(overlap) + 0.5) / overlap
        rise = np.sin(0.5 * np.pi * t) ** 2
        w[:overlap] = rise
        w[tile - overlap:] = rise[::-1]
    return w.astype(np.float32)


def read_patch(slide: Slide, x: int, y: int, size0: int, patch_size: int) -> np.ndarray:
    """A grid patch as the models see it: the level-0 box ``(x, y, size0, size0)`` resampled to
    ``patch_size`` pixels from the best level; the one read of training (``SlidePatchReader``),
    of the trained run's patch predictions (``core/stage1/suggest.py``) and of the panels."""
    return slide.read_scaled((x, y), (size0, size0), (patch_size, patch_size))


def make_grid(
    slide: Slide,
    tissue: TissueMask | None,
    patch_size: int = 224,
    target_mpp: float | None = 1.0,
    level: int | None = None,
    stride: int | None = None,
    min_tissue: float = 0.5,
) -> PatchGrid:
    """Lay square patches of ``patch_size`` working pixels over ``slide``.

    The working resolution is ``level`` when given (its downsample), else ``target_mpp``
    micrometres per pixel (needs the slide's mpp; without it the grid falls back to level 0 with a
    warning), else level 0. ``stride`` is in working pixels (default ``patch_size``: no overlap).
    With a ``tissue`` mask, patches whose tissue share is below ``min_tissue`` are dropped;
    without one every patch of the lattice is kept with tissue fraction 1. A patch folder
    (``slide.regions``) gets one lattice per image, from the image's own top-left corner.
    """
    if patch_size < 1:
        raise SlideError(f"{slide.path}: patch size must be positive, got {patch_size}")
    if stride is not None and stride < 1:
        raise SlideError(f"{slide.path}: stride must be positive, got {stride}")
    if not 0.0 <= min_tissue <= 1.0:
        raise SlideError(f"{slide.path}: min_tissue must lie in 0..1, got {min_tissue}")
    downsample = working_downsample(slide, target_mpp, level=level)
    size0 = max(1, int(round(patch_size * downsample)))
    stride0 = size0 if stride is None else max(1, int(round(stride * downsample)))
    w0, h0 = slide.dimensions
    # a patch folder's sheet: each image tiled from its own corner; a slide: one box
    boxes = [(r.x, r.y, r.width, r.height) for r in slide.regions] if getattr(slide, "regions", None) else [(0, 0, w0, h0)]
    gx, gy = [], []
    for bx, by, bw, bh in boxes:
        xs = np.arange(0, bw, stride0, dtype=np.int64)
        ys = np.arange(0, bh, stride0, dtype=np.int64)
        # Edge patches reach past the box; keep those with at least half their side on it.
        xs = xs[(xs == 0) | (bw - xs >= size0 / 2)]
        ys = ys[(ys == 0) | (bh - ys >= size0 / 2)]
        yy, xx = np.meshgrid(ys + by, xs + bx, indexing="ij")
        gx.append(xx.ravel())
        gy.append(yy.ravel())
    gx, gy = np.concatenate(gx), np.concatenate(gy)
    if len(boxes) > 1:  # row-major order over the whole sheet
        order = np.lexsort((gx, gy))
        gx, gy = gx[order], gy[order]
    if tissue is None:
        fractions = np.ones(gx.shape, dtype=np.float32)
    else:
        fractions = tissue.box_fractions(gx, gy, size0, size0).astype(np.float32)
        keep = fractions >= np.float32(min_tissue)
        gx, gy, fractions = gx[keep], gy[keep], fractions[keep]
    return PatchGrid(gx, gy, size0, int(patch_size), fractions, stride0)


#: A slide with fewer tissue patches than this cannot take several labelled patches per class
#: plus unlabelled ones to check the model on; the panels and ``info`` then offer a finer grid.
FEW_PATCHES = 40


def finer_patch_size(slide: Slide, tissue: TissueMask | None, patch_size: int, target_mpp: float | None = 1.0,
                     min_tissue: float = 0.5, want: int = FEW_PATCHES, step: int = 32,
                     smallest: int = 32) -> tuple[int, int] | None:
    """The largest patch size below ``patch_size`` (a multiple of ``step``, at least ``smallest``,
    same working resolution and tissue share) whose grid holds at least ``want`` tissue patches,
    as ``(patch size, number of patches)``; None when even ``smallest`` gives fewer (then the
    smallest size's count is no help either) or ``patch_size`` is already the smallest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a slide without pixel size: said where the grid is laid
        for size in range((patch_size - 1) // step * step, smallest - 1, -step):
            n = len(make_grid(slide, tissue, patch_size=size, target_mpp=target_mpp, min_tissue=min_tissue))
            if n >= want:
                return size, n
    return None


def working_downsample(slide: Slide, target_mpp: float | None = None, downsample: float | None = None,
                       level: int | None = None, strict: bool = False) -> float:
    """Level-0 pixels per working pixel, the one rule for every resolution setting: an explicit
    ``downsample``, else pyramid ``level``'s downsample, else ``target_mpp / slide.mpp``, else 1.

    A slide that does not state its pixel size cannot honour ``target_mpp``: by default the work
    falls back to level 0 with a warning (laying a patch grid still makes sense); ``strict=True``
    raises a :class:`SlideError` instead, for callers whose output would silently be at the wrong
    scale (whole-slide prediction with a model trained at ``target_mpp``)."""
    if downsample is not None:
        if not (np.isfinite(downsample) and downsample > 0):
            raise SlideError(f"{slide.path}: downsample must be a positive number, got {downsample}")
        return float(downsample)
    if level is not None:
        if not 0 <= level < len(slide.level_downsamples):
            raise SlideError(f"{slide.path}: level {level} does not exist (slide has {len(slide.level_downsamples)} levels)")
        return float(slide.level_downsamples[level])
    if target_mpp is not None:
        if not target_mpp > 0:
            raise SlideError(f"{slide.path}: target_mpp must be positive, got {target_mpp}")
        if not slide.mpp:
            if strict:
                raise SlideError(f"{slide.path}: the slide does not state its pixel size (mpp), so a target of "
                                 f"{target_mpp} um/px cannot be honoured; give a downsample or a level instead")
            warnings.warn(
                f"{slide.path}: microns per pixel unknown; patches are laid at level 0 instead of {target_mpp} um/px",
                stacklevel=3,
            )
            return 1.0
        return float(target_mpp) / float(slide.mpp)
    return 1.0
