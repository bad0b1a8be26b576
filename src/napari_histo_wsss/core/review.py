"""Slide review: the CAMs and automatic pseudo-mask of a whole slide, and the pathologist's corrections.

Everything of one slide lives on one *canvas* (:class:`CamCanvas`): a single-level raster of the
slide at the project's working resolution, or coarser so that its longer side stays under
``max_side`` (napari cannot paint multiscale Labels and paints huge ones slowly). The canvas is
cut into square tiles (:func:`plan_cams`, laid with :func:`~.grid.axis_starts`); each tile
holding tissue is read from the slide at the working resolution, widened by a margin, and given
to the run's classifier (:func:`~.cams.cams_for_image` without its per-image normalisation),
which returns its CAMs at raw strength and the tile's image-level class probabilities.
Neighbouring tiles overlap by twice the margin and are blended with the package's cosine
window (:meth:`CamCanvas.put`); CAMs are zero outside the project's tissue mask.

The automatic pseudo-mask is decided per slide, never per tile, so no tile edge can show:
gating from the slide-level probabilities (each class's highest tile probability), then, by
default (``ReviewSettings.rule = "raw"``), the argmax of the raw CAM logits plus the per-class
offsets the run's validation calibrated - the rule of ``histo-wsss pseudo-masks`` before its
dense CRF (:func:`~.cams.raw_argmax_mask`), which scores 0.570 on the stage-one benchmark's test
images against 0.499 for per-class normalised CAMs (``docs/benchmarks/stage1.md``, rows
*prob-raw* and *prob*); a pixel's score for the CAM threshold is then the softmax of its class
among the gated ones (at least 1/k, so the default threshold marks no tissue uncertain and the
mask is the command line's). With ``rule = "normalised"`` (the earlier rule): one
normalisation per class over the whole slide (:func:`canvas_scores`: :func:`~.cams.allowed_classes`
and :func:`~.cams.class_scores`, cached; they do not depend on the CAM threshold), then
:func:`~.cams.threshold_scores` - the steps that :func:`~.cams.pseudo_mask` chains for image
folders and stage two's MLPS sets - with glass (outside the tissue mask, or white glass of
:func:`~.tissue.white_background_mask`) as background. Tissue that no class reaches is
*uncertain* in the review (:func:`uncertain_index`, its own style) and saved as background.

With the ``raw`` rule the mask's classes are then refined, by default, by the dense CRF of
``pseudo-masks`` (``ReviewSettings.refine = "crf"``, :func:`refined_labels`): over the canvas's
RGB, on the softmax of the gated logits, with the kernels chosen on validation images scaled to
the canvas; a patch folder's images one by one with their own classes. On the stage-one
benchmark's test images the slide path then scores 0.610 against 0.584 unrefined
(``bench/stage1_slide_path.py``, docs/benchmarks/stage1.md, "The slide path").

:func:`compute_slide_cams` is the one job that computes and stores a slide's layers; the Review
panel runs it in the background and ``histo-wsss cams`` from the command line. The project masks
(``masks/<slide>/<name>``, :meth:`~.project.Project.write_mask`) are named by the constants
below; stage two (:mod:`.train_seg`) reads the same names:

* ``cam`` (C, h, w) float16 (each class normalised over the slide) and ``cam_probs`` (C, th, tw) float16, NaN on tiles not computed;
* ``cam_logits`` (C, h, w) float16: the raw CAM logits plus the run's offsets (the ``raw`` rule's scores; absent when
  the mask was made by the ``normalised`` rule or before this layer existed);
* ``pseudo`` (h, w) uint8 class indices, the automatic mask (background = C);
* ``corrected``, ``corrected_flag`` and ``reviewed``: the pathologist's work. A pixel is
  *corrected* when the user changed it (painted, filled or erased) and its value now differs
  from the automatic one (:class:`Corrections`); ``histo-wsss cams`` never replaces these.

The modules that import torch (:mod:`.cams`, :mod:`.train`, :mod:`.models`) are imported inside
the functions that need them: the napari panels import this module when they are docked, and
torch costs seconds to load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.errors import HistoWSSSError, ProjectError, TrainingError
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.settings import Settings, setting
from napari_histo_wsss.core.slides.grid import axis_starts, cosine_window
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.refine import CRF_MISSING, REFINEMENTS, CRFParams, crf_available, dense_crf_labels

__all__ = [
    "MASK_CAM",
    "MASK_CAM_PROBS",
    "MASK_CAM_LOGITS",
    "MASK_REGION_PROBS",
    "MASK_CAM_PRESENCE",
    "SHARE_WINDOW",
    "window_shares",
    "MASK_RULES",
    "MASK_PSEUDO",
    "MASK_CORRECTED",
    "MASK_CORRECTED_FLAG",
    "MASK_REVIEWED",
    "COMPUTED_MASKS",
    "PATHOLOGIST_MASKS",
    "CLASSIFIER_RUN_PREFIX",
    "ReviewSettings",
    "CamCanvas",
    "CamPlan",
    "CamTile",
    "plan_cams",
    "plan_slide_cams",
    "slide_cam_tiles",
    "uncertain_index",
    "slide_probs",
    "canvas_scores",
    "refined_labels",
    "outside_canvas",
    "pseudo_from_canvas",
    "pseudo_updates",
    "ThresholdIndex",
    "PseudoTile",
    "tissue_on_canvas",
    "new_canvas",
    "classify_images",
    "canvas_regions",
    "Corrections",
    "calibrated_gating",
    "list_runs",
    "resolve_run",
    "existing_computed",
    "compute_slide_cams",
    "load_canvas",
    "load_corrections",
    "corrections_for_plan",
    "corrections_for_canvas",
    "with_uncertain",
]

# -- the project masks of the review step (one place; stage two reads them) --------------------
MASK_CAM = "cam"
MASK_CAM_PROBS = "cam_probs"
MASK_PSEUDO = "pseudo"
MASK_CORRECTED = "corrected"
MASK_CORRECTED_FLAG = "corrected_flag"
MASK_REVIEWED = "reviewed"
#: The raw CAM logits plus the run's calibrated offsets (the ``raw`` rule's scores).
MASK_CAM_LOGITS = "cam_logits"
#: A patch folder's per-image class probabilities (C, images): each image is gated on its own.
#: Written beside :data:`COMPUTED_MASKS` for patch folders only (removed otherwise).
MASK_REGION_PROBS = "cam_region_probs"
#: Written beside :data:`COMPUTED_MASKS` when the run calibrated the ``prob-area`` gating: one row
#: ``[area floor, offsets of the ungated raw argmax minus the canvas's offsets]`` (:attr:`CamCanvas.presence`).
MASK_CAM_PRESENCE = "cam_presence"
#: How the automatic mask compares classes (:class:`ReviewSettings`).
MASK_RULES = ("raw", "normalised")
#: What :func:`compute_slide_cams` writes (recomputing replaces them).
COMPUTED_MASKS = (MASK_CAM, MASK_CAM_PROBS, MASK_PSEUDO, MASK_CAM_LOGITS)
#: The pathologist's work: written only from the Review panel's edits, never recomputed.
PATHOLOGIST_MASKS = (MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED)

#: Smallest class peak the per-slide normalisation divides by (a class never seen stays zero).
_EPS = 1e-6

#: Prefix of classifier run folders under a project's ``runs/``.
CLASSIFIER_RUN_PREFIX = "cls-"


@dataclass
class ReviewSettings(Settings):
    """How a slide's CAMs and automatic pseudo-mask are computed (the Review panel's form and
    ``histo-wsss cams``' options, generated from these declarations: :mod:`.settings`).

    ``mode`` None is the run's own ``cam_mode``, the type its validation scored and
    ``pseudo-masks`` uses; ``tile``: each tile is computed with a margin of an eighth of it on
    every side and blended with its neighbours (768 keeps a tile and its margins within one exact
    pass of :func:`~.stage1.cams.cams_for_image`); ``gating`` None is the run's calibrated
    threshold (:func:`calibrated_gating`), else 0.5; ``white_level`` is used when the class table
    has ``white_background``."""

    what = "review setting"

    which: str = setting("best", choices=("best", "last"), option="checkpoint", label="Checkpoint", basic=True,
                         help="checkpoint")
    # the entries of models.classifier.CAM_MODES (that module imports torch; tests/test_settings.py compares them)
    mode: str | None = setting(None, choices=("multi", "last"), none="as trained", label="CAM mode", basic=True,
                               help="CAM type: multi (fused with two earlier stages, finer) or last (default: the "
                                    "run's cam_mode, the CAMs its validation scored)")
    rule: str = setting("raw", choices=MASK_RULES, label="Mask rule", basic=True,
                        help="raw: argmax of raw CAM logits plus the offsets the run's validation calibrated "
                             "(the rule of pseudo-masks, better on the benchmark); normalised: CAMs normalised "
                             "per class over the slide, tissue below the CAM threshold uncertain")
    refine: str = setting("crf", choices=REFINEMENTS, label="Refine borders", basic=True,
                          help="raw rule: move the mask's class borders to the stain edges with a dense CRF "
                               "(crf, the default of pseudo-masks; needs pydensecrf, else the mask stays unrefined "
                               "and a message says so) or not (none)")
    tile: int = setting(768, range=(32, None), step=64, basic=True,
                        label="Tile (px)", help="tile side in model pixels; tiles are blended with their neighbours")
    max_side: int = setting(4096, range=(64, None), step=256, label="Max. mask side (px)", basic=True,
                            help="the mask's longer side at most, in pixels")
    device: str = setting("auto", choices=("auto", "cpu", "cuda", "mps"), strict=False, basic=True,
                          help="auto, cpu, cuda, cuda:N, mps")
    cam_threshold: float = setting(0.2, range=(0, 1), help="normalised CAM score below which a pixel is background")
    gating: float | None = setting(None, range=(0, 1),
                                   help="class probability that switches a class on for the slide (default: the "
                                        "threshold the run's validation chose, else 0.5)")
    white_level: int = setting(200, range=(0, 255),
                               help="grey level above which a pixel is white glass, for class tables with a white "
                                    "background")


# ---------------------------------------------------------------------------------------------
# the canvas
# ---------------------------------------------------------------------------------------------
@dataclass
class CamCanvas:
    """CAMs of one slide on a single-level raster.

    ``cams`` (C, h, w) float32: the blended CAMs, each class at its raw strength (comparable
    across tiles; :func:`canvas_scores` normalises them once per slide) and zero outside the
    tissue; ``weight`` (h, w) the blending weight each pixel has received (0: not computed);
    ``probs`` (C, th, tw) float32 image-level probability of each class per tile, NaN where the
    tile was not computed (no tissue, or cancelled); ``tile`` canvas pixels per tile side;
    ``downsample`` level-0 pixels per canvas pixel; ``rgb`` the slide at canvas resolution (white
    where not computed) for the white-background rule; ``tissue`` (h, w) bool, the project's
    tissue mask on the canvas (None: everything is tissue).
    """

    cams: np.ndarray
    probs: np.ndarray
    tile: int
    downsample: float
    rgb: np.ndarray
    weight: np.ndarray | None = None
    tissue: np.ndarray | None = None
    #: (C, h, w) float32 raw CAM logits plus the run's offsets, blended like ``cams`` (the ``raw``
    #: rule); None: the mask compares per-class normalised CAMs
    logits: np.ndarray | None = field(default=None, repr=False)
    #: bumped by every :meth:`put`; the caches of :meth:`peaks`, :func:`canvas_scores` and :func:`outside_canvas` carry it
    version: int = field(default=0, compare=False)
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: a patch folder's images as canvas boxes ``(y0, y1, x0, x1)`` (:func:`canvas_regions`):
    #: each image is gated on its own probabilities (:meth:`region_probs`), not the sheet's
    regions: list | None = field(default=None, repr=False, compare=False)
    #: (C, R) each image's class probabilities (:func:`classify_images`, or read back from the
    #: project's :data:`MASK_REGION_PROBS`); set with :meth:`set_region_probs`
    image_probs: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: ``crf``: the ``raw`` rule's classes come from a dense CRF over the canvas (:func:`refined_labels`)
    refine: str = field(default="none", compare=False)
    #: level-0 px per model input px (the CRF's kernels are in model pixels); None: the canvas's own
    work_downsample: float | None = field(default=None, compare=False)
    #: the ``prob-area`` gating of ``pseudo-masks`` (:func:`run_presence`): ``[area floor, d_1..d_C]``,
    #: a probable class is dropped where it covers less than the floor of the tissue in the ungated
    #: argmax of ``logits + d`` (the run's ``raw`` offsets); None: the probabilities alone decide
    presence: np.ndarray | None = field(default=None, repr=False, compare=False)
    _raster: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.weight is None:  # a canvas read back from the project: the computed tiles are whole
            self.weight = np.zeros(self.shape, dtype=np.float32)
            for ty, tx in self.computed_tiles():
                self.weight[self.tile_slices(ty, tx)] = 1.0

    @classmethod
    def empty(cls, num_classes: int, shape: tuple[int, int], tile: int, downsample: float,
              tissue: np.ndarray | None = None, rule: str = "normalised") -> CamCanvas:
        if rule not in MASK_RULES:
            raise HistoWSSSError(f"unknown mask rule {rule!r}; choose one of {', '.join(MASK_RULES)}")
        h, w = shape
        th, tw = math.ceil(h / tile), math.ceil(w / tile)
        return cls(
            cams=np.zeros((num_classes, h, w), dtype=np.float32),
            probs=np.full((num_classes, th, tw), np.nan, dtype=np.float32),
            tile=int(tile), downsample=float(downsample),
            rgb=np.full((h, w, 3), 255, dtype=np.uint8),
            weight=np.zeros((h, w), dtype=np.float32), tissue=tissue,
            logits=np.zeros((num_classes, h, w), dtype=np.float32) if rule == "raw" else None,
        )

    @property
    def rule(self) -> str:
        """``raw`` when the canvas holds logits, else ``normalised``."""
        return "raw" if self.logits is not None else "normalised"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.cams.shape[1]), int(self.cams.shape[2])

    def tile_slices(self, ty: int, tx: int) -> tuple[slice, slice]:
        h, w = self.shape
        t = self.tile
        return slice(ty * t, min((ty + 1) * t, h)), slice(tx * t, min((tx + 1) * t, w))

    def computed_tiles(self) -> list[tuple[int, int]]:
        done = ~np.isnan(self.probs[0])
        return [(int(a), int(b)) for a, b in zip(*np.nonzero(done))]

    def computed_region(self) -> np.ndarray:
        """(h, w) bool: the pixels of the computed tiles."""
        region = np.zeros(self.shape, dtype=bool)
        for ty, tx in self.computed_tiles():
            region[self.tile_slices(ty, tx)] = True
        return region

    def peaks(self) -> np.ndarray:
        """(C,) the strongest value of each class on the slide so far (the per-slide normalisation)."""
        key = ("peaks", self.version)
        if key not in self.cache:
            self.cache = {k: v for k, v in self.cache.items() if k[0] != "peaks"}
            self.cache[key] = self.cams.reshape(self.cams.shape[0], -1).max(axis=1)
        return self.cache[key]

    def set_region_probs(self, probs: np.ndarray | None) -> None:
        """Give the canvas its images' class probabilities (C, R); the scores go stale."""
        self.image_probs = None if probs is None else np.asarray(probs, dtype=np.float32)
        self.cache = {}

    def region_probs(self) -> np.ndarray | None:
        """(C, R) each patch-folder image's class probabilities, None for a slide: those given by
        :meth:`set_region_probs` (the probabilities ``pseudo-masks`` gates the image with), else
        - before they are known - the largest probability of the tiles an image touches (NaN
        while none of them is computed)."""
        if not self.regions:
            return None
        c = self.probs.shape[0]
        if self.image_probs is not None and self.image_probs.shape == (c, len(self.regions)):
            return self.image_probs
        out = np.full((c, len(self.regions)), np.nan, dtype=np.float32)
        t = self.tile
        for r, (y0, y1, x0, x1) in enumerate(self.regions):
            block = self.probs[:, y0 // t:max(y0 // t + 1, -(-y1 // t)), x0 // t:max(x0 // t + 1, -(-x1 // t))]
            block = block.reshape(c, -1)
            if (~np.isnan(block)).any(axis=1).all():
                out[:, r] = np.nanmax(block, axis=1)
        return out

    def class_shares(self, classes: ClassTable) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Each class's share of the computed tissue in the ungated raw argmax that the area floor
        of :attr:`presence` meets: (C,) for the slide and (R, C) per patch-folder image (None for a
        slide), cached per version; None without a floor or logits. White glass is left out by
        :func:`~.tissue.white_background_mask` at its default level, as ``pseudo-masks`` does.

        A patch-folder image is measured whole, as ``pseudo-masks`` measures an image (the floor
        was chosen on such images). A slide is measured at the same scale: a class's share is its
        largest share in any window of :data:`SHARE_WINDOW` model pixels that is at least half
        tissue (:func:`window_shares`), so a tumour focus that fills an image-sized region is kept
        however large the slide; a canvas smaller than a window is measured whole."""
        from napari_histo_wsss.core.stage1.cams import class_shares

        if self.presence is None or self.logits is None:
            return None
        key = ("shares", self.version, self.presence.tobytes())
        if key not in self.cache:
            bg = classes.background_index
            mask = np.argmax(self.logits + self.presence[1:, None, None].astype(np.float32), axis=0).astype(np.uint8)
            inside = self.weight > 0
            if self.tissue is not None:
                inside &= self.tissue
            if classes.white_background:
                inside &= ~white_background_mask(self.rgb)
            mask[~inside] = bg
            per_image = None
            if self.regions:
                raster = self.region_raster()
                per_image = np.stack([class_shares(mask[raster == r], classes) for r in range(len(self.regions))])
                whole = class_shares(mask, classes)
            else:
                per_model_px = (self.work_downsample or self.downsample) / self.downsample
                whole = window_shares(mask, inside, classes, max(8, int(round(SHARE_WINDOW * per_model_px))))
            self.cache[key] = (whole, per_image)
        return self.cache[key]

    def region_raster(self) -> np.ndarray:
        """(h, w) int32: the index of the patch-folder image under each canvas pixel, -1 between
        images (all -1 for a slide)."""
        from napari_histo_wsss.core.slides.mosaic import boxes_raster

        if self._raster is None or self._raster[0] != self.regions:  # the regions do not change with put()
            self._raster = (self.regions, boxes_raster(self.shape, self.regions or []))
        return self._raster[1]

    def put(self, ty: int, tx: int, cams: np.ndarray, probs: np.ndarray, rgb: np.ndarray,
            box: tuple[slice, slice] | None = None, logits: np.ndarray | None = None) -> tuple[slice, slice]:
        """Blend one computed tile in. ``cams`` (C, bh, bw), ``logits`` (the same, raw logits plus
        offsets; needed when the canvas holds logits) and ``rgb`` (bh, bw, 3) cover ``box``
        (default the tile itself): the tile widened by the plan's margin, clipped to the canvas.
        Tiles overlap by twice the margin and are blended with the cosine window of
        :func:`~.grid.cosine_window` (a partition of unity), so no tile edge shows. Returns ``box``."""
        sy, sx = box if box is not None else self.tile_slices(ty, tx)
        bh, bw = sy.stop - sy.start, sx.stop - sx.start
        core_y, core_x = self.tile_slices(ty, tx)
        # ramps as long as the overlap with each neighbour (twice the margin on that side)
        ov = 2 * max(core_y.start - sy.start, sy.stop - core_y.stop, core_x.start - sx.start, sx.stop - core_x.stop, 0)
        wy = cosine_window(bh, min(ov, bh // 2))
        wx = cosine_window(bw, min(ov, bw // 2))
        fw = np.outer(wy, wx)
        old_w = self.weight[sy, sx]
        new_w = old_w + fw
        part = self.cams[:, sy, sx]
        part *= old_w / new_w
        part += np.asarray(cams, dtype=np.float32) * (fw / new_w)
        if self.tissue is not None:
            part *= self.tissue[sy, sx]
        if self.logits is not None:
            if logits is None:
                raise HistoWSSSError("this canvas compares raw CAM logits: a tile needs its logits")
            lpart = self.logits[:, sy, sx]
            lpart *= old_w / new_w
            lpart += np.asarray(logits, dtype=np.float32) * (fw / new_w)
        self.weight[sy, sx] = new_w
        self.rgb[core_y, core_x] = rgb[core_y.start - sy.start:core_y.stop - sy.start,
                                       core_x.start - sx.start:core_x.stop - sx.start]
        self.probs[:, ty, tx] = probs
        self.version += 1
        self.cache = {}  # scores, peaks and glass go stale
        return sy, sx


#: Side, in model pixels, of the windows a slide's class shares are measured in for the area floor
#: of ``prob-area`` (:meth:`CamCanvas.class_shares`): about the size of the validation images the
#: floor was chosen on (WSSS4LUAD: 200-500 px, median about 320).
SHARE_WINDOW = 320


def window_shares(mask: np.ndarray, inside: np.ndarray, classes: ClassTable, window: int) -> np.ndarray:
    """(C,) each class's largest share of the ``inside`` pixels of a class-index ``mask`` over
    ``window``-px windows laid every half window (the last flush with the edge) that are at least
    half ``inside`` (a canvas smaller than a window is one window); the share over the whole mask
    when no window qualifies (sparse tissue)."""
    from napari_histo_wsss.core.stage1.cams import class_shares

    h, w = mask.shape
    c = classes.num_classes
    def starts(n: int) -> np.ndarray:
        if n <= window:
            return np.array([0])
        return np.unique(np.append(np.arange(0, n - window + 1, max(1, window // 2)), n - window))

    def integral(a: np.ndarray) -> np.ndarray:
        out = np.zeros((h + 1, w + 1), dtype=np.int64)
        out[1:, 1:] = np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1)
        return out

    ys, xs = starts(h), starts(w)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    y1, x1 = np.minimum(y0 + window, h), np.minimum(x0 + window, w)

    def box(ii: np.ndarray) -> np.ndarray:
        return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]

    n_in = box(integral(inside))
    ok = n_in >= 0.5 * (y1 - y0) * (x1 - x0)
    if not ok.any():
        return class_shares(np.where(inside, mask, classes.background_index), classes)
    return np.array([(box(integral(inside & (mask == k)))[ok] / n_in[ok]).max() for k in range(c)])


@dataclass(eq=False)
class CamTile(ProgressEvent):
    """A finished tile of :func:`slide_cam_tiles`: its CAMs (C, bh, bw) at raw strength, class
    probabilities (C,) and RGB (bh, bw, 3), at canvas resolution, covering ``box`` (the tile
    widened by the plan's margin, clipped to the canvas)."""

    kind: str = "step"
    ty: int = 0
    tx: int = 0
    box: tuple[slice, slice] | None = None
    cams: np.ndarray | None = field(default=None, repr=False)
    probs: np.ndarray | None = field(default=None, repr=False)
    rgb: np.ndarray | None = field(default=None, repr=False)
    #: raw CAM logits plus the run's offsets (C, bh, bw); None when not asked for
    logits: np.ndarray | None = field(default=None, repr=False)


@dataclass(eq=False)
class PseudoTile(ProgressEvent):
    """A recomputed automatic mask (:func:`pseudo_updates`): ``mask`` covers ``box`` (None: the
    whole canvas); ``ty``/``tx`` name the tile when it is one."""

    kind: str = "step"
    ty: int = 0
    tx: int = 0
    box: tuple[slice, slice] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    #: a CAM-threshold move (:class:`ThresholdIndex`): the flat canvas indices that changed and
    #: their new values (``mask`` is None then), and the threshold the mask now stands for
    changed: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    threshold: float | None = None
    #: the index the next CAM-threshold move can use (sent with a whole mask)
    index: ThresholdIndex | None = field(default=None, repr=False)


@dataclass
class CamPlan:
    """Where the tiles of a slide lie: canvas geometry and working resolution."""

    shape: tuple[int, int]        # canvas (h, w)
    downsample: float             # level-0 px per canvas px
    tile: int                     # canvas px per tile side
    work_downsample: float        # level-0 px per model input px
    tiles: list[tuple[int, int]] = field(default_factory=list)   # (ty, tx) holding tissue

    @property
    def margin(self) -> int:
        """Canvas px each tile is widened by on every side (neighbours overlap by twice this)."""
        return max(1, self.tile // 8)

    def box(self, ty: int, tx: int) -> tuple[slice, slice]:
        """The canvas box a tile's CAMs are computed on: the tile widened by :attr:`margin`,
        clipped to the canvas."""
        h, w = self.shape
        t, m = self.tile, self.margin
        return (slice(max(0, ty * t - m), min(h, (ty + 1) * t + m)),
                slice(max(0, tx * t - m), min(w, (tx + 1) * t + m)))

    @property
    def tile_work(self) -> int:
        """Model input pixels per tile side."""
        return max(1, int(round(self.tile * self.downsample / self.work_downsample)))


def plan_cams(slide_dims: tuple[int, int], work_downsample: float, tile_work: int, max_side: int,
              tissue: Any = None) -> CamPlan:
    """Canvas at the working resolution (coarser if its longer side would exceed ``max_side``),
    tiles of ``tile_work`` model pixels laid by :func:`~.grid.axis_starts` (the last ones cropped
    at the canvas edge; each is computed on a box widened by :attr:`CamPlan.margin`); tiles
    without tissue (per ``tissue.box_fraction``) are skipped."""
    w0, h0 = slide_dims
    ds = max(float(work_downsample), max(w0, h0) / float(max_side))
    h, w = max(1, math.ceil(h0 / ds)), max(1, math.ceil(w0 / ds))
    tile = max(8, int(round(tile_work * work_downsample / ds)))
    plan = CamPlan((h, w), ds, tile, float(work_downsample))
    for y in axis_starts(h, tile, tile, flush=False):
        for x in axis_starts(w, tile, tile, flush=False):
            if tissue is not None and tissue.box_fraction(x * ds, y * ds, tile * ds, tile * ds) <= 0:
                continue
            plan.tiles.append((y // tile, x // tile))
    return plan


def plan_slide_cams(project: Any, slide_id: str, tile: int, max_side: int) -> CamPlan:
    """:func:`plan_cams` for a project slide: the project's working resolution (its patch
    grid's downsample) and tissue mask. A slide without tissue is an error naming it."""
    grid = project.grid(slide_id)
    rec = project.slides[slide_id]
    plan = plan_cams((rec.width, rec.height), grid.downsample, int(tile), int(max_side), project.tissue(slide_id))
    if not plan.tiles:
        raise HistoWSSSError(f"{project.slide_path(slide_id)}: no tissue found on slide {slide_id}: nothing to compute")
    return plan


def canvas_regions(project: Any, slide_id: str, shape: tuple[int, int], downsample: float,
                   slide: Any = None) -> list | None:
    """A patch folder's images as boxes ``(y0, y1, x0, x1)`` of a canvas of ``shape`` at
    ``downsample`` level-0 px per pixel (``core/slides/mosaic.py``); None for a slide (known from
    the project's record, without opening it). ``slide``: the slide already open (the Review
    panel's), whose images are known, so no image header is read again."""
    from napari_histo_wsss.core.slides.mosaic import boxes_at

    if project.slides[slide_id].layout is None:  # only patch folders record a layout
        return None
    if slide is not None:
        regions = slide.regions
    else:
        with project.open_slide(slide_id) as opened:
            regions = opened.regions
    return boxes_at(regions, shape, downsample) if regions else None


def new_canvas(project: Any, slide_id: str, plan: CamPlan, rule: str, refine: str = "none",
               slide: Any = None) -> CamCanvas:
    """The empty canvas a slide's CAMs are blended into (the compute job's and the Review
    panel's): the project's tissue mask on it and, for a patch folder, its images, so that each
    image is gated on its own (:meth:`CamCanvas.region_probs`); ``refine`` as
    :attr:`ReviewSettings.refine`; ``slide`` as :func:`canvas_regions`."""
    regions = canvas_regions(project, slide_id, plan.shape, plan.downsample, slide)
    canvas = CamCanvas.empty(project.classes.num_classes, plan.shape, plan.tile, plan.downsample,
                             tissue=tissue_on_canvas(project, slide_id, plan.shape, plan.downsample, regions), rule=rule)
    canvas.regions = regions
    canvas.refine, canvas.work_downsample = refine, plan.work_downsample
    return canvas


def classify_images(model: Any, slide: Any, work_downsample: float, mode: str, window: int, device: Any,
                should_stop: Callable[[], bool] = lambda: False) -> Iterator[ProgressEvent]:
    """A patch folder's images classified one by one, as ``pseudo-masks`` classifies an image
    (:func:`~.cams.cams_for_image` at the working resolution, the largest ``window``-px window):
    ``step`` events, then ``done`` whose ``metrics["region_probs"]`` is the (C, R) list (nothing
    more when stopped)."""
    from napari_histo_wsss.core.stage1.cams import cams_for_image

    regions = slide.regions or []
    out = []
    for i, r in enumerate(regions, start=1):
        if should_stop():
            return
        size = (max(1, int(round(r.width / work_downsample))), max(1, int(round(r.height / work_downsample))))
        rgb = slide.read_scaled((r.x, r.y), (r.width, r.height), size)
        out.append(cams_for_image(model, rgb, device=device, mode=mode, window=window, normalize=False)[1])
        yield ProgressEvent("step", step=i, steps=len(regions), message=f"image {i}/{len(regions)} classified")
    yield ProgressEvent("done", step=len(regions), steps=len(regions),
                        metrics={"region_probs": np.stack(out, axis=1).astype(np.float32).tolist()})


def tissue_on_canvas(project: Any, slide_id: str, shape: tuple[int, int], downsample: float,
                     regions: list | None = None) -> np.ndarray:
    """The project's tissue mask of a slide resampled (nearest) onto a canvas raster. A patch
    folder's images (``regions``, :func:`canvas_regions`) are tissue wherever they are, as
    ``pseudo-masks`` takes an image: white glass inside them is background by the white rule
    (``ReviewSettings.white_level``), not by the coarse tissue mask (which drops pale tissue such
    as alveolar walls: on the stage-one benchmark's test images the slide path then scored 0.03
    below the image path, ``bench/stage1_slide_path.py``)."""
    if regions:
        from napari_histo_wsss.core.slides.mosaic import boxes_raster

        return boxes_raster(shape, regions) >= 0
    t = project.tissue(slide_id)
    return _onto(np.asarray(t.mask, dtype=bool), t.downsample, shape, downsample)


def _resize_stack(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float maps -> (C, *size), area-averaged (bilinear when enlarging)."""
    if maps.shape[1:] == tuple(size):
        return maps
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    mode = "area" if maps.shape[1] >= size[0] and maps.shape[2] >= size[1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=tuple(size), mode=mode, **kw)[0].numpy()


def slide_cam_tiles(model: Any, slide: Any, plan: CamPlan, mode: str, window: int, device: Any,
                    should_stop: Callable[[], bool], offsets: np.ndarray | None = None) -> Iterator[CamTile]:
    """The CAMs of each planned tile of an open slide, in plan order, at canvas resolution and
    raw strength (:func:`~.cams.cams_for_image` without its per-image normalisation, on the
    tile's widened box read at the working resolution, then resized); returns early when
    ``should_stop()``. With ``offsets`` ((C,), the run's calibrated raw-logit offsets) each tile
    also carries its raw CAM logits (from the same forward pass) plus the offsets."""
    from PIL import Image

    from napari_histo_wsss.core.stage1.cams import cams_for_image

    t0 = time.monotonic()
    n = len(plan.tiles)
    ds, scale = plan.downsample, plan.downsample / plan.work_downsample
    for i, (ty, tx) in enumerate(plan.tiles, start=1):
        if should_stop():
            return
        sy, sx = plan.box(ty, tx)
        bh, bw = sy.stop - sy.start, sx.stop - sx.start
        size = (max(1, int(round(bw * scale))), max(1, int(round(bh * scale))))
        rgb = slide.read_scaled((sx.start * ds, sy.start * ds), (bw * ds, bh * ds), size)
        cams, probs, *raw = cams_for_image(model, rgb, device=device, mode=mode, window=window, normalize=False,
                                           return_logits=offsets is not None)
        cams = _resize_stack(cams, (bh, bw))
        logits = None
        if offsets is not None:
            logits = _resize_stack(raw[0], (bh, bw))
            logits += np.asarray(offsets, dtype=np.float32)[:, None, None]
        small = np.asarray(Image.fromarray(rgb).resize((bw, bh), Image.Resampling.BOX))
        yield CamTile(ty=ty, tx=tx, box=(sy, sx), cams=cams, probs=probs, rgb=small, logits=logits, step=i, steps=n,
                      eta_s=(time.monotonic() - t0) / i * (n - i), message=f"tile {i}/{n}")


# ---------------------------------------------------------------------------------------------
# the automatic pseudo-mask
# ---------------------------------------------------------------------------------------------
def uncertain_index(classes: ClassTable) -> int:
    """Class-index value of *uncertain* tissue in the review (the model gives it no class): one
    past the background. Shown in its own style; saved as background (:meth:`Corrections.masks`)."""
    return classes.background_index + 1


def slide_probs(canvas: CamCanvas) -> np.ndarray:
    """(C,) the slide-level class probabilities: each class's highest tile probability (0 when
    no tile is computed). Gating is decided once per slide from these."""
    p = canvas.probs.reshape(canvas.probs.shape[0], -1)
    if np.isnan(p).all():
        return np.zeros(p.shape[0], dtype=np.float32)
    return np.nanmax(p, axis=1).astype(np.float32)


def _gates(canvas: CamCanvas, classes: ClassTable, gating: float) -> tuple[np.ndarray, np.ndarray | None, bytes]:
    """The slide's allowed classes (C,) from :func:`slide_probs`, a patch folder's per image
    (R, C) (None for a slide; no class of an image not computed yet), and a cache key of both."""
    from napari_histo_wsss.core.stage1.cams import allowed_classes

    shares = canvas.class_shares(classes)  # the prob-area floor, when the run calibrated one
    floor = float(canvas.presence[0]) if shares is not None else 0.0
    allowed = allowed_classes(classes, probs=slide_probs(canvas), prob_threshold=gating,
                              shares=None if shares is None else shares[0], min_area=floor)
    per_image = canvas.region_probs()
    if per_image is None:
        return allowed, None, allowed.tobytes()
    gates = np.stack([allowed_classes(classes, probs=np.nan_to_num(per_image[:, r], nan=0.0), prob_threshold=gating,
                                      shares=None if shares is None else shares[1][r], min_area=floor)
                      for r in range(per_image.shape[1])])
    return allowed, gates, allowed.tobytes() + gates.tobytes()


def canvas_scores(canvas: CamCanvas, classes: ClassTable, gating: float,
                  box: tuple[slice, slice] | None = None, refined: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The threshold-independent part of the slide's pseudo-mask: :func:`~.cams.allowed_classes`
    from the slide-level probabilities (:func:`slide_probs`) and :func:`~.cams.class_scores` of
    the CAMs normalised per class over the whole slide (:meth:`CamCanvas.peaks`). One gating and
    one normalisation per slide, so no tile edge can show. ``box``: only that part of the
    canvas (the live view while tiles arrive); the whole canvas is cached until the next
    :meth:`CamCanvas.put`, so a CAM-threshold move costs one comparison per pixel. On a canvas
    refined by a dense CRF (:attr:`CamCanvas.refine`), ``refined`` takes each pixel's class from
    :func:`refined_labels` (computed here for the whole canvas, used from its cache for a
    ``box``); the score stays the pixel's softmax."""
    from napari_histo_wsss.core.stage1.cams import class_scores

    allowed, gates, allowed_key = _gates(canvas, classes, gating)
    labels = None
    if refined and _refines(canvas):
        rkey = ("refined", canvas.version, allowed_key)
        labels = refined_labels(canvas, classes, gating) if box is None else canvas.cache.get(rkey)
    key = ("scores", canvas.version, allowed_key, labels is not None)
    if box is None and key in canvas.cache:
        return canvas.cache[key]
    sl = box if box is not None else (slice(None), slice(None))

    def scores_for(allowed_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if canvas.logits is not None:
            return _raw_scores(canvas.logits[:, sl[0], sl[1]], classes, allowed_c)
        scale = (1.0 / np.maximum(canvas.peaks(), _EPS)).astype(np.float32)[:, None, None]
        return class_scores(canvas.cams[:, sl[0], sl[1]] * scale, classes, allowed_c, norm="none")

    scores = scores_for(allowed)
    if gates is not None:
        raster = canvas.region_raster()[sl]
        for combo in np.unique(gates, axis=0):
            images = np.flatnonzero((gates == combo).all(axis=1))
            where = np.isin(raster, images)
            if where.any() and not np.array_equal(combo, allowed):
                argmax, top = scores_for(combo)
                scores[0][where], scores[1][where] = argmax[where], top[where]
    if labels is not None:
        scores = (labels[sl].copy(), scores[1])
    if box is None:
        canvas.cache = {k: v for k, v in canvas.cache.items() if k[0] != "scores"}
        canvas.cache[key] = scores
    return scores


def _refines(canvas: CamCanvas) -> bool:
    return canvas.refine == "crf" and canvas.logits is not None and crf_available()


def refined_labels(canvas: CamCanvas, classes: ClassTable, gating: float,
                   should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
    """(h, w) uint8: each canvas pixel's class after a dense CRF (:func:`~.refine.dense_crf_labels`,
    ``pseudo-masks``' default refinement) over the canvas's RGB on the softmax of its raw logits
    plus offsets, among the classes the gating allows - the slide's, or each patch-folder image's
    own (the CRF then runs image by image, as ``pseudo-masks`` runs it). The kernels, chosen on
    validation images at the model's input resolution, are scaled to the canvas
    (:meth:`~.refine.CRFParams.scaled`). Cached per canvas version and gating (a few, so moving
    the gating back is free). None when the canvas is not refined (rule ``normalised``,
    ``refine="none"``, or no pydensecrf) or ``should_stop()`` said stop (asked between CRF
    tiles or images)."""
    if not _refines(canvas):
        return None
    allowed, gates, allowed_key = _gates(canvas, classes, gating)
    key = ("refined", canvas.version, allowed_key)
    if key in canvas.cache:
        return canvas.cache[key]
    params = CRFParams().scaled((canvas.work_downsample or canvas.downsample) / canvas.downsample)
    logits = canvas.logits
    assert logits is not None
    out = _raw_scores(logits, classes, allowed)[0] if gates is None else np.zeros(canvas.shape, dtype=np.uint8)
    computed = canvas.weight > 0
    if gates is None:
        rows, cols = np.flatnonzero(computed.any(axis=1)), np.flatnonzero(computed.any(axis=0))
        if rows.size:
            sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            where = ~outside_canvas(canvas, None)[sy, sx]
            # dense_crf_labels' own tiles (2048 px, 256-px overlaps); tiles whose tissue holds one class are skipped
            lab = dense_crf_labels(logits[:, sy, sx], canvas.rgb[sy, sx], params, allowed=allowed, should_stop=should_stop,
                                   where=where)
            if lab is None:
                return None
            out[sy, sx] = lab
    else:
        for r, (y0, y1, x0, x1) in enumerate(canvas.regions or []):
            if should_stop is not None and should_stop():
                return None
            if y1 <= y0 or x1 <= x0 or not computed[y0:y1, x0:x1].any():
                continue
            out[y0:y1, x0:x1] = dense_crf_labels(logits[:, y0:y1, x0:x1], canvas.rgb[y0:y1, x0:x1], params,
                                                 allowed=gates[r])
    old = [k for k in canvas.cache if k[0] == "refined"]
    for k in old[:-3]:  # keep the last few gatings
        del canvas.cache[k]
    canvas.cache[key] = out
    return out


def _raw_scores(logits: np.ndarray, classes: ClassTable, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``raw`` rule: over the ``allowed`` classes, the class of the largest logit (offsets
    included; :func:`~.cams.class_scores` without normalisation) and its softmax among them (the
    score the CAM threshold compares)."""
    from napari_histo_wsss.core.stage1.cams import class_scores

    argmax, top = class_scores(logits, classes, allowed, norm="none")
    idx = np.flatnonzero(np.asarray(allowed, dtype=bool))
    if idx.size == 0:
        return argmax, top
    return argmax, (1.0 / np.exp(logits[idx] - top[None]).sum(axis=0)).astype(np.float32)


def outside_canvas(canvas: CamCanvas, white_level: int | None, box: tuple[slice, slice] | None = None) -> np.ndarray:
    """(h, w) bool (or ``box`` of it): pixels that are background whatever the CAMs say - not
    computed, outside the tissue mask, or (``white_level`` set) white glass
    (:func:`~.tissue.white_background_mask`). The whole canvas is cached per version and level."""
    key = ("outside", canvas.version, white_level)
    if box is None and key in canvas.cache:
        return canvas.cache[key]
    sl = box if box is not None else (slice(None), slice(None))
    out = canvas.weight[sl] <= 0
    if canvas.tissue is not None:
        out |= ~canvas.tissue[sl]
    if white_level is not None:
        out |= white_background_mask(canvas.rgb[sl], grey_threshold=int(white_level))
    if box is None:
        canvas.cache = {k: v for k, v in canvas.cache.items() if k[0] != "outside"}
        canvas.cache[key] = out
    return out


def pseudo_from_canvas(canvas: CamCanvas, classes: ClassTable, cam_threshold: float, gating: float,
                       white_level: int | None, uncertain: bool = False,
                       box: tuple[slice, slice] | None = None, refined: bool = True) -> np.ndarray:
    """The automatic pseudo-mask of the canvas (or of ``box``), uint8 class index:
    :func:`canvas_scores` then :func:`~.cams.threshold_scores` with ``cam_threshold`` as the
    background threshold and :func:`outside_canvas` as background. With ``uncertain``, tissue
    whose best score stays below the threshold gets :func:`uncertain_index` instead of the
    background (the review's display); without, it is background (what is saved and what stage
    two reads). ``refined``: as :func:`canvas_scores`."""
    from napari_histo_wsss.core.stage1.cams import threshold_scores

    argmax, best = canvas_scores(canvas, classes, gating, box, refined=refined)
    outside = outside_canvas(canvas, white_level, box)
    mask = threshold_scores(argmax, best, classes, bg_threshold=cam_threshold, white=outside)
    if uncertain:
        mask[(mask == classes.background_index) & ~outside] = uncertain_index(classes)
    return mask


class ThresholdIndex:
    """The slide's tissue pixels sorted by their best score (:func:`canvas_scores`), so that a
    CAM-threshold move touches only the pixels whose score lies between the old and the new
    threshold (a binary search, then work in proportion to the pixels that change) - the same
    result as :func:`pseudo_from_canvas` at the new threshold (``tests/test_review.py``). Valid
    for one canvas version, gating, white level and refinement (:meth:`fits`)."""

    def __init__(self, canvas: CamCanvas, classes: ClassTable, gating: float, white_level: int | None) -> None:
        argmax, best = canvas_scores(canvas, classes, gating)
        tissue = np.flatnonzero(~outside_canvas(canvas, white_level))
        scores = best.ravel()[tissue]
        order = np.argsort(scores, kind="stable")
        self.pixels = tissue[order].astype(np.int64)
        self.scores = scores[order]
        self.classes = argmax.ravel()[self.pixels]
        self.uncertain = np.uint8(uncertain_index(classes))
        self.key = (canvas.version, float(gating), white_level, _refines(canvas))

    def fits(self, canvas: CamCanvas, gating: float, white_level: int | None) -> bool:
        return self.key == (canvas.version, float(gating), white_level, _refines(canvas))

    def changed(self, old: float, new: float) -> tuple[np.ndarray, np.ndarray]:
        """(flat canvas indices, new values) of the tissue pixels whose value differs between
        thresholds ``old`` and ``new`` (:func:`~.cams.threshold_scores`: a class from ``best >=
        threshold`` on, uncertain below)."""
        lo, hi = sorted((max(old, 0.0), max(new, 0.0)))
        a, b = np.searchsorted(self.scores, [lo, hi], side="left")
        values = np.where(self.scores[a:b] >= new, self.classes[a:b], self.uncertain).astype(np.uint8)
        return self.pixels[a:b], values


def pseudo_updates(canvas: CamCanvas, classes: ClassTable, cam_threshold: float, gating: float,
                   white_level: int | None, should_stop: Callable[[], bool],
                   index: ThresholdIndex | None = None, shown: float | None = None) -> Iterator[PseudoTile]:
    """The review display's automatic mask (uncertain tissue shown): the job the Review panel
    runs off the GUI thread when a slider moves. With an ``index`` that fits and the threshold
    ``shown`` now, one :class:`PseudoTile` with only the pixels that change; else the whole mask
    (:func:`pseudo_from_canvas`), then the :class:`ThresholdIndex` for the next moves. On a
    canvas refined by a dense CRF whose labels for this gating are not cached yet, the unrefined
    mask comes first (shown at once), then the refined one once the CRF is done (seconds on a
    large canvas; stopped between its tiles)."""
    if should_stop():
        return
    if index is not None and shown is not None and index.fits(canvas, gating, white_level):
        yield PseudoTile(changed=index.changed(shown, cam_threshold), threshold=cam_threshold, step=1, steps=1)
        return
    steps = 2
    if _refines(canvas) and ("refined", canvas.version, _gates(canvas, classes, gating)[2]) not in canvas.cache:
        steps = 3
        yield PseudoTile(mask=pseudo_from_canvas(canvas, classes, cam_threshold, gating, white_level, uncertain=True,
                                                 refined=False), threshold=cam_threshold, step=1, steps=steps,
                         message="refining the borders (dense CRF)")
        if refined_labels(canvas, classes, gating, should_stop) is None:
            return
    yield PseudoTile(mask=pseudo_from_canvas(canvas, classes, cam_threshold, gating, white_level, uncertain=True),
                     threshold=cam_threshold, step=steps - 1, steps=steps)
    if not should_stop():
        yield PseudoTile(index=ThresholdIndex(canvas, classes, gating, white_level), step=steps, steps=steps)


# ---------------------------------------------------------------------------------------------
# corrections
# ---------------------------------------------------------------------------------------------
class Corrections:
    """The editable mask (layer values = class index + 1, 0 = erased) and what the user changed in it.

    ``auto``: the automatic mask (class indices, :func:`uncertain_index` for uncertain tissue);
    ``touched``: pixels the user painted, filled or erased; ``reviewed``: pixels marked reviewed.
    The corrected flag is ``touched & (value != automatic value)``, so undoing a stroke (the value
    returns to the automatic one) clears it. :meth:`record` keeps the strokes (napari's ``paint``
    event atoms, which carry the old values) so :meth:`undo` needs no private napari state."""

    #: strokes kept for undo
    HISTORY = 100

    def __init__(self, auto: np.ndarray, num_classes: int) -> None:
        self.num_classes = num_classes
        self.auto = auto
        self.data = (auto.astype(np.uint8) + 1)
        self.touched = np.zeros(auto.shape, dtype=bool)
        self.reviewed = np.zeros(auto.shape, dtype=bool)
        self.history: list[list[tuple[Any, Any, np.ndarray]]] = []

    def touch_from_paint(self, atoms: Any) -> None:
        """Mark the pixels of a napari ``paint`` event's history atoms as touched: atoms with a
        ``slice_key`` (and optional ``mask``), or ``(indices, old values, new value)`` tuples."""
        for atom in atoms:
            key = getattr(atom, "slice_key", None)
            if key is not None:
                m = getattr(atom, "mask", None)
                if m is None:
                    self.touched[key] = True
                else:
                    self.touched[key] |= np.asarray(m, dtype=bool)
            else:
                self.touched[tuple(atom[0])] = True

    def record(self, atoms: Any) -> None:
        """One stroke (a ``paint`` event's atoms): mark its pixels touched and keep its old
        values for :meth:`undo`."""
        atoms = list(atoms)
        self.touch_from_paint(atoms)
        stroke = []
        for atom in atoms:
            key = getattr(atom, "slice_key", None)
            if key is not None:
                key, mask, old = tuple(key), getattr(atom, "mask", None), np.array(atom.old_values, copy=True)
            else:
                key, mask, old = tuple(atom[0]), None, np.array(atom[1], copy=True)
            auto = self.auto[key] if mask is None else self.auto[key][np.asarray(mask, dtype=bool)]
            # pixels that showed the automatic value before the stroke follow the automatic mask on undo
            stroke.append((key, mask, old, old == auto.astype(np.int64) + 1))
        self.history.append(stroke)
        del self.history[: -self.HISTORY]

    def undo(self) -> bool:
        """Take back the last recorded stroke; returns False when there is nothing to undo. A pixel
        the user had corrected before the stroke gets that value back; one that showed the automatic
        value gets the automatic value of *now* (thresholds may have moved since) and is no longer
        touched."""
        if not self.history:
            return False
        for key, mask, old, was_auto in reversed(self.history.pop()):
            if mask is None:
                self.data[key] = np.where(was_auto, self.auto[key].astype(np.int64) + 1, old)
                self.touched[key] = self.touched[key] & ~was_auto
            else:
                m = np.asarray(mask, dtype=bool)
                region, touched = self.data[key], self.touched[key]
                region[m] = np.where(was_auto, self.auto[key][m].astype(np.int64) + 1, old)
                touched[m] &= ~was_auto
        return True

    def flag(self) -> np.ndarray:
        """Pixels whose value differs from the automatic mask because the user changed them."""
        if not self.touched.any():
            return np.zeros(self.touched.shape, dtype=bool)
        return self.touched & (self.data != self.auto + 1)

    def set_auto(self, auto: np.ndarray, region: tuple[slice, slice] | None = None) -> None:
        """New automatic values for the whole mask, or for ``region`` (``auto`` then holds just that
        region): thresholds moved or tiles arrived. Corrected pixels keep the user's value."""
        sl = region if region is not None else (slice(None), slice(None))
        touched, data, old = self.touched[sl], self.data[sl], self.auto[sl]
        if not touched.any():  # nothing painted here: one pass
            old[...] = auto
            np.add(old, 1, out=data, dtype=np.uint8, casting="unsafe")
            return
        # only the touched pixels need a look (few; a slider move must stay one pass per pixel)
        where = np.nonzero(touched)
        values = data[where]
        keep = values != old[where] + 1
        old[...] = auto
        np.add(old, 1, out=data, dtype=np.uint8, casting="unsafe")
        data[tuple(a[keep] for a in where)] = values[keep]
        touched[tuple(a[~keep] for a in where)] = False

    def set_auto_at(self, flat: np.ndarray, values: np.ndarray) -> None:
        """New automatic values at the flat indices ``flat`` (a CAM-threshold move); corrected
        pixels keep the user's value."""
        auto, data, touched = self.auto.reshape(-1), self.data.reshape(-1), self.touched.reshape(-1)
        old, cur, t = auto[flat], data[flat], touched[flat]
        keep = t & (cur != old + 1)
        auto[flat] = values
        data[flat] = np.where(keep, cur, values + 1)
        touched[flat] = keep

    def corrected(self) -> np.ndarray:
        """Class-index mask of the layer (erased pixels, value 0, become background C)."""
        out = self.data.astype(np.int16) - 1
        out[(out < 0) | (out > self.num_classes)] = self.num_classes  # erased and uncertain: background
        return out.astype(np.uint8)

    def area_per_class(self) -> np.ndarray:
        """Corrected pixels per resulting class index (0..C, C = background/erased)."""
        flag = self.flag()
        if not flag.any():
            return np.zeros(self.num_classes + 1, dtype=np.int64)
        return np.bincount(self.corrected()[flag], minlength=self.num_classes + 1)[: self.num_classes + 1]

    def masks(self) -> dict[str, np.ndarray]:
        """The project masks of this state, copied (painting may go on while they are written):
        ``pseudo`` (automatic; uncertain saved as background), ``corrected``, ``corrected_flag`` and ``reviewed``."""
        return {MASK_PSEUDO: np.minimum(self.auto, self.num_classes), MASK_CORRECTED: self.corrected(), MASK_CORRECTED_FLAG: self.flag(),
                MASK_REVIEWED: self.reviewed.copy()}


def _onto(arr: np.ndarray, ds_from: float, shape: tuple[int, int], ds_to: float) -> np.ndarray:
    """A 2-D mask stored at ``ds_from`` level-0 px per pixel, resampled (nearest) onto a raster of
    ``shape`` at ``ds_to``; unchanged when it already fits."""
    if arr.shape == tuple(shape) and math.isclose(ds_from, ds_to, rel_tol=1e-6):
        return arr
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * ds_to / ds_from).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * ds_to / ds_from).astype(np.int64), arr.shape[1] - 1)
    return arr[rows[:, None], cols[None, :]]


def load_corrections(project: Any, slide_id: str, auto: np.ndarray, downsample: float) -> Corrections:
    """The editable state of a slide: the automatic mask ``auto`` (at ``downsample``) with the
    project's saved corrections and review marks on top. Masks saved at another resolution (the
    CAMs were recomputed with another max. side) are resampled onto ``auto``'s raster."""
    edits = Corrections(np.asarray(auto, dtype=np.uint8), project.classes.num_classes)
    corrected, flag, reviewed = (project.read_mask(slide_id, n) for n in PATHOLOGIST_MASKS)
    if corrected is not None and flag is not None:
        f = _onto(flag[0].astype(bool), flag[1], edits.auto.shape, downsample)
        c = _onto(corrected[0], corrected[1], edits.auto.shape, downsample)
        edits.data[f] = c[f] + 1
        edits.touched[:] = f
    if reviewed is not None:
        edits.reviewed[:] = _onto(reviewed[0].astype(bool), reviewed[1], edits.auto.shape, downsample)
    return edits


def with_uncertain(auto: np.ndarray, canvas: CamCanvas, classes: ClassTable, white_level: int | None) -> np.ndarray:
    """A saved automatic mask (uncertain tissue saved as background) with :func:`uncertain_index`
    put back on the background pixels that are tissue (not :func:`outside_canvas`)."""
    auto = np.asarray(auto, dtype=np.uint8).copy()
    if auto.shape == canvas.shape:
        auto[(auto == classes.background_index) & ~outside_canvas(canvas, white_level)] = uncertain_index(classes)
    return auto


def corrections_for_plan(project: Any, slide_id: str, plan: CamPlan) -> Corrections:
    """The editable state while a slide's CAMs are (re)computed on ``plan``: the saved automatic
    mask, when it was made on the same raster, with the saved corrections and review marks on top
    - the new tiles then replace the automatic values and keep every corrected pixel, so
    recomputing never drops the pathologist's work. Without a fitting saved mask the automatic
    values start as background (saved corrections are still applied, resampled)."""
    auto = np.full(plan.shape, project.classes.background_index, dtype=np.uint8)
    saved = project.read_mask(slide_id, MASK_PSEUDO)
    if saved is not None and saved[0].shape == tuple(plan.shape) and math.isclose(saved[1], plan.downsample, rel_tol=1e-6):
        auto = saved[0].astype(np.uint8)
    return load_corrections(project, slide_id, auto, plan.downsample)


def corrections_for_canvas(project: Any, slide_id: str, canvas: CamCanvas, cam_threshold: float, gating: float,
                           white_level: int | None) -> Corrections:
    """The editable state of a slide's saved layers (:func:`load_canvas`): its saved automatic mask
    (uncertain tissue put back, :func:`with_uncertain`), else one made from the saved CAMs at these
    thresholds, with the saved corrections and review marks on top."""
    saved = project.read_mask(slide_id, MASK_PSEUDO)
    auto = (with_uncertain(saved[0], canvas, project.classes, white_level) if saved is not None else
            pseudo_from_canvas(canvas, project.classes, cam_threshold, gating, white_level, uncertain=True))
    return load_corrections(project, slide_id, auto, canvas.downsample)


def load_canvas(project: Any, slide_id: str, refine: str = "none") -> CamCanvas | None:
    """The saved CAM canvas of a slide (``cam`` + ``cam_probs``, RGB read from the slide), or
    None when the slide has no saved CAMs; ``refine`` as :attr:`ReviewSettings.refine` (for
    masks made again from it, e.g. at another gating)."""
    cams = project.read_mask(slide_id, MASK_CAM)
    probs = project.read_mask(slide_id, MASK_CAM_PROBS)
    if cams is None or probs is None:
        return None
    arr, ds = cams
    parr, pds = probs
    tile = max(1, int(round(pds / ds)))
    logits = project.read_mask(slide_id, MASK_CAM_LOGITS)
    if logits is not None and logits[0].shape != arr.shape:
        logits = None  # a stale layer from another computation: the saved mask's rule cannot be redone
    regions = canvas_regions(project, slide_id, arr.shape[1:], ds)
    canvas = CamCanvas(arr.astype(np.float32), parr.astype(np.float32), tile, ds,
                       np.full(arr.shape[1:] + (3,), 255, dtype=np.uint8),
                       tissue=tissue_on_canvas(project, slide_id, arr.shape[1:], ds, regions),
                       logits=None if logits is None else logits[0].astype(np.float32))
    canvas.regions = regions
    canvas.refine, canvas.work_downsample = refine, project.grid(slide_id).downsample
    saved = project.read_mask(slide_id, MASK_REGION_PROBS) if canvas.regions else None
    if saved is not None:
        canvas.set_region_probs(saved[0])
    presence = project.read_mask(slide_id, MASK_CAM_PRESENCE) if canvas.logits is not None else None
    if presence is not None and presence[0].shape == (1, arr.shape[0] + 1):
        canvas.presence = presence[0][0].astype(np.float32)
    with project.open_slide(slide_id) as slide:
        h, w = canvas.shape
        canvas.rgb[:] = slide.read_scaled((0, 0), (w * ds, h * ds), (w, h))
    return canvas


# ---------------------------------------------------------------------------------------------
# runs and the compute job
# ---------------------------------------------------------------------------------------------
def list_runs(runs_dir: Path, prefix: str = "") -> list[Path]:
    """Run folders (holding a ``config.json``) under ``runs_dir``, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name.startswith(prefix) and (p / "config.json").is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_run(project: Any, run: str | Path | None) -> Path:
    """A classifier run: a folder path, a folder name under the project's ``runs/``, or (None)
    the newest ``cls-*`` run of the project - the Review panel's default choice."""
    if run is None:
        runs = list_runs(Path(project.runs_dir), CLASSIFIER_RUN_PREFIX)
        if not runs:
            raise TrainingError(f"{project.runs_dir}: no classifier run in this project yet; train one first "
                                "(Training panel, or histo-wsss train-cls PROJECT PROJECT/runs/cls-NAME)")
        return runs[0]
    p = Path(run).expanduser()
    for candidate in (p, Path(project.runs_dir) / str(run)):
        if (candidate / "config.json").is_file():
            return candidate
    raise TrainingError(f"{run}: not a training run folder (no config.json), neither as a path nor under {project.runs_dir}")


def calibrated_gating(run_dir: str | Path, which: str = "best") -> float | None:
    """The run's validation-chosen gating threshold (:func:`~.train.calibrated_prob_threshold`)
    rounded to the Review panel's slider step (0.01), or None when the run had no validation
    masks. Panel and command line start from the same value, so they make the same mask."""
    from napari_histo_wsss.core.stage1.train import calibrated_prob_threshold

    chosen = calibrated_prob_threshold(run_dir, which)
    return None if chosen is None else int(round(chosen * 100)) / 100


def run_presence(run_dir: str | Path, which: str, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The gating of ``pseudo-masks`` that the run's validation calibrated: ``(offsets (C,),
    presence)``. With a ``prob-area`` calibration: its offsets, and ``presence`` = ``[area floor,
    raw offsets minus those]`` (:attr:`CamCanvas.presence`); otherwise (a run trained before it)
    the ``prob-raw`` offsets and None; zeros when the run recorded no offsets (the plain raw argmax)."""
    from napari_histo_wsss.core.stage1.train import area_calibration, calibrated_offsets

    cal = area_calibration(run_dir, which)
    if cal is not None and len(cal.offsets) == num_classes:
        area, raw = np.asarray(cal.offsets, dtype=np.float32), np.asarray(cal.raw_offsets, dtype=np.float32)
        return area, np.concatenate([[cal.min_area], raw - area]).astype(np.float32)
    off = calibrated_offsets(run_dir, which, "prob-raw")
    if off is None or len(off) != num_classes:
        return np.zeros(num_classes, dtype=np.float32), None
    return np.asarray(off, dtype=np.float32), None


def _write_computed(project: Any, slide_id: str, canvas: CamCanvas, pseudo: np.ndarray) -> list[str]:
    # saved normalised once per slide (each class's peak = 1), as the pseudo-mask saw them
    scale = (1.0 / np.maximum(canvas.peaks(), _EPS)).astype(np.float32)
    project.write_mask(slide_id, MASK_CAM, (canvas.cams * scale[:, None, None]).astype(np.float16), canvas.downsample)
    project.write_mask(slide_id, MASK_CAM_PROBS, canvas.probs.astype(np.float16), canvas.downsample * canvas.tile)
    project.write_mask(slide_id, MASK_PSEUDO, pseudo, canvas.downsample)
    written = [MASK_CAM, MASK_CAM_PROBS, MASK_PSEUDO]
    if canvas.logits is not None:
        project.write_mask(slide_id, MASK_CAM_LOGITS, canvas.logits.astype(np.float16), canvas.downsample)
        written.append(MASK_CAM_LOGITS)
    else:
        project.delete_mask(slide_id, MASK_CAM_LOGITS)
    region_probs = canvas.region_probs()
    if region_probs is not None:
        project.write_mask(slide_id, MASK_REGION_PROBS, region_probs.astype(np.float16), 1.0)
        written.append(MASK_REGION_PROBS)
    else:
        project.delete_mask(slide_id, MASK_REGION_PROBS)
    if canvas.presence is not None and canvas.logits is not None:
        project.write_mask(slide_id, MASK_CAM_PRESENCE, canvas.presence[None].astype(np.float32), 1.0)
        written.append(MASK_CAM_PRESENCE)
    else:
        project.delete_mask(slide_id, MASK_CAM_PRESENCE)
    return written


def existing_computed(project: Any, slide_id: str) -> list[str]:
    """The layers of :data:`COMPUTED_MASKS` a slide already holds."""
    names = set(project.mask_names(slide_id))
    return [n for n in COMPUTED_MASKS if n in names]


def compute_slide_cams(
    project: Any,
    slide_id: str,
    run_dir: str | Path,
    settings: ReviewSettings | None = None,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    save: bool = True,
    keep_partial: bool = True,
    plan: CamPlan | None = None,
) -> Iterator[ProgressEvent]:
    """Compute a project slide's CAMs and automatic pseudo-mask with a classifier run and store
    them as the project masks ``cam``, ``cam_probs`` and ``pseudo`` (never the corrections).

    Yields ``start`` (its ``metrics`` hold the gating used), a :class:`CamTile` per tile (kind ``step``, with the tile's data for a
    live display), then ``done`` - or ``cancelled`` when ``should_stop()`` says so between tiles.
    With ``save`` the layers are written at the end (with ``keep_partial``, also when cancelled
    or closed early: the tiles computed so far, the others NaN/background); a slide that already
    holds them is an error unless ``overwrite``. ``plan``: the tiling (default
    :func:`plan_slide_cams` with the settings' tile and max. side). ``done``'s ``metrics`` hold
    the canvas shape and downsample, the tiles computed, the gating and what was written.
    """
    from napari_histo_wsss.core.device import pick_device
    from napari_histo_wsss.core.stage1.train import load_run

    s = settings or ReviewSettings()
    s.validate()
    stop = should_stop or (lambda: False)
    if save:
        if project.read_only:
            raise ProjectError(f"{project.root}: the project folder is read-only; copy it to a writable disk")
        existing = existing_computed(project, slide_id)
        if existing and not overwrite:
            raise ProjectError(f"{project.root / 'masks' / slide_id}: slide {slide_id} already holds "
                               f"{', '.join(existing)}; pass --overwrite to replace them (the pathologist's "
                               f"{', '.join(PATHOLOGIST_MASKS)} are never replaced)")
    run_dir = Path(run_dir)
    device = pick_device(s.device)
    model, run_classes, run_cfg = load_run(run_dir, which=s.which, map_location=device)
    mode = s.mode or run_cfg.cam_mode  # by default the CAMs the run was validated with
    classes = project.classes
    if run_classes.names != classes.names:
        raise TrainingError(f"{run_dir}: the run was trained on classes {', '.join(run_classes.names)}, "
                            f"the project has {', '.join(classes.names)}")
    if plan is None:
        plan = plan_slide_cams(project, slide_id, s.tile, s.max_side)
    gating = s.gating if s.gating is not None else calibrated_gating(run_dir, s.which)
    gating = 0.5 if gating is None else float(gating)
    offsets, presence = run_presence(run_dir, s.which, classes.num_classes) if s.rule == "raw" else (None, None)
    white = int(s.white_level) if classes.white_background else None
    refine = s.refine if s.rule == "raw" else "none"
    unrefined = refine == "crf" and not crf_available()
    if unrefined:
        refine = "none"
    canvas = new_canvas(project, slide_id, plan, s.rule, refine)
    canvas.presence = presence
    n = len(plan.tiles)
    start = {"gating": gating} | ({"presence": presence.tolist()} if presence is not None else {})
    yield ProgressEvent("start", steps=n, metrics=start, message=f"{slide_id}: {n} tiles with {run_dir.name} ({s.which}, {mode} CAMs, "
                        f"{device}); mask {plan.shape[1]}x{plan.shape[0]} px at {plan.downsample:.2f}x")
    if unrefined:
        yield ProgressEvent("log", message=f"{CRF_MISSING}; the pseudo-mask stays unrefined (refine none)")

    def write() -> list[str]:
        pseudo = pseudo_from_canvas(canvas, classes, s.cam_threshold, gating, white)
        return _write_computed(project, slide_id, canvas, pseudo)

    window = int(project.settings["patch_size"])
    try:
        with project.open_slide(slide_id) as slide:
            if canvas.regions:  # a patch folder: each image classified as pseudo-masks does, for its gating
                for ev in classify_images(model, slide, plan.work_downsample, mode, window, device, stop):
                    if ev.kind == "done":
                        canvas.set_region_probs(np.asarray(ev.metrics["region_probs"]))
                        yield ProgressEvent("log", metrics=ev.metrics, message=f"{slide_id}: {len(canvas.regions)} images classified")
                    elif ev.step % max(1, ev.steps // 10) == 0:  # a line per tenth, not per image
                        yield ProgressEvent("log", message=f"{slide_id}: {ev.message}")
            for tile in slide_cam_tiles(model, slide, plan, mode, window, device, stop, offsets=offsets):
                canvas.put(tile.ty, tile.tx, tile.cams, tile.probs, tile.rgb, tile.box, logits=tile.logits)
                yield tile
    except GeneratorExit:  # closed early (the GUI worker closes a job that ignores a stop): keep the tiles
        if save and keep_partial and canvas.computed_tiles():
            write()
        raise
    done = len(canvas.computed_tiles())
    cancelled = done < n
    if save and done and refine == "crf":
        yield ProgressEvent("log", message=f"{slide_id}: refining the pseudo-mask's borders (dense CRF)")
    written = write() if save and done and (keep_partial or not cancelled) else []
    metrics = {"tiles": done, "tiles_planned": n, "shape": list(plan.shape), "downsample": plan.downsample,
               "rule": s.rule, "refine": refine, "offsets": None if offsets is None else [float(v) for v in offsets],
               "cam_threshold": s.cam_threshold, "gating": gating, "white_level": white, "written": written}
    if cancelled:
        kept = f"the {done} computed tiles were saved" if written else "nothing was written"
        yield ProgressEvent("cancelled", step=done, steps=n, metrics=metrics,
                            message=f"{slide_id}: stopped after {done} of {n} tiles; {kept}")
        return
    yield ProgressEvent("done", step=n, steps=n, metrics=metrics,
                        message=f"{slide_id}: CAMs and pseudo-mask of {n} tiles" + (" saved" if written else ""))
