"""Whole-slide and image-folder prediction: tiled, batched, blended, written as it goes.

:func:`predict_slide` runs a ``predict_fn`` (a segmenter's softmax, or a classifier's CAMs) over
a slide at a working resolution (``target_mpp`` or an explicit ``downsample``):

* **Tiles.** A regular grid of ``tile`` px tiles with ``overlap`` px overlap (stride ``tile -
  overlap``) covers the working image; tiles without tissue (per the slide's tissue mask) are not
  read nor predicted and end up background. Tiles are read lazily from the slide by a small
  thread pool one batch ahead, so reading overlaps with compute.
* **Blending.** Each tile's scores are weighted by a separable cosine window whose ramps over the
  overlap sum to exactly one for neighbouring tiles (a partition of unity), so a pointwise model
  gives the same result tiled as whole, and the seams of a real model fade smoothly.
* **Bounded memory.** Tiles are visited row by row; only the not yet final margins are kept: the
  bottom ``overlap`` rows of the previous tile row (``K x overlap x width`` floats) and the right
  ``overlap`` columns of the previous tile. Finished blocks are written straight to the output,
  so a 100k x 100k slide needs the memory of a few batches plus one overlap strip, not of the
  slide.
* **Output.** An OME-Zarr label pyramid (:class:`~.export.LabelPyramid`), marked ``complete:
  false`` until the last block and the reduced levels are written. A cancelled run, a crash or a
  full disk leaves it marked incomplete (readers refuse it) and the error names the file.
  ``output="maps"`` stores the blended per-class float maps instead (slide CAM maps).

:func:`predict_image` / :func:`predict_folder` do the same for ordinary images (a folder of
patches -> palette PNGs with the same names).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import list_images, read_rgb, to_tensor
from napari_histo_wsss.core.device import autocast
from napari_histo_wsss.core.errors import HistoWSSSError, SlideError
from napari_histo_wsss.core.io.export import LabelPyramid, export_palette_png
from napari_histo_wsss.core.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from napari_histo_wsss.core.progress import ProgressEvent, run_to_end
from napari_histo_wsss.core.slides.grid import axis_starts, cosine_window, working_downsample
from napari_histo_wsss.core.slides.tissue import white_background_mask

if TYPE_CHECKING:
    from napari_histo_wsss.core.slides.slide import Slide
    from napari_histo_wsss.core.slides.tissue import TissueMask

__all__ = [
    "PredictFn",
    "cosine_window",
    "TilePlan",
    "plan_tiles",
    "segmenter_predict_fn",
    "cam_predict_fn",
    "with_flip_tta",
    "predict_slide",
    "predict_image",
    "predict_folder",
    "run_to_end",
]

#: ``(B, 3, H, W)`` ImageNet-normalised float tensor -> ``(B, K, H, W)`` scores (probabilities).
PredictFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TilePlan:
    """Where the tiles go: working image ``(height, width)`` at ``downsample`` level-0 px per
    working px, a ``rows x cols`` grid of ``tile`` px tiles every ``stride`` px, and which of
    them hold tissue (``active``, ``(rows, cols)`` bool)."""

    height: int
    width: int
    downsample: float
    tile: int
    overlap: int
    active: np.ndarray

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def rows(self) -> int:
        return int(self.active.shape[0])

    @property
    def cols(self) -> int:
        return int(self.active.shape[1])


def plan_tiles(slide: Slide, tile: int = 512, overlap: int = 64, downsample: float = 1.0,
               tissue: TissueMask | None | bool = None, min_tissue: float = 0.0) -> TilePlan:
    """Lay the tile grid over the slide. ``tissue``: a mask, ``None`` (detect it) or ``False``
    (predict every tile). A slide where no tile holds tissue is a :class:`SlideError`."""
    if tile < 32:
        raise HistoWSSSError(f"tile must be at least 32 px, got {tile}")
    w0, h0 = slide.dimensions
    ds = float(downsample)
    width, height = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    stride = tile - overlap
    cosine_window(tile, overlap)  # validates the overlap
    rows = len(axis_starts(height, tile, stride, flush=False))  # a regular lattice: the streaming blend needs it
    cols = len(axis_starts(width, tile, stride, flush=False))
    if tissue is False:
        active = np.ones((rows, cols), dtype=bool)
    else:
        if tissue is None or tissue is True:
            from napari_histo_wsss.core.slides.tissue import detect_tissue

            tissue = detect_tissue(slide)
        ys, xs = np.meshgrid(np.arange(rows) * stride * ds, np.arange(cols) * stride * ds, indexing="ij")
        frac = tissue.box_fractions(xs.ravel(), ys.ravel(), tile * ds, tile * ds).reshape(rows, cols)
        active = frac > min_tissue if min_tissue > 0 else frac > 0
        if not active.any():
            raise SlideError(f"{slide.path}: no tissue found on the slide (tissue share {tissue.fraction():.4f}); "
                             "nothing to predict - check the slide or predict without tissue detection")
    return TilePlan(height, width, ds, int(tile), int(overlap), active)


# ---------------------------------------------------------------------------------------------
# predict functions
# ---------------------------------------------------------------------------------------------
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _white_glass(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float 1.0 on white glass of a normalised batch, by the package's one rule
    (:func:`~.tissue.white_background_mask` of each de-normalised tile). Prediction keeps every
    white pixel as glass (``min_size=0``, no speck removal): that is the rule every stage-two
    figure in docs/benchmarks.md was measured with; the de-normalised floats give exactly the
    grey levels of the original uint8 pixels (checked over all 2**24 colours in the tests)."""
    rgb = ((x.detach().cpu().float() * _STD + _MEAN) * 255.0).permute(0, 2, 3, 1).numpy()
    glass = np.stack([white_background_mask(im, min_size=0) for im in rgb])
    return torch.from_numpy(glass).to(torch.float32)[:, None]


def segmenter_predict_fn(model: torch.nn.Module, classes: ClassTable, device: torch.device | str | None = None,
                         gate: torch.nn.Module | None = None, gate_threshold: float = 0.5,
                         white_background: bool | None = None, amp: bool = True) -> PredictFn:
    """Softmax of a :class:`~.models.Segmenter` as a predict function with ``C + 1`` channels:
    the tissue classes and a background channel that is 1 on white glass (grey > 200, for class
    tables with ``white_background``) and 0 elsewhere, so the argmax gives class ``C`` there.

    ``gate``: the stage-one :class:`~.models.CAMClassifier`; tissue classes whose image-level
    probability on the tile is below ``gate_threshold`` are switched off (MLPS test-time gating;
    the most probable class always stays)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    if gate is not None:
        gate.to(dev).eval()
    white = classes.white_background if white_background is None else white_background
    c = classes.num_classes

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        glass = _white_glass(x) if white else None
        x = x.to(dev, non_blocking=True)
        with autocast(dev, amp):
            logits = model(x)
        prob = torch.softmax(logits.float()[:, :c], dim=1)
        if gate is not None:
            with autocast(dev, amp):
                p = torch.sigmoid(gate(x).float())
            keep = p >= gate_threshold
            keep[torch.arange(p.shape[0]), p.argmax(dim=1)] = True
            prob = prob * keep[:, :, None, None]
            prob = prob / prob.sum(dim=1, keepdim=True).clamp_min(1e-6)
        bg = glass.to(dev) if glass is not None else torch.zeros_like(prob[:, :1])
        return torch.cat([prob * (1 - bg), bg], dim=1)

    return predict


def cam_predict_fn(model: torch.nn.Module, device: torch.device | str | None = None, mode: str = "multi") -> PredictFn:
    """A :class:`~.models.CAMClassifier`'s class activation maps (``C`` channels, per tile
    max-normalised) as a predict function, for slide CAM maps (``output="maps"``)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        return model.cams(x.to(dev), mode=mode).float()

    return predict


def with_flip_tta(fn: PredictFn) -> PredictFn:
    """Average ``fn`` over the input, its horizontal and its vertical flip (flipped back)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        out = out + torch.flip(fn(torch.flip(x, dims=[3])), dims=[3])
        out = out + torch.flip(fn(torch.flip(x, dims=[2])), dims=[2])
        return out / 3.0

    return predict


# ---------------------------------------------------------------------------------------------
# whole-slide prediction
# ---------------------------------------------------------------------------------------------
class _Writer:
    """Writes finished blocks on a background thread (compression and I/O overlap compute); the
    first failure is re-raised on the caller's thread at the next :meth:`put` or :meth:`close`."""

    def __init__(self, pyramid: LabelPyramid, max_pending: int = 8):
        self._pyr = pyramid
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="histo-wsss-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                y0, x0, data, finalise = item
                try:
                    self._pyr.write_block(y0, x0, finalise(data))
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = e

    def put(self, y0: int, x0: int, data: Any, finalise: Callable[[Any], np.ndarray]) -> None:
        """Queue ``finalise(data)`` to be written at ``(y0, x0)`` of level 0."""
        if self._error is not None:
            raise self._error
        self._q.put((y0, x0, data, finalise))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _read_tile(slide: Slide, plan: TilePlan, r: int, c: int) -> torch.Tensor:
    """Tile (r, c) read from the slide at the working resolution, as a normalised tensor."""
    t, ds = plan.tile, plan.downsample
    x, y = c * plan.stride, r * plan.stride
    if ds == 1.0:
        rgb = slide.read_region((x, y), 0, (t, t))
    else:
        rgb = slide.read_scaled((x * ds, y * ds), (t * ds, t * ds), (t, t))
    return to_tensor(rgb)


def predict_slide(
    slide: Slide,
    predict_fn: PredictFn,
    out_path: str | Path,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    target_mpp: float | None = None,
    tissue: TissueMask | None | bool = None,
    tta: bool = False,
    should_stop: Callable[[], bool] | None = None,
    classes: ClassTable | None = None,
    downsample: float | None = None,
    output: str = "labels",
    overwrite: bool = False,
    read_workers: int = 2,
) -> Iterator[ProgressEvent]:
    """Predict a whole slide into an OME-Zarr pyramid at ``out_path`` (see the module doc).

    ``predict_fn`` maps a normalised batch ``(B, 3, tile, tile)`` to ``(B, K, tile, tile)`` scores
    (:func:`segmenter_predict_fn`: ``K = C + 1`` with background last; :func:`cam_predict_fn`:
    ``K = C``). ``output="labels"`` stores the argmax (class indices; pixels no tile covered are
    background ``C``), ``"maps"`` the ``C`` blended maps as float16. ``tissue``: a tissue mask,
    ``None`` to detect one, ``False`` to predict every tile. ``tta`` adds flip test-time
    augmentation. ``classes`` is required (it names and colours the output).

    Memory: a few batches of tiles plus the carried overlap margins of one row of tissue tiles.

    Yields ``start``, a ``step`` per batch (tiles done, ETA), then ``done`` with throughput
    figures in ``metrics`` or ``cancelled`` (``should_stop()`` polled per batch; the output
    stays marked incomplete). Closing the generator also leaves it incomplete.
    """
    if classes is None:
        raise HistoWSSSError("predict_slide needs the class table (classes=...) to label its output")
    if output not in ("labels", "maps"):
        raise HistoWSSSError(f"output must be 'labels' or 'maps', got {output!r}")
    if batch_size < 1:
        raise HistoWSSSError(f"batch size must be >= 1, got {batch_size}")
    ds = working_downsample(slide, target_mpp, downsample, strict=True)  # never predict at a silently wrong scale
    plan = plan_tiles(slide, tile, overlap, ds, tissue)
    fn = with_flip_tta(predict_fn) if tta else predict_fn
    c = classes.num_classes
    bg = classes.background_index
    stride, t, ov = plan.stride, plan.tile, plan.overlap
    win1 = cosine_window(t, ov)
    window = torch.from_numpy(np.outer(win1, win1))
    mpp = getattr(slide, "mpp", None)
    pyr = LabelPyramid.create(out_path, (plan.height, plan.width), classes, downsample=ds, mpp=mpp,
                              kind=output, chunk=stride, overwrite=overwrite,  # one finished block = one chunk
                              fill_index=bg if output == "labels" else None,
                              extra={"slide": str(getattr(slide, "path", "")), "tile": t, "overlap": ov,
                                     "tta": bool(tta), "tiles_total": int(plan.active.size),
                                     "tiles_tissue": int(plan.active.sum())})
    writer = _Writer(pyr)
    active = [(int(r), int(col)) for r, col in zip(*np.nonzero(plan.active))]  # row-major
    n_active = len(active)
    batches = [active[i:i + batch_size] for i in range(0, n_active, batch_size)]
    pool = ThreadPoolExecutor(max_workers=max(1, read_workers), thread_name_prefix="histo-wsss-read")

    def submit(batch: Sequence[tuple[int, int]]) -> list[Future]:
        return [pool.submit(_read_tile, slide, plan, r, col) for r, col in batch]

    try:
        yield ProgressEvent("start", steps=n_active, message=f"{n_active} of {plan.active.size} tiles hold tissue; "
                            f"working image {plan.width}x{plan.height} px at downsample {ds:g}")
    except BaseException:  # closed at the start: nothing is left running, no staging folder behind
        pool.shutdown(wait=False)
        writer.close()
        pyr.abort()
        raise
    # -- streaming blend state ------------------------------------------------------------------
    k_acc = None  # channels of the score accumulators (set at the first prediction)
    # Carries of not yet final margins, only where something was predicted: per column the
    # bottom ``ov`` rows of the tile row above (K+1, ov, w) and the right ``ov`` columns of the
    # previous tile (K+1, t, ov). Memory grows with the tissue's width, not the slide's.
    top: dict[int, torch.Tensor] = {}
    bottom: dict[int, torch.Tensor] = {}
    right: torch.Tensor | None = None
    scores: dict[tuple[int, int], torch.Tensor] = {}
    cursor = 0  # next tile (row-major) to blend
    t_start = time.perf_counter()
    t_compute = t_read_wait = 0.0
    tiles_done = 0
    finished = False

    def finalise(acc: torch.Tensor) -> np.ndarray:
        """Normalised result of a finished block ``acc`` (K+1, h, w); runs on the writer thread."""
        a = acc.numpy()  # numpy's argmax over a short first axis is several times faster than torch's
        weight = a[-1]
        if output == "labels":
            lab = np.argmax(a[:-1], axis=0).astype(np.uint8)
            lab[weight <= 0] = bg
            return lab
        return a[:c] / np.where(weight > 0, weight, 1.0)

    def emit_block(r: int, col: int, acc: torch.Tensor) -> None:
        writer.put(r * stride, col * stride, acc, finalise)

    def blend_until(limit: int) -> None:
        """Blend tiles cursor..limit-1 (row-major) whose scores are known (or that are inactive).
        A tile with no score and nothing carried into it is skipped: the output's fill value is
        already background, so glass costs neither arithmetic, memory nor disk."""
        nonlocal cursor, top, bottom, right
        while cursor < limit:
            r, col = divmod(cursor, plan.cols)
            if col == 0:
                top, bottom, right = bottom, {}, None
            cursor += 1
            s = scores.pop((r, col), None)
            carried = top.pop(col, None)
            if s is None and right is None and carried is None:
                continue
            last_col, last_row = col == plan.cols - 1, r == plan.rows - 1
            fw = t if last_col else stride
            fh = t if last_row else stride
            acc = torch.zeros((k_acc, t, t)) if s is None else s
            had_right = right is not None
            if right is not None:
                acc[:, :, :ov] += right
            if carried is not None:
                acc[:, :ov, :fw] += carried
            # What this tile hands on: its right and bottom margins. A tile without a score of its
            # own only passes on what the previous tile carried into its bottom-left corner.
            right = acc[:, :, stride:].clone() if s is not None and not last_col and ov else None
            if not last_row and ov and (s is not None or had_right):
                bottom[col] = acc[:, stride:, :fw].clone()
            emit_block(r, col, acc[:, :fh, :fw])

    try:
        pending = submit(batches[0]) if batches else []
        for bi, batch in enumerate(batches):
            if should_stop is not None and should_stop():
                yield ProgressEvent("cancelled", step=tiles_done, steps=n_active,
                                    message=f"stopped after {tiles_done} of {n_active} tiles; " + (
                                        f"the previous {pyr.path} is kept" if pyr.replacing else f"{pyr.root} is incomplete"))
                return
            t0 = time.perf_counter()
            x = torch.stack([f.result() for f in pending])
            t_read_wait += time.perf_counter() - t0
            pending = submit(batches[bi + 1]) if bi + 1 < len(batches) else []
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(x).float().cpu()
            t_compute += time.perf_counter() - t0
            if out.ndim != 4 or out.shape[0] != len(batch) or tuple(out.shape[-2:]) != (t, t):
                raise HistoWSSSError(f"predict function returned shape {tuple(out.shape)} for a batch of "
                                     f"{len(batch)} tiles of {t} px")
            if k_acc is None:
                k_acc = out.shape[1] + 1
                if output == "maps" and out.shape[1] < c:
                    raise HistoWSSSError(f"predict function gives {out.shape[1]} maps for {c} classes")
            for (r, col), o in zip(batch, out):
                acc = torch.empty((k_acc, t, t))
                torch.mul(o, window, out=acc[:-1])
                acc[-1] = window
                scores[(r, col)] = acc
            tiles_done += len(batch)
            blend_until(batch[-1][0] * plan.cols + batch[-1][1] + 1)
            elapsed = time.perf_counter() - t_start
            yield ProgressEvent("step", step=tiles_done, steps=n_active, eta_s=elapsed / tiles_done * (n_active - tiles_done),
                                message=f"{tiles_done}/{n_active} tiles")
        if k_acc is None:
            k_acc = (c + 1 if output == "labels" else c) + 1
        blend_until(plan.active.size)
        writer.close()
        pyr.finish()
        finished = True
        elapsed = time.perf_counter() - t_start
        metrics = {"tiles": n_active, "seconds": elapsed, "tiles_per_s": n_active / max(elapsed, 1e-9),
                   "compute_s": t_compute, "read_wait_s": t_read_wait,
                   "compute_share": t_compute / max(elapsed, 1e-9), "downsample": ds,
                   "shape": [plan.height, plan.width]}
        yield ProgressEvent("done", step=n_active, steps=n_active, metrics=metrics,
                            message=f"wrote {pyr.root} ({plan.width}x{plan.height} px, {n_active} tiles in {elapsed:.1f} s)")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if not finished:
            try:
                writer.close()
            except BaseException:  # noqa: BLE001 - the first error is already propagating
                pass
            pyr.abort()  # an unfinished replacement is dropped; the previous output stays whole


# ---------------------------------------------------------------------------------------------
# ordinary images
# ---------------------------------------------------------------------------------------------
def predict_image(rgb: np.ndarray, predict_fn: PredictFn, tile: int = 512, overlap: int = 64,
                  tta: bool = False) -> np.ndarray:
    """``(K, H, W)`` float32 blended scores of one RGB image: whole when it fits in a tile
    (padded with white to a multiple of 32 px), else in overlapping cosine-blended tiles."""
    fn = with_flip_tta(predict_fn) if tta else predict_fn
    h, w = rgb.shape[:2]
    if max(h, w) <= tile:
        ph, pw = (-h) % 32, (-w) % 32
        padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255) if ph or pw else rgb
        with torch.no_grad():
            out = fn(to_tensor(padded)[None]).float().cpu()[0]
        return out[:, :h, :w].numpy()
    stride = tile - overlap
    win = torch.from_numpy(np.outer(cosine_window(tile, overlap), cosine_window(tile, overlap)))
    ys, xs = axis_starts(h, tile, stride, flush=False), axis_starts(w, tile, stride, flush=False)
    canvas = np.full((ys[-1] + tile, xs[-1] + tile, 3), 255, dtype=np.uint8)  # white past the edges
    canvas[:h, :w] = rgb
    acc = weight = None
    for y0 in ys:
        for x0 in xs:
            with torch.no_grad():
                out = fn(to_tensor(canvas[y0:y0 + tile, x0:x0 + tile])[None]).float().cpu()[0]
            if acc is None:
                acc = torch.zeros((out.shape[0],) + canvas.shape[:2])
                weight = torch.zeros(canvas.shape[:2])
            acc[:, y0:y0 + tile, x0:x0 + tile] += out * win
            weight[y0:y0 + tile, x0:x0 + tile] += win
    return (acc / weight)[:, :h, :w].numpy()


def predict_folder(images_dir: str | Path, out_dir: str | Path, predict_fn: PredictFn, classes: ClassTable,
                   tile: int = 512, overlap: int = 64, tta: bool = False,
                   should_stop: Callable[[], bool] | None = None, overwrite: bool = False) -> Iterator[ProgressEvent]:
    """Class-index palette PNGs ``out_dir/<stem>.png`` for every image of ``images_dir`` (argmax
    of :func:`predict_image`; with :func:`segmenter_predict_fn` the last channel is background).

    ``out_dir`` appears whole or not at all: the masks are written in a hidden folder beside it
    that replaces it at the end (:func:`~.atomic.replace_dir`), so a cancel or an error leaves no
    half-filled folder and an older ``out_dir`` untouched. An existing, non-empty ``out_dir`` needs
    ``overwrite`` (then it is replaced as a whole); it may never be, hold or lie in ``images_dir``."""
    from napari_histo_wsss.core.errors import Cancelled
    from napari_histo_wsss.core.io.atomic import check_output, replace_dir

    images = list_images(images_dir)
    if not images:
        raise HistoWSSSError(f"{images_dir}: no images found")
    out = check_output(out_dir, inputs=[images_dir], overwrite=overwrite, what="output folder", folder=True)
    kept = f"the previous {out} is kept" if out.exists() else f"nothing written to {out}"
    n = len(images)
    t0 = time.perf_counter()
    done = 0
    try:
        with replace_dir(out) as tmp:
            for i, (stem, path) in enumerate(images.items(), start=1):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped after {done} of {n} images; {kept}")
                scores = predict_image(read_rgb(path), predict_fn, tile, overlap, tta)
                if scores.shape[0] not in (classes.num_classes, classes.num_classes + 1):
                    raise HistoWSSSError(f"predict function gives {scores.shape[0]} channels for {classes.num_classes} classes")
                export_palette_png(np.argmax(scores, axis=0).astype(np.uint8), tmp / f"{stem}.png", classes)
                done = i
                el = time.perf_counter() - t0
                yield ProgressEvent("step", step=i, steps=n, eta_s=el / i * (n - i), message=path.name)
    except Cancelled as e:
        yield ProgressEvent("cancelled", step=done, steps=n, message=str(e))
        return
    yield ProgressEvent("done", step=n, steps=n, message=f"{n} masks written to {out}")
