"""Tissue vs glass at low resolution, and the white-background mask of the WSSS literature.

Two masks, two purposes:

* :func:`detect_tissue` finds the tissue on a whole slide, once, at a coarse pyramid level
  (about :data:`TISSUE_MPP` micrometres per pixel): Otsu's threshold on the HSV saturation of a
  median-filtered image (glass is grey/white, H&E-stained tissue is coloured), clamped to
  :data:`SATURATION_RANGE` so that a slide full of tissue or empty glass does not fool Otsu; then
  very dark pixels (scanner borders, not H&E) are dropped, gaps closed, small holes filled and
  small specks of debris removed. Otsu needs glass in view to split glass from tissue: on an image
  cut from inside the tissue (a GlaS or WSSS4LUAD image, a crop) it would split pale tissue (mucin,
  goblet cells, loose stroma) from stained tissue instead. So an image without glass (no smooth
  pale area of :data:`GLASS_MIN_SHARE` of it, :func:`glass_pieces`) is tissue wherever it is not
  dark, and a hole enclosed by tissue is filled, whatever its size, unless
  :data:`GLASS_HOLE_SHARE` of it is glass. On the 60 GlaS test-A images the gland pixels left out
  of the mask went from 18 % to 5 % (images with over 5 % left out: 41 -> 12); the bundled
  slide's tissue share went from 34.1 % to 35.2 % (a cleft with loose fibrin inside the tissue
  now counts). It decides where patches are laid (:mod:`.grid`).
* :func:`white_background_mask` marks white glass *inside an image or patch* the way the WSSS
  papers do (grey > 200, tiny white specks kept as tissue); CAM pseudo-masks force those pixels
  to the background class (:mod:`.cams`).

Both return boolean arrays; a :class:`TissueMask` also carries its downsample (level-0 pixels per
mask pixel) so that level-0 boxes can be scored against it (:meth:`TissueMask.box_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.slides.slide import Slide

#: Target resolution of the tissue mask (micrometres per mask pixel) when the slide's mpp is known.
TISSUE_MPP = 4.0
#: The tissue mask's longer side stays within these bounds (pixels) whatever the slide size.
MASK_SIDE_RANGE = (512, 4096)
#: Longer side of the tissue mask (pixels) aimed at when the slide's mpp is unknown.
UNKNOWN_MPP_SIDE = 2048
#: Otsu's saturation threshold (0..1) is clamped to this range.
SATURATION_RANGE = (0.05, 0.2)
#: Pixels whose brightest channel is below this are not tissue (black borders, scanner fill).
DARK_MAX = 40
#: Tissue fragments and holes smaller than this area (square micrometres) are removed / filled.
MIN_AREA_UM2 = 10_000.0
#: Level-0 resolution assumed for the morphology sizes when the slide does not state its mpp.
ASSUMED_MPP = 0.5
#: Median filter side (mask pixels) applied to the saturation before thresholding.
MEDIAN_SIZE = 5
#: Glass: pale (grey level above GLASS_GREY, saturation below GLASS_SAT of 255) and smooth (grey
#: standard deviation below GLASS_SD over GLASS_WINDOW mask pixels), in pieces of at least
#: GLASS_PIECE_UM2 square micrometres; an image whose glass covers less than GLASS_MIN_SHARE of it
#: holds no glass (a crop inside the tissue).
GLASS_GREY, GLASS_SAT, GLASS_SD, GLASS_WINDOW = 200, 20, 1.0, 9
GLASS_PIECE_UM2 = 2_500.0
GLASS_MIN_SHARE = 0.01
#: A hole enclosed by tissue is tissue (a mucin-filled gland, goblet cells) unless at least this
#: share of it is glass (a lumen, a tear).
GLASS_HOLE_SHARE = 0.25


@dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide.

    ``mask[r, c]`` covers the level-0 box ``[c * downsample, (c + 1) * downsample) x
    [r * downsample, (r + 1) * downsample)``. ``threshold`` is the saturation threshold used
    (``None`` when the mask did not come from :func:`detect_tissue`, e.g. read back from a project).
    """

    mask: np.ndarray
    downsample: float
    threshold: float | None = None
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {self.mask.shape}")
        self.downsample = float(self.downsample)
        if not self.downsample > 0:
            raise ValueError(f"tissue mask downsample must be positive, got {self.downsample}")

    def fraction(self) -> float:
        """Share of the slide area that is tissue (0..1)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_fraction(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue share (0..1) of the level-0 box ``(x0, y0, w0, h0)``; area outside the slide
        counts as glass."""
        return float(self.box_fractions(np.array([x0]), np.array([y0]), w0, h0)[0])

    def box_fractions(self, x0: np.ndarray, y0: np.ndarray, w0: float, h0: float) -> np.ndarray:
        """Vectorised :meth:`box_fraction` for many boxes of one size: ``(N,)`` float64.

        Exact area weighting of partly covered mask pixels: the integral of a piecewise-constant
        image is bilinear inside each pixel, so bilinear interpolation of the summed-area table
        at the (fractional) box corners gives the exact covered tissue area. Cost O(N) after a
        one-off O(mask) table.
        """
        if w0 <= 0 or h0 <= 0:
            raise ValueError(f"box size must be positive, got {w0}x{h0}")
        sat = self._summed_area()
        ds = self.downsample
        xa = np.asarray(x0, dtype=np.float64) / ds
        ya = np.asarray(y0, dtype=np.float64) / ds
        xb, yb = xa + w0 / ds, ya + h0 / ds
        area = (_sat_at(sat, xb, yb) - _sat_at(sat, xa, yb) - _sat_at(sat, xb, ya) + _sat_at(sat, xa, ya))
        return np.clip(area / ((w0 / ds) * (h0 / ds)), 0.0, 1.0)

    def _summed_area(self) -> np.ndarray:
        """(h + 1, w + 1) float64 table: ``S[r, c]`` = tissue pixels above and left of corner (r, c)."""
        if self._integral is None:
            h, w = self.mask.shape
            sat = np.zeros((h + 1, w + 1), dtype=np.float64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
            self._integral = sat
        return self._integral


def _sat_at(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a summed-area table at fractional corners (clipped to the mask)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    xi = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    yi = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - xi, y - yi
    xj, yj = np.minimum(xi + 1, w), np.minimum(yi + 1, h)
    top = sat[yi, xi] * (1 - fx) + sat[yi, xj] * fx
    bottom = sat[yj, xi] * (1 - fx) + sat[yj, xj] * fx
    return top * (1 - fy) + bottom * fy


# -- detection ------------------------------------------------------------------------------------
def tissue_level(slide: Slide) -> int:
    """The pyramid level the tissue mask is computed on: the one closest (in log scale) to
    :data:`TISSUE_MPP` (or to a mask of :data:`UNKNOWN_MPP_SIDE` px when mpp is unknown) whose
    longer side is within :data:`MASK_SIDE_RANGE`."""
    long0 = max(slide.dimensions)
    lo, hi = MASK_SIDE_RANGE
    wanted = TISSUE_MPP / slide.mpp if slide.mpp else long0 / UNKNOWN_MPP_SIDE
    wanted = min(max(wanted, long0 / hi, 1.0), max(long0 / lo, 1.0))
    sides = [max(d) for d in slide.level_dimensions]
    fitting = [i for i, side in enumerate(sides) if side <= hi] or [len(sides) - 1]
    return min(fitting, key=lambda i: abs(math.log(slide.level_downsamples[i] / wanted)))


def detect_tissue(slide: Slide, downsample: float | None = None) -> TissueMask:
    """Tissue (True) vs glass of a whole slide, at ``downsample`` level-0 pixels per mask pixel.

    ``downsample=None`` uses a stored or built pyramid level (:func:`tissue_level`), which costs
    one read of a small level whatever the slide size. An explicit downsample resamples the best
    level to exactly that scale (useful for aligning with another mask).
    """
    w0, h0 = slide.dimensions
    if downsample is None:
        level = tissue_level(slide)
        ds = slide.level_downsamples[level]
        lw, lh = slide.level_dimensions[level]
        rgb = slide.read_region((0, 0), level, (lw, lh))
    else:
        if not downsample > 0:
            raise SlideError(f"{slide.path}: tissue downsample must be positive, got {downsample}")
        ds = float(downsample)
        lw, lh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        rgb = slide.read_scaled((0, 0), (lw * ds, lh * ds), (lw, lh))
    um = (slide.mpp or ASSUMED_MPP) * ds
    regions = getattr(slide, "regions", None)
    if not regions:
        mask, threshold = tissue_from_rgb(rgb, um)
        return TissueMask(mask, ds, threshold)
    # a patch folder's sheet: each image on its own (most are crops from inside the tissue, with
    # no glass in view), white gutters between them never tissue
    from napari_histo_wsss.core.slides.mosaic import boxes_at

    mask = np.zeros(rgb.shape[:2], dtype=bool)
    thresholds = []
    for y0, y1, x0, x1 in boxes_at(regions, rgb.shape[:2], ds):
        if y1 > y0 and x1 > x0:
            mask[y0:y1, x0:x1], t = tissue_from_rgb(rgb[y0:y1, x0:x1], um)
            thresholds.append(t)
    return TissueMask(mask, ds, float(np.median(thresholds)) if thresholds else 0.0)


def tissue_from_rgb(rgb: np.ndarray, um_per_px: float) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image of ``um_per_px`` micrometres per pixel, and the
    saturation threshold (0..1) used. The steps are described in the module docstring."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    sat = ((hi.astype(np.uint16) - lo) * 255 // np.maximum(hi, 1)).astype(np.uint8)
    sat = ndi.median_filter(sat, size=MEDIAN_SIZE, mode="nearest")
    valid = hi >= DARK_MAX
    if valid.any() and np.ptp(sat[valid]) > 0:
        otsu = float(threshold_otsu(sat[valid])) / 255.0
    else:
        otsu = SATURATION_RANGE[1]
    threshold = min(max(otsu, SATURATION_RANGE[0]), SATURATION_RANGE[1])
    # Small images (a few hundred pixels of unknown scale) keep structures above 0.5% of their area.
    min_px = max(1, min(int(MIN_AREA_UM2 / (um_per_px * um_per_px)), sat.size // 200))
    glass = glass_pieces(rgb, sat, um_per_px)
    if glass.mean() < GLASS_MIN_SHARE:
        return _fill_small_holes(valid, min_px), threshold  # no glass in view: everything not dark is tissue
    mask = (sat > threshold * 255.0) & valid
    mask = ndi.binary_closing(mask, structure=_disk(2), border_value=0)
    mask = _fill_small_holes(mask, min_px, keep_if=glass, keep_share=GLASS_HOLE_SHARE)
    mask = _remove_small_objects(mask, min_px)
    return mask, threshold


def glass_pieces(rgb: np.ndarray, sat: np.ndarray, um_per_px: float) -> np.ndarray:
    """Glass of a low-resolution image: pale, smooth pixels (see :data:`GLASS_GREY` and the
    constants beside it) in pieces of at least :data:`GLASS_PIECE_UM2`; ``sat`` is the
    median-filtered saturation (0..255) of ``rgb``."""
    grey = ndi.uniform_filter(rgb.astype(np.float32).mean(axis=2), 3)  # sensor noise averaged, thin membranes kept
    mean = ndi.uniform_filter(grey, GLASS_WINDOW)
    sd = np.sqrt(np.maximum(ndi.uniform_filter(grey * grey, GLASS_WINDOW) - mean * mean, 0.0))
    smooth_pale = (grey > GLASS_GREY) & (sat < GLASS_SAT) & (sd < GLASS_SD)
    piece = max(1, min(int(GLASS_PIECE_UM2 / (um_per_px * um_per_px)), smooth_pale.size // 800))
    return _remove_small_objects(smooth_pale, piece)


def white_background_mask(rgb: np.ndarray, grey_threshold: int = 200, min_size: int = 64) -> np.ndarray:
    """(H, W) bool, True = white glass background: grey level (ITU-R 601 luma) above
    ``grey_threshold``, with white components smaller than ``min_size`` pixels (lumina, fat
    vacuoles, specks inside tissue) given back to tissue. This is the background rule of the
    LUAD-HistoSeg / WSSS4LUAD papers' pseudo-mask code."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.float32)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return _remove_small_objects(grey > grey_threshold, min_size)


# -- morphology helpers ----------------------------------------------------------------------------
def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected True components with fewer than ``min_size`` pixels."""
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_size: int, keep_if: np.ndarray | None = None,
                      keep_share: float = 0.0) -> np.ndarray:
    """Fill 4-connected False components smaller than ``max_size`` that do not touch the border;
    with ``keep_if``, also larger ones of which less than ``keep_share`` is ``keep_if``."""
    holes = ~mask
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_size
    if keep_if is not None:
        kept = np.bincount(labels.ravel(), weights=keep_if.ravel(), minlength=n + 1)
        fill |= kept < keep_share * sizes
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]
