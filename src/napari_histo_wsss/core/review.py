"""Slide review: the CAMs and automatic pseudo-mask of a whole slide, and the pathologist's corrections.

Everything of one slide lives on one *canvas* (:class:`CamCanvas`): a single-level raster of the
slide at the project's working resolution, or coarser so that its longer side stays under
``max_side`` (napari cannot paint multiscale Labels and paints huge ones slowly). The canvas is
cut into square tiles (:func:`plan_cams`, laid with :func:`~.grid.axis_starts`); each tile
holding tissue is read from the slide at the working resolution and given to the run's
classifier (:func:`~.cams.cams_for_image`), which returns its CAMs and the tile's image-level
class probabilities (the gating of the pseudo-mask is per tile).

The automatic pseudo-mask of a tile is :func:`~.cams.class_scores` (cached per tile, it does not
depend on the CAM threshold) followed by :func:`~.cams.threshold_scores` - the same two steps
that :func:`~.cams.pseudo_mask` chains for image folders and stage two's MLPS sets - with the
white glass of :func:`~.tissue.white_background_mask` as background.

:func:`compute_slide_cams` is the one job that computes and stores a slide's layers; the Review
panel runs it in the background and ``histo-wsss cams`` from the command line. The project masks
(``masks/<slide>/<name>``, :meth:`~.project.Project.write_mask`) are named by the constants
below; stage two (:mod:`.train_seg`) reads the same names:

* ``cam`` (C, h, w) float16 and ``cam_probs`` (C, th, tw) float16, NaN on tiles not computed;
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
from napari_histo_wsss.core.slides.grid import axis_starts
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.slides.tissue import white_background_mask

__all__ = [
    "MASK_CAM",
    "MASK_CAM_PROBS",
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
    "PseudoTile",
    "plan_cams",
    "plan_slide_cams",
    "slide_cam_tiles",
    "pseudo_tile",
    "white_tile",
    "pseudo_from_canvas",
    "pseudo_tiles",
    "Corrections",
    "calibrated_gating",
    "list_runs",
    "resolve_run",
    "existing_computed",
    "compute_slide_cams",
    "load_canvas",
    "load_corrections",
    "corrections_for_plan",
]

# -- the project masks of the review step (one place; stage two reads them) --------------------
MASK_CAM = "cam"
MASK_CAM_PROBS = "cam_probs"
MASK_PSEUDO = "pseudo"
MASK_CORRECTED = "corrected"
MASK_CORRECTED_FLAG = "corrected_flag"
MASK_REVIEWED = "reviewed"
#: What :func:`compute_slide_cams` writes (recomputing replaces them).
COMPUTED_MASKS = (MASK_CAM, MASK_CAM_PROBS, MASK_PSEUDO)
#: The pathologist's work: written only from the Review panel's edits, never recomputed.
PATHOLOGIST_MASKS = (MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED)

#: Prefix of classifier run folders under a project's ``runs/``.
CLASSIFIER_RUN_PREFIX = "cls-"


@dataclass
class ReviewSettings:
    """How a slide's CAMs and automatic pseudo-mask are computed (the Review panel's form).

    ``which``: checkpoint (best/last); ``mode``: CAM type (see :data:`.models.classifier.CAM_MODES`;
    None: the run's own ``cam_mode``, the type its validation scored and ``pseudo-masks`` uses);
    ``tile``: tile side in model pixels (gating uses one class probability per tile);
    ``max_side``: the canvas's longer side at most; ``device``: auto, cpu, cuda[:N], mps;
    ``cam_threshold``: normalised CAM score below which a pixel is background; ``gating``: class
    probability that switches a class on in a tile (None: the run's calibrated threshold, see
    :func:`calibrated_gating`, else 0.5); ``white_level``: grey level above which a pixel is white
    glass (used when the class table has ``white_background``)."""

    which: str = "best"
    mode: str | None = None
    tile: int = 1024
    max_side: int = 4096
    device: str = "auto"
    cam_threshold: float = 0.2
    gating: float | None = None
    white_level: int = 200

    def validate(self) -> None:
        from napari_histo_wsss.core.models.classifier import CAM_MODES

        checks = [
            (self.mode is None or self.mode in CAM_MODES,
             f"CAM mode must be one of {', '.join(CAM_MODES)}, got {self.mode!r}"),
            (self.tile >= 32, f"tile must be at least 32 px, got {self.tile}"),
            (self.max_side >= 64, f"max. mask side must be at least 64 px, got {self.max_side}"),
            (0.0 <= self.cam_threshold <= 1.0, f"CAM threshold must lie in 0..1, got {self.cam_threshold}"),
            (self.gating is None or 0.0 <= self.gating <= 1.0, f"gating must lie in 0..1, got {self.gating}"),
            (0 <= self.white_level <= 255, f"white level must lie in 0..255, got {self.white_level}"),
        ]
        for ok, message in checks:
            if not ok:
                raise HistoWSSSError(f"review setting: {message}")


# ---------------------------------------------------------------------------------------------
# the canvas
# ---------------------------------------------------------------------------------------------
@dataclass
class CamCanvas:
    """CAMs of one slide on a single-level raster.

    ``cams`` (C, h, w) float32 in [0, 1]; ``probs`` (C, th, tw) float32 image-level probability
    of each class per tile, NaN where the tile was not computed (no tissue, or cancelled);
    ``tile`` canvas pixels per tile side; ``downsample`` level-0 pixels per canvas pixel; ``rgb``
    the slide at canvas resolution (white where not computed) for the white-background rule.
    """

    cams: np.ndarray
    probs: np.ndarray
    tile: int
    downsample: float
    rgb: np.ndarray
    #: cache of :func:`core.cams.class_scores` per (ty, tx, tile version, allowed classes); see
    #: :func:`pseudo_tile` (filled from the slider worker thread, so keys carry the tile version)
    scores: dict = field(default_factory=dict, repr=False, compare=False)
    versions: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, num_classes: int, shape: tuple[int, int], tile: int, downsample: float) -> "CamCanvas":
        h, w = shape
        th, tw = math.ceil(h / tile), math.ceil(w / tile)
        return cls(
            cams=np.zeros((num_classes, h, w), dtype=np.float32),
            probs=np.full((num_classes, th, tw), np.nan, dtype=np.float32),
            tile=int(tile), downsample=float(downsample),
            rgb=np.full((h, w, 3), 255, dtype=np.uint8),
        )

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

    def put(self, ty: int, tx: int, cams: np.ndarray, probs: np.ndarray, rgb: np.ndarray) -> tuple[slice, slice]:
        """Store one computed tile (already at canvas resolution, cropped to the canvas)."""
        sy, sx = self.tile_slices(ty, tx)
        self.cams[:, sy, sx] = cams
        self.rgb[sy, sx] = rgb
        self.probs[:, ty, tx] = probs
        self.versions[(ty, tx)] = self.versions.get((ty, tx), 0) + 1  # cached scores of the old tile go stale
        for key in [k for k in list(self.scores) if k[:2] == (ty, tx)]:
            self.scores.pop(key, None)
        return sy, sx


@dataclass(eq=False)
class CamTile(ProgressEvent):
    """A finished tile of :func:`slide_cam_tiles`: its CAMs (C, th, tw), class probabilities (C,)
    and RGB (th, tw, 3), at canvas resolution and cropped to the canvas."""

    kind: str = "step"
    ty: int = 0
    tx: int = 0
    cams: np.ndarray | None = field(default=None, repr=False)
    probs: np.ndarray | None = field(default=None, repr=False)
    rgb: np.ndarray | None = field(default=None, repr=False)


@dataclass(eq=False)
class PseudoTile(ProgressEvent):
    """A recomputed tile of the automatic mask (:func:`pseudo_tiles`)."""

    kind: str = "step"
    ty: int = 0
    tx: int = 0
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass
class CamPlan:
    """Where the tiles of a slide lie: canvas geometry and working resolution."""

    shape: tuple[int, int]        # canvas (h, w)
    downsample: float             # level-0 px per canvas px
    tile: int                     # canvas px per tile side
    work_downsample: float        # level-0 px per model input px
    tiles: list[tuple[int, int]] = field(default_factory=list)   # (ty, tx) holding tissue

    @property
    def tile_work(self) -> int:
        """Model input pixels per tile side."""
        return max(1, int(round(self.tile * self.downsample / self.work_downsample)))


def plan_cams(slide_dims: tuple[int, int], work_downsample: float, tile_work: int, max_side: int,
              tissue: Any = None) -> CamPlan:
    """Canvas at the working resolution (coarser if its longer side would exceed ``max_side``),
    non-overlapping tiles of ``tile_work`` model pixels laid by :func:`~.grid.axis_starts` (the
    last ones cropped at the canvas edge); tiles without tissue (per ``tissue.box_fraction``)
    are skipped."""
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


def _resize_stack(maps: np.ndarray, size: int) -> np.ndarray:
    """(C, s, s) float maps -> (C, size, size), area-averaged (bilinear when enlarging)."""
    if maps.shape[1] == size and maps.shape[2] == size:
        return maps
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    mode = "area" if maps.shape[1] >= size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(size, size), mode=mode, **kw)[0].numpy()


def slide_cam_tiles(model: Any, slide: Any, plan: CamPlan, mode: str, window: int, device: Any,
                    should_stop: Callable[[], bool]) -> Iterator[CamTile]:
    """The CAMs of each planned tile of an open slide, in plan order, at canvas resolution
    (:func:`~.cams.cams_for_image` on the tile read at the working resolution, then resized);
    returns early when ``should_stop()``."""
    from PIL import Image

    from napari_histo_wsss.core.stage1.cams import cams_for_image

    t0 = time.monotonic()
    n = len(plan.tiles)
    tw = plan.tile_work
    size0 = plan.tile * plan.downsample
    h, w = plan.shape
    for i, (ty, tx) in enumerate(plan.tiles, start=1):
        if should_stop():
            return
        rgb = slide.read_scaled((tx * size0, ty * size0), (size0, size0), (tw, tw))
        cams, probs = cams_for_image(model, rgb, device=device, mode=mode, window=window)
        cams = _resize_stack(cams, plan.tile)
        small = np.asarray(Image.fromarray(rgb).resize((plan.tile, plan.tile), Image.Resampling.BOX))
        ch, cw = min(plan.tile, h - ty * plan.tile), min(plan.tile, w - tx * plan.tile)
        yield CamTile(ty=ty, tx=tx, cams=cams[:, :ch, :cw], probs=probs, rgb=small[:ch, :cw], step=i, steps=n,
                      eta_s=(time.monotonic() - t0) / i * (n - i), message=f"tile {i}/{n}")


# ---------------------------------------------------------------------------------------------
# the automatic pseudo-mask
# ---------------------------------------------------------------------------------------------
def pseudo_tile(canvas: CamCanvas, classes: ClassTable, ty: int, tx: int, cam_threshold: float, gating: float,
                white: np.ndarray | None = None) -> np.ndarray:
    """The automatic pseudo-mask (uint8 class index, background = C) of one computed tile:
    :func:`~.cams.class_scores` gated by the tile's predicted probabilities (``gating``), then
    :func:`~.cams.threshold_scores` with ``cam_threshold`` as the background threshold; ``white``
    (the tile's white-glass mask) is background too. The threshold-independent scores are
    cached on the canvas per tile and gating, so moving the CAM-threshold slider costs one
    comparison per pixel."""
    from napari_histo_wsss.core.stage1.cams import allowed_classes, class_scores, threshold_scores

    allowed = allowed_classes(classes, probs=canvas.probs[:, ty, tx], prob_threshold=gating)
    key = (ty, tx, canvas.versions.get((ty, tx), 0), allowed.tobytes())
    parts = canvas.scores.get(key)
    if parts is None:
        sy, sx = canvas.tile_slices(ty, tx)
        parts = canvas.scores[key] = class_scores(canvas.cams[:, sy, sx], classes, allowed)
    return threshold_scores(*parts, classes, bg_threshold=cam_threshold, white=white)


def white_tile(canvas: CamCanvas, ty: int, tx: int, level: int | None) -> np.ndarray | None:
    """White glass (grey > ``level``, small specks kept as tissue) of one tile; None when ``level`` is None."""
    if level is None:
        return None
    sy, sx = canvas.tile_slices(ty, tx)
    return white_background_mask(canvas.rgb[sy, sx], grey_threshold=int(level))


def pseudo_from_canvas(canvas: CamCanvas, classes: ClassTable, cam_threshold: float, gating: float,
                       white_level: int | None) -> np.ndarray:
    """The automatic pseudo-mask of the whole canvas (tiles not computed are background)."""
    out = np.full(canvas.shape, classes.background_index, dtype=np.uint8)
    for ty, tx in canvas.computed_tiles():
        out[canvas.tile_slices(ty, tx)] = pseudo_tile(canvas, classes, ty, tx, cam_threshold, gating,
                                                      white_tile(canvas, ty, tx, white_level))
    return out


def pseudo_tiles(canvas: CamCanvas, classes: ClassTable, tiles: list[tuple[int, int]], cam_threshold: float,
                 gating: float, white_level: int | None, white_cache: dict,
                 should_stop: Callable[[], bool]) -> Iterator[PseudoTile]:
    """The automatic mask of ``tiles`` in the given order (the Review panel passes the visible
    ones first), one :class:`PseudoTile` each. White masks depend only on the white level and
    are cached per tile in ``white_cache``."""
    n = len(tiles)
    for i, (ty, tx) in enumerate(tiles, start=1):
        if should_stop():
            return
        key = (white_level, ty, tx)
        if key not in white_cache:
            white_cache[key] = white_tile(canvas, ty, tx, white_level)
        yield PseudoTile(ty=ty, tx=tx, mask=pseudo_tile(canvas, classes, ty, tx, cam_threshold, gating, white_cache[key]),
                         step=i, steps=n)


# ---------------------------------------------------------------------------------------------
# corrections
# ---------------------------------------------------------------------------------------------
class Corrections:
    """The editable mask (layer values = class index + 1, 0 = erased) and what the user changed in it.

    ``auto``: the automatic mask (class indices); ``touched``: pixels the user painted, filled or
    erased; ``reviewed``: pixels marked reviewed. The corrected flag is ``touched & (value !=
    automatic value)``, so undoing a stroke (the value returns to the automatic one) clears it."""

    def __init__(self, auto: np.ndarray, num_classes: int) -> None:
        self.num_classes = num_classes
        self.auto = auto
        self.data = (auto.astype(np.uint8) + 1)
        self.touched = np.zeros(auto.shape, dtype=bool)
        self.reviewed = np.zeros(auto.shape, dtype=bool)

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

    def flag(self) -> np.ndarray:
        """Pixels whose value differs from the automatic mask because the user changed them."""
        return self.touched & (self.data != self.auto + 1)

    def set_auto(self, auto: np.ndarray, region: tuple[slice, slice] | None = None) -> None:
        """New automatic values for the whole mask, or for ``region`` (``auto`` then holds just that
        region): thresholds moved or tiles arrived. Corrected pixels keep the user's value."""
        sl = region if region is not None else (slice(None), slice(None))
        touched, data = self.touched[sl], self.data[sl]
        keep = touched & (data != self.auto[sl] + 1)
        self.auto[sl] = auto
        self.data[sl] = np.where(keep, data, self.auto[sl] + 1)
        self.touched[sl] = keep

    def corrected(self) -> np.ndarray:
        """Class-index mask of the layer (erased pixels, value 0, become background C)."""
        out = self.data.astype(np.int16) - 1
        out[out < 0] = self.num_classes
        return out.astype(np.uint8)

    def area_per_class(self) -> np.ndarray:
        """Corrected pixels per resulting class index (0..C, C = background/erased)."""
        return np.bincount(self.corrected()[self.flag()], minlength=self.num_classes + 1)[: self.num_classes + 1]

    def masks(self) -> dict[str, np.ndarray]:
        """The project masks of this state, copied (painting may go on while they are written):
        ``pseudo`` (automatic), ``corrected``, ``corrected_flag`` and ``reviewed``."""
        return {MASK_PSEUDO: self.auto.copy(), MASK_CORRECTED: self.corrected(), MASK_CORRECTED_FLAG: self.flag(),
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


def load_canvas(project: Any, slide_id: str) -> CamCanvas | None:
    """The saved CAM canvas of a slide (``cam`` + ``cam_probs``, RGB read from the slide), or
    None when the slide has no saved CAMs."""
    cams = project.read_mask(slide_id, MASK_CAM)
    probs = project.read_mask(slide_id, MASK_CAM_PROBS)
    if cams is None or probs is None:
        return None
    arr, ds = cams
    parr, pds = probs
    tile = max(1, int(round(pds / ds)))
    canvas = CamCanvas(arr.astype(np.float32), parr.astype(np.float32), tile, ds,
                       np.full(arr.shape[1:] + (3,), 255, dtype=np.uint8))
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


def _write_computed(project: Any, slide_id: str, canvas: CamCanvas, pseudo: np.ndarray) -> list[str]:
    project.write_mask(slide_id, MASK_CAM, canvas.cams.astype(np.float16), canvas.downsample)
    project.write_mask(slide_id, MASK_CAM_PROBS, canvas.probs.astype(np.float16), canvas.downsample * canvas.tile)
    project.write_mask(slide_id, MASK_PSEUDO, pseudo, canvas.downsample)
    return list(COMPUTED_MASKS)


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

    Yields ``start``, a :class:`CamTile` per tile (kind ``step``, with the tile's data for a
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
    white = int(s.white_level) if classes.white_background else None
    canvas = CamCanvas.empty(classes.num_classes, plan.shape, plan.tile, plan.downsample)
    n = len(plan.tiles)
    yield ProgressEvent("start", steps=n, message=f"{slide_id}: {n} tiles with {run_dir.name} ({s.which}, {mode} CAMs, "
                        f"{device}); mask {plan.shape[1]}x{plan.shape[0]} px at {plan.downsample:.2f}x")

    def write() -> list[str]:
        pseudo = pseudo_from_canvas(canvas, classes, s.cam_threshold, gating, white)
        return _write_computed(project, slide_id, canvas, pseudo)

    window = int(project.settings["patch_size"])
    try:
        with project.open_slide(slide_id) as slide:
            for tile in slide_cam_tiles(model, slide, plan, mode, window, device, stop):
                canvas.put(tile.ty, tile.tx, tile.cams, tile.probs, tile.rgb)
                yield tile
    except GeneratorExit:  # closed early (the GUI worker closes a job that ignores a stop): keep the tiles
        if save and keep_partial and canvas.computed_tiles():
            write()
        raise
    done = len(canvas.computed_tiles())
    cancelled = done < n
    written = write() if save and done and (keep_partial or not cancelled) else []
    metrics = {"tiles": done, "tiles_planned": n, "shape": list(plan.shape), "downsample": plan.downsample,
               "cam_threshold": s.cam_threshold, "gating": gating, "white_level": white, "written": written}
    if cancelled:
        kept = f"the {done} computed tiles were saved" if written else "nothing was written"
        yield ProgressEvent("cancelled", step=done, steps=n, metrics=metrics,
                            message=f"{slide_id}: stopped after {done} of {n} tiles; {kept}")
        return
    yield ProgressEvent("done", step=n, steps=n, metrics=metrics,
                        message=f"{slide_id}: CAMs and pseudo-mask of {n} tiles" + (" saved" if written else ""))
