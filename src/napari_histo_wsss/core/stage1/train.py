"""Stage one: training the CAM classifier, as a cancellable generator of progress events.

:func:`train_classifier` trains for every option of :class:`TrainConfig` (plain CAM or the
SegMix shuffle curriculum, Progressive Dropout Attention, a PSCL-style contrastive term). It
yields :class:`~.progress.ProgressEvent` objects that a CLI progress bar and a napari
``thread_worker`` consume alike, and it polls ``should_stop`` between steps. The loop is the
shared training skeleton (:func:`~.engine.run_training`, also stage two's); this module supplies
its :class:`ClassifierTask` (data, model, SegMix/PDA/PSCL loss, validation, selection signal).

A run folder holds::

    config.json          the TrainConfig (written first, atomically)
    classes.json         the class table the model is trained for
    dataset.json         the training dataset's folder and layout (stage two reads it) and a
                         fingerprint of its patch list (a resume on other patches is refused)
    metrics.jsonl        one JSON object per finished epoch (losses, validation scores, timing,
                         the SegMix scheduler state), rewritten atomically each epoch
    checkpoints/last.pt  model + optimizer + scheduler + RNG state, after every epoch and on cancel
    checkpoints/best.pt  the model of the best epoch by the selection signal

Every file is written through :mod:`core.io.atomic`, so a run killed at any point can be resumed
from ``last.pt`` (``resume=True``) and reproduces, on the CPU, exactly what the uninterrupted
run would have computed: the data order is a function of ``(seed, epoch)``, each item's
augmentation of ``(seed, epoch, index)``, each SegMix shuffle and each step's synthetic images
(``synth_share``) of ``(seed, epoch, step)``, and the
global torch RNG (drop-connect) is saved with the checkpoint.

Feedback and model selection. With validation images that have masks (``val/`` of the dataset),
the signal is the pseudo-mask mIoU on them (CAMs gated by the image labels that the masks give,
white background removed, scored with :mod:`core.metrics`); otherwise the image-level validation
loss on a held-out share of the training patches. The same signal drives the SegMix curriculum
(:class:`~.segmix.SegMixScheduler`) and picks ``best.pt``.

Distributed training: under ``torchrun`` (``WORLD_SIZE`` in the environment) the same loop runs
data-parallel through :class:`~.distributed.DistContext`: each of N ranks trains on ``B / N``
images of every global batch of ``B`` (rank ``r`` takes every N-th index of the epoch order,
so the ranks' shares together are the single-process batch), DistributedDataParallel averages
the gradients, batch norms use the statistics of the global batch, losses are averaged and
cancel requests and non-finite losses are agreed by all ranks, every rank validates the same
(synchronised) model, and only rank 0 writes files. With plain CAM the run matches the
single-process run of the same global batch (tests/test_distributed.py); a SegMix shuffle mixes
tiles within each rank's share of the batch, and each rank makes the synthetic share of its own
share (seeded with its rank).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import (
    DatasetSpec,
    MaskedSample,
    WeakLabelDataset,
    WeakSample,
    image_size,
    load_dataset,
)
from napari_histo_wsss.core.device import autocast
from napari_histo_wsss.core.engine import (  # noqa: F401 - build_optimizer, lr_at: re-exported, older imports read them here
    Batches,
    EpochSummary,
    RunContext,
    TrainingTask,
    build_optimizer,
    common_setting,
    item_seed,
    lr_at,
    make_loader,
    run_training,
)
from napari_histo_wsss.core.errors import DatasetError, HistoWSSSError, TrainingError
from napari_histo_wsss.core.models import CAMClassifier, check_classes, load_model
from napari_histo_wsss.core.models.backbones import OUTPUT_STRIDES
from napari_histo_wsss.core.models.classifier import CAM_MODES, HEADS, PDA_START, normalize_cams, pda_threshold_at
from napari_histo_wsss.core.progress import EVENT_KINDS, ProgressEvent  # noqa: F401 - re-exported: older imports read them here
from napari_histo_wsss.core.runs import checkpoint_file, read_metrics
from napari_histo_wsss.core.settings import Settings, positive_sum, setting
from napari_histo_wsss.core.stage1.segmix import SegMixScheduler, default_tiles, segmix_batch
from napari_histo_wsss.core.stage1.synthesis import PatchReadError, SyntheticBatches, pixel_loss
from napari_histo_wsss.core.stage2.synthesis import SYNTHESIS_KINDS

__all__ = [
    "TrainConfig",
    "ProgressEvent",
    "train_classifier",
    "load_run",
    "build_model",
    "build_optimizer",
    "epoch_indices",
    "lr_at",
    "supcon_loss",
    "evaluate_pseudo_masks",
]

METHODS = ("cam", "segmix")
FEEDBACKS = ("auto", "miou", "loss")

# Sections of `histo-wsss train-cls --help` and of the Training panel's "Advanced" form.
_RUN, _OPT, _MODEL, _DATA, _PERF = "training settings", "optimisation", "model and CAMs", "data and validation", "performance"
_SEGMIX, _EXTRA = "SegMix curriculum (method segmix)", "Progressive Dropout Attention and contrastive term"
_SYNTH = "synthetic images (Mosaic/Bezier with exact masks)"


def _synthesis_kinds(kinds: Sequence[str]) -> str | None:
    """Problem of synthesis kinds outside mosaic/bezier, or None. (A rule rather than choices:
    the Training panel then shows the pair as one editable list, not a single-choice box.)"""
    bad = [k for k in kinds if k not in SYNTHESIS_KINDS]
    return f"must be among {', '.join(SYNTHESIS_KINDS)}, not {', '.join(map(str, bad))}" if bad else None


@dataclass
class TrainConfig(Settings):
    """Everything that defines a classifier training run (saved as the run's ``config.json``).

    Each field is declared once with its help, range and choices (:func:`~.settings.setting`);
    validation, ``config.json``, the resume rule, the ``train-cls`` options and the Training
    panel's form all come from these declarations.

    Model: ``backbone``, ``weights`` (``"imagenet"``, ``"none"`` or a .pth path), ``output_stride``,
    ``cam_weights`` (last / stride-16 / stride-8 maps fused by ``cam_mode="multi"``).
    Data: ``patch_size`` (side the patches are resized to; ``None`` = the most common side of the
    training images, which must not be smaller), ``augment`` (flips, 90-degree turns, mild
    colour jitter), ``val_fraction`` (training patches held out for the validation loss when the
    dataset has no validation images with masks), ``val_max_images`` (cap on validation images
    scored per epoch; ``None`` = all).
    Optimisation: AdamW with ``lr`` for the pretrained backbone and ``lr * head_lr_mult`` for the
    new layers, linear warm-up over ``warmup_steps`` then cosine decay to zero,
    ``max_steps_per_epoch`` to cap an epoch (``None`` = one pass over the data).
    Methods: ``method`` ``"cam"`` (plain multi-label CAM) or ``"segmix"`` (tile shuffle with the
    feedback curriculum: ``segmix_tiles`` (``None`` = about 1/2, 1/4, 1/7 of the patch, multiples
    of the feature stride), ``segmix_shares``, ``segmix_warmup`` unshuffled epochs,
    ``segmix_decay`` of the threshold, ``segmix_schedule`` ``"time"``/``"feedback"``, ``segmix_targets``
    ``"area"``/``"union"``);
    ``pda`` (MLPS Progressive Dropout Attention on MLPS's schedule scaled to the run: from the
    share ``pda_start`` of the run, or from epoch ``pda_start_epoch`` when set, the threshold
    ``pda_decay ** (20 x share done)``, floor 0.65: 0.94 at 15 % of the run, see
    :func:`~.models.classifier.pda_threshold_at`); ``pscl`` (supervised contrastive term on last-stage features
    labelled by their gated CAM argmax, weight ``pscl_weight``, temperature ``pscl_temperature``,
    pixels whose normalised CAM is below ``pscl_min_score`` left out).
    Synthesis (issue 10, :mod:`~.stage1.synthesis`): ``synth_share`` of each batch is replaced by
    ``synth_kinds`` Mosaic/Bezier images made from single-label training patches, labelled by the
    classes of their exact masks, and ``synth_pixel_weight`` adds a cross-entropy of the CAM
    logits against those masks on the CAM grid.
    ``feedback``: ``"auto"`` (val pseudo-mask mIoU when validation masks exist, else val loss),
    ``"miou"`` or ``"loss"``; it drives SegMix and picks ``best.pt``.

    Defaults follow docs/benchmarks/stage1.md: plain CAM (SegMix did not beat it in the short
    CPU runs measured there), output stride 32 (stride 16 dilates the last
    stages, which PyTorch runs about ten times slower on CPUs for depthwise convolutions, for
    no measured gain in pseudo-mask mIoU) and single-layer CAMs (``"last"``), which scored
    above the multi-layer fusion in every measured run.
    """

    what = "training setting"
    error = TrainingError

    method: str = setting("cam", choices=METHODS, basic=True, group=_RUN,
                          help="cam (plain CAM classifier) or segmix (tile-shuffle curriculum)")
    epochs: int = setting(6, range=(1, None), basic=True, resumable=True, group=_RUN, help="number of epochs")
    batch_size: int = setting(16, range=(1, None), basic=True, group=_RUN, help="patches per step")
    lr: float = setting(3e-4, range=(0, None), open="lo", basic=True, group=_RUN, label="Learning rate", decimals=6,
                        step=1e-4, help="learning rate of the pretrained backbone (new layers: x head_lr_mult)")
    head_lr_mult: float = common_setting("head_lr_mult")
    weight_decay: float = common_setting("weight_decay")
    warmup_steps: int = common_setting("warmup_steps")
    max_steps_per_epoch: int | None = common_setting("max_steps_per_epoch")
    steps: int | None = setting(300, range=(1, None), none="epochs", basic=True, group=_OPT, label="Total steps",
                                help="optimizer steps of the whole run, spread over the epochs (default: epochs x one "
                                     "pass over the patches); patches are drawn again once all were seen")
    crop_size: int | None = setting(128, range=(32, None), none="whole", group=_DATA, label="Random crop (px)",
                                    help="train on random crops of this side from each patch (default: the whole patch)")
    freeze_bn: bool = setting(True, group=_MODEL, label="Freeze BatchNorm",
                              help="keep the backbone's BatchNorm statistics and parameters at their pretrained values")
    freeze_stages: int = setting(2, range=(0, 3), group=_MODEL, label="Frozen stages",
                                 help="first backbone stages (stem included) kept frozen: cheaper steps, less overfitting")
    head: str = setting("fused", choices=HEADS, group=_MODEL, label="CAM head",
                        help="last (head on the last feature map) or fused (last map + stride-16 map: finer CAMs)")
    backbone: str = common_setting("backbone")
    weights: str = common_setting("weights")
    output_stride: int = setting(32, choices=OUTPUT_STRIDES, group=_MODEL,
                                 help="8, 16 or 32 (smaller = sharper CAMs, slower)")
    cam_weights: tuple[float, float, float] = setting(
        (0.5, 0.25, 0.25), range=(0, None), check=positive_sum, group=_MODEL, label="CAM weights",
        help="weights of the last-stage, stride-16 and stride-8 maps that cam-mode multi fuses")
    device: str = common_setting("device")
    seed: int = common_setting("seed")
    amp: bool = common_setting("amp")
    num_workers: int = common_setting("num_workers")
    patch_size: int | None = setting(None, range=(32, None), none="auto", gui=False, group=_DATA,
                                     help="patch side the images are resized to (default: their own size)")
    augment: bool = setting(True, group=_DATA, label="Augment (flips, turns, colour jitter)",
                            help="flips, 90-degree turns and mild colour jitter of the training patches")
    stain_jitter: float = setting(0.0, range=(0, 1), group=_DATA, label="Stain jitter (HED)",
                                  help="strength of an H&E stain augmentation of the training patches and the "
                                       "synthetic images (each stain scaled by 1 +- s and shifted by +- s in optical "
                                       "density; 0 = off, the default: on the shared WSSS4LUAD images it made the "
                                       "pseudo-masks worse, docs/benchmarks/stage1.md)")
    cam_mode: str = setting("last", choices=CAM_MODES, group=_MODEL, label="CAM mode",
                            help="CAMs for validation pseudo-masks: last (classic) or multi (multi-layer fusion)")
    feedback: str = setting("auto", choices=FEEDBACKS, group=_DATA,
                            help="auto, miou (val pseudo-mask mIoU) or loss (val loss): drives SegMix and best.pt")
    val_fraction: float = setting(0.1, range=(0, 1), open="hi", group=_DATA, label="Validation share",
                                  help="training patches held out for the val loss when there are no val masks")
    val_max_images: int | None = setting(None, range=(1, None), none="all", resumable=True, group=_DATA,
                                         label="Max. validation images",
                                         help="score at most this many validation images per epoch")
    segmix_tiles: tuple[int, ...] | None = setting(
        None, range=(1, None), min_items=1, none="auto", group=_SEGMIX, label="SegMix tiles (px)",
        help="tile sides of the curriculum, e.g. 112,56,32 (default: about 1/2, 1/4, 1/7 of the patch)")
    segmix_shares: tuple[float, ...] = setting((0.25, 0.5), range=(0, 1), open="lo", min_items=1, group=_SEGMIX,
                                               label="SegMix shares", help="shares of the tiles swapped, e.g. 0.25,0.5")
    segmix_warmup: int = setting(1, range=(0, None), group=_SEGMIX, label="SegMix warm-up epochs",
                                 help="epochs without shuffling at the start")
    segmix_decay: float = setting(0.93, range=(0, 1), open="lo", group=_SEGMIX, label="SegMix decay",
                                  help="decay per epoch of the curriculum's threshold")
    segmix_schedule: str = setting("time", choices=("time", "feedback"), group=_SEGMIX, label="SegMix schedule",
                                   help="time (the rung follows elapsed epochs, feedback moves it ahead or holds it) "
                                        "or feedback (it moves only when the feedback beats the threshold)")
    segmix_targets: str = setting("area", choices=("area", "union"), group=_SEGMIX, label="SegMix targets",
                                  help="labels of a shuffled image: area (soft, by tile area) or union (of the sources)")
    pda: bool = setting(False, group=_EXTRA, label="Progressive Dropout Attention (MLPS)",
                        help="MLPS Progressive Dropout Attention")
    pda_start: float = setting(PDA_START, range=(0, 1), group=_EXTRA, label="PDA start (share of run)",
                               help="share of the run after which Progressive Dropout Attention is on "
                                    "(MLPS: its 4th of 20 epochs = 0.15)")
    pda_start_epoch: int | None = setting(None, range=(0, None), none="share", gui=False, group=_EXTRA,
                                          label="PDA start epoch",
                                          help="first epoch (0-based) of Progressive Dropout Attention "
                                               "(default: from pda_start)")
    pda_decay: float = setting(0.98, range=(0, 1), open="lo", group=_EXTRA, label="PDA decay",
                               help="decay of the attention threshold per twentieth of the run (one MLPS epoch)")
    pscl: bool = setting(False, group=_EXTRA, label="Contrastive term (PSCL)",
                         help="PSCL-style supervised contrastive term")
    pscl_weight: float = setting(0.1, range=(0, None), group=_EXTRA, label="PSCL weight",
                                 help="weight of the contrastive term")
    pscl_temperature: float = setting(0.1, range=(0, None), open="lo", group=_EXTRA, label="PSCL temperature",
                                      help="temperature of the contrastive term")
    pscl_min_score: float = setting(0.5, range=(0, 1), group=_EXTRA, label="PSCL min. score",
                                    help="pixels whose normalised CAM is below this are left out of the term")
    synth_share: float = setting(0.25, range=(0, 1), open="hi", group=_SYNTH, label="Synthetic share",
                                 help="share of each batch replaced by synthetic Mosaic/Bezier images made from "
                                      "single-label training patches, labelled by the classes of their exact masks "
                                      "(0 = off; chosen on validation images: docs/benchmarks/stage1.md)")
    synth_kinds: tuple[str, ...] = setting(SYNTHESIS_KINDS, min_items=1, check=_synthesis_kinds, group=_SYNTH,
                                           label="Synthesis kinds", help="mosaic, bezier or mosaic,bezier (alternating)")
    synth_pixel_weight: float = setting(0.5, range=(0, None), group=_SYNTH, label="Synthetic pixel-loss weight",
                                        help="weight of a cross-entropy of the CAM logits against the exact masks of "
                                             "the synthetic images, pooled to the CAM grid (0 = image labels only)")
    correction_pixel_weight: float = setting(
        0.5, range=(0, None), group=_DATA, label="Corrected-pixel loss weight",
        help="projects: weight of a cross-entropy of the CAM logits against the corrected mask of each patch a "
             "pathologist corrected or reviewed, pooled to the CAM grid (0 = their exact labels only)")


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, weights: str | None = None) -> CAMClassifier:
    """The CAM classifier of ``cfg`` (``weights`` overrides ``cfg.weights``, e.g. ``"none"`` when
    a checkpoint will be loaded anyway)."""
    model = CAMClassifier(num_classes, backbone=cfg.backbone, weights=cfg.weights if weights is None else weights,
                          output_stride=cfg.output_stride, cam_weights=cfg.cam_weights, head=cfg.head)
    model.freeze(batchnorm=cfg.freeze_bn, stages=cfg.freeze_stages)
    return model


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The shuffled sample order of one epoch: a function of ``(seed, epoch)`` only, so runs and
    resumed runs agree; with ``world`` > 1 each rank takes every ``world``-th index."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    return order[rank::world]


def budget_indices(n: int, count: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """``count`` sample indices per rank for one epoch of a step-budgeted run: shuffled passes
    over the ``n`` samples, one after the other (each a function of ``(seed, epoch, pass)``), so
    every sample is seen once before any is seen twice within the epoch; rank ``r`` takes every
    ``world``-th index."""
    passes, need = [], count * world
    k = 0
    while sum(len(p) for p in passes) < need:
        passes.append(np.random.default_rng([int(seed), int(epoch), 7, k]).permutation(n))
        k += 1
    return np.concatenate(passes)[:need][rank::world]


class _RandomCrops(torch.utils.data.Dataset):
    """Random ``size``-px crops of the items of a dataset of ``(image, labels)`` (the crop drawn
    from torch's RNG, which :class:`_SeededItems` seeds per item); labels unchanged."""

    def __init__(self, base: torch.utils.data.Dataset, size: int):
        self.base, self.size = base, int(size)
        self.samples = getattr(base, "samples", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        x, y, *mask = self.base[i]  # an item may carry a mask (H, W), cropped alike
        h, w = x.shape[-2:]
        if h <= self.size and w <= self.size:
            return (x, y, *mask)
        top = int(torch.randint(0, h - self.size + 1, (1,))) if h > self.size else 0
        left = int(torch.randint(0, w - self.size + 1, (1,))) if w > self.size else 0
        rows, cols = slice(top, top + self.size), slice(left, left + self.size)
        return (x[:, rows, cols], y, *(m[rows, cols] for m in mask))


_item_seed = item_seed  # the per-item seeds of augmentation, SegMix and PSCL sampling


class _NamedItems(torch.utils.data.Dataset):
    """Wraps a dataset of weak samples so that an I/O error reading one (e.g. a slide reader's)
    is a DatasetError naming the patch."""

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.base[i]
        except OSError as e:
            s = self.base.samples[i] if hasattr(self.base, "samples") else None
            where = (s.path or s.name) if s is not None else f"training item {i}"
            raise DatasetError(f"{where}: cannot read the training patch: {e}") from e


class _SeededItems(_NamedItems):
    """Wraps a dataset so each item's random augmentation depends only on (seed, epoch, index):
    the same in the main process and in loader workers, before and after a resume."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int):
        super().__init__(base)
        self.seed, self.epoch = seed, 0

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.epoch, i))
            return super().__getitem__(i)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def supcon_loss(emb: Tensor, cam: Tensor, targets: Tensor, temperature: float = 0.1, min_score: float = 0.5,
                max_pixels: int = 512, generator: torch.Generator | None = None) -> Tensor:
    """PSCL-style supervised contrastive loss on feature-map pixels.

    ``emb`` (B, D, h, w) L2-normalised embeddings, ``cam`` (B, C, h, w) the raw head output,
    ``targets`` (B, C) labels (soft allowed: > 0 = present). Each pixel is labelled by the argmax
    of its CAM over the classes present in its image; pixels whose normalised score is below
    ``min_score`` are left out; at most ``max_pixels`` anchors are sampled. Pixels of the same
    class attract, others repel (Khosla et al. 2020). Zero when fewer than two classes remain.
    """
    with torch.no_grad():
        norm = normalize_cams(F.relu(cam.detach().float())) * (targets.detach() > 0).float()[:, :, None, None]
        score, label = norm.max(dim=1)
        keep = score >= min_score
    z = emb.permute(0, 2, 3, 1)[keep].float()
    y = label[keep]
    if z.shape[0] > max_pixels:
        pick = torch.randperm(z.shape[0], generator=generator)[:max_pixels].to(z.device)
        z, y = z[pick], y[pick]
    if z.shape[0] < 2 or torch.unique(y).numel() < 2:
        return emb.sum() * 0.0
    sim = z @ z.t() / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return emb.sum() * 0.0
    return -((log_prob * pos).sum(dim=1)[has] / n_pos[has]).mean()


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
#: Probability thresholds tried for gating unlabelled images (see :func:`evaluate_pseudo_masks`).
PROB_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def evaluate_pseudo_masks(model: CAMClassifier, samples: Sequence[MaskedSample], classes: ClassTable,
                          patch_size: int, cam_mode: str = "last", device: torch.device | None = None,
                          should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Pseudo-mask scores of ``model`` on images with masks: CAMs gated by each image's labels
    (taken from its mask), white background per the class table, scored with the MLPS convention
    (:mod:`core.metrics`). Also the image-level loss of the window probabilities (see
    :func:`~.cams.cams_for_image`) and the calibration of the gating of unlabelled images: from
    the same CAMs, the mIoU of masks gated by the predicted probabilities at each of
    :data:`PROB_THRESHOLDS` (``val_miou_prob_by_threshold``), the best threshold
    (``prob_threshold``, the lowest of equals) and its mIoU (``val_miou_prob``). Returns None
    when ``should_stop()`` interrupts it.
    """
    from napari_histo_wsss.core.metrics import ConfusionMatrix
    from napari_histo_wsss.core.stage1 import cams as C  # here: cams imports this module

    names = classes.names + ["background"]
    cm = ConfusionMatrix(classes.num_classes + 1, classes.background_index)
    by_t = {t: ConfusionMatrix(classes.num_classes + 1, classes.background_index) for t in PROB_THRESHOLDS}
    losses, raw = [], []
    for s in samples:
        if should_stop is not None and should_stop():
            return None
        rgb, gt = s.image(), s.mask()
        cams, probs = C.cams_for_image(model, rgb, device=device, mode=cam_mode, window=patch_size)
        raw.append((C.logit_maps(model, rgb, device=device), gt, rgb, probs))
        cm.update(C.pseudo_mask(cams, classes, rgb=rgb, labels=s.labels), gt)
        for t, cm_t in by_t.items():
            cm_t.update(C.pseudo_mask(cams, classes, rgb=rgb, probs=probs, prob_threshold=t), gt)
        p = torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)
        losses.append(float(F.binary_cross_entropy(p, torch.from_numpy(s.labels.astype(np.float32)))))
    scores = cm.scores(names)
    prob = {t: cm_t.scores(names)["miou"] for t, cm_t in by_t.items()}
    best_t = max(PROB_THRESHOLDS, key=lambda t: (prob[t] if prob[t] is not None else -1.0, -t))
    # raw-logit argmax gatings (C.GATINGS), per-class offsets calibrated here: "raw" (no
    # image-level decision) and "prob-raw" (classes gated by probability at best_t first)
    allowed = [C.allowed_classes(classes, probs=pr, prob_threshold=best_t) for _, _, _, pr in raw]
    offsets, raw_miou = {}, {}

    def calibrated(gate: list) -> tuple[list[float], float | None]:
        off, _ = C.calibrate_offsets([(lg, gt, a) for (lg, gt, _, _), a in zip(raw, gate)], classes)
        cm_raw = ConfusionMatrix(classes.num_classes + 1, classes.background_index)
        for (lg, gt, rgb, _), a in zip(raw, gate):
            cm_raw.update(C.raw_argmax_mask(lg, classes, off, rgb=rgb, labels=None if a is None else a.astype(np.uint8)), gt)
        return [float(v) for v in off], cm_raw.scores(names)["miou"]

    for gating, gate in (("raw", [None] * len(raw)), ("prob-raw", allowed)):
        offsets[gating], raw_miou[gating] = calibrated(gate)
    # prob-area: the probable classes that also cover an area floor of the image's tissue in the
    # ungated raw argmax (the "raw" offsets); the floor of AREA_FLOORS with the best mIoU, its own offsets
    shares = [C.class_shares(C.raw_argmax_mask(lg, classes, offsets["raw"], rgb=rgb), classes) for lg, _, rgb, _ in raw]
    best_area = None
    for floor in C.AREA_FLOORS:
        gate = [C.allowed_classes(classes, probs=pr, prob_threshold=best_t, shares=sh, min_area=floor)
                for (_, _, _, pr), sh in zip(raw, shares)]
        off, m = calibrated(gate)
        if best_area is None or (m if m is not None else -1.0) > best_area[2] + 1e-9:
            best_area = (floor, off, m if m is not None else -1.0)
    offsets["prob-area"], raw_miou["prob-area"] = best_area[1], (best_area[2] if best_area[2] >= 0 else None)
    return {"val_miou": scores["miou"], "val_fwiou": scores["fwiou"], "val_pixel_accuracy": scores["pixel_accuracy"],
            "val_iou": scores["per_class_iou"], "val_loss": float(np.mean(losses)) if losses else None,
            "val_miou_prob": prob[best_t], "prob_threshold": best_t, "min_area": best_area[0],
            "val_miou_by_gating": {"prob": prob[best_t], **raw_miou}, "raw_offsets": offsets,
            "val_miou_prob_by_threshold": {str(t): v for t, v in prob.items()}}


def _checkpoint_row(run_dir: str | Path, which: str) -> dict | None:
    """The metrics.jsonl row of the ``best`` (or ``last``) checkpoint of a run; None without rows."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return None
    if which == "best":
        return next((r for r in rows if r.get("epoch") == rows[-1].get("best_epoch")), rows[-1])
    return rows[-1]


def calibrated_prob_threshold(run_dir: str | Path, which: str = "best") -> float | None:
    """The probability threshold for gating unlabelled images that validation chose for the
    ``best`` (or ``last``) checkpoint of a run (``prob_threshold`` in metrics.jsonl), or None
    when the run had no validation images with masks."""
    row = _checkpoint_row(run_dir, which)
    if row is None:
        return None
    value = row.get("prob_threshold")
    return float(value) if isinstance(value, (int, float)) else None


def calibrated_min_area(run_dir: str | Path, which: str = "best") -> float | None:
    """The area floor of the ``prob-area`` gating that validation chose for the ``best`` (or
    ``last``) checkpoint of a run (``min_area`` in metrics.jsonl), or None when the run recorded
    none (no validation masks, or trained before the floor existed)."""
    return _row_min_area(_checkpoint_row(run_dir, which))


def _row_min_area(row: dict | None) -> float | None:
    value = None if row is None else row.get("min_area")
    return float(value) if isinstance(value, (int, float)) else None


def _row_offsets(row: dict | None, gating: str) -> list[float] | None:
    if row is None:
        return None
    value = (row.get("raw_offsets") or {}).get(gating) if isinstance(row.get("raw_offsets"), dict) else None
    return [float(v) for v in value] if isinstance(value, list) else None


@dataclass(frozen=True)
class AreaCalibration:
    """The ``prob-area`` gating a run's validation chose for one checkpoint: the area floor, the
    offsets of the gated mask and the offsets of the ungated raw argmax that measures the shares."""

    min_area: float
    offsets: tuple[float, ...]
    raw_offsets: tuple[float, ...]


def area_calibration(run_dir: str | Path, which: str = "best") -> AreaCalibration | None:
    """The run's :class:`AreaCalibration` for the ``best`` (or ``last``) checkpoint, or None when the
    run recorded none (no validation masks, or trained before the floor existed). The one reader of
    it: ``pseudo-masks`` (:func:`apply_area_calibration`) and the slide canvas use it alike."""
    row = _checkpoint_row(run_dir, which)  # metrics.jsonl read once
    floor, gated, raw = _row_min_area(row), _row_offsets(row, "prob-area"), _row_offsets(row, "raw")
    if floor is None or gated is None or raw is None or len(gated) != len(raw):
        return None
    return AreaCalibration(floor, tuple(gated), tuple(raw))


def apply_area_calibration(settings: Any, run_dir: str | Path, which: str = "best") -> str | None:
    """Fill a ``prob-area`` :class:`~.cams.PseudoMaskSettings` from the run's validation
    (:func:`area_calibration`): the area floor (unless set), the offsets of the ungated raw argmax
    that measures the shares and the offsets of the gated mask (unless set). A run trained before
    the floor existed has none: its ``prob-raw`` offsets and no floor (``min_area`` None) are used -
    the ``prob-raw`` mask - and the returned line says so."""
    cal = area_calibration(run_dir, which)
    if cal is None:
        if settings.offsets is None:
            found = calibrated_offsets(run_dir, which, "prob-raw")
            settings.offsets = tuple(found) if found is not None else None
        return f"{run_dir}: the run recorded no area floor (trained before prob-area existed); gating as prob-raw"
    if settings.min_area is None:
        settings.min_area = cal.min_area
    if settings.offsets is None:
        settings.offsets = cal.offsets
    if settings.area_offsets is None:
        settings.area_offsets = cal.raw_offsets
    return None


def calibrated_offsets(run_dir: str | Path, which: str = "best", gating: str = "prob-raw") -> list[float] | None:
    """The per-class offsets of a raw-logit ``gating`` (``"raw"``, ``"prob-raw"`` or ``"prob-area"``, see
    :func:`~.cams.raw_argmax_mask`) that validation calibrated for the ``best`` (or ``last``)
    checkpoint of a run (``raw_offsets`` in metrics.jsonl), or None when the run recorded none."""
    return _row_offsets(_checkpoint_row(run_dir, which), gating)


def _evaluate_patches(model: CAMClassifier, loader: Batches, device: torch.device, amp: bool,
                      should_stop: Callable[[], bool] | None) -> float | None:
    """Mean multi-label loss over held-out patches (unaugmented); None when interrupted."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            if should_stop is not None and should_stop():
                return None
            x, y = x.to(device), y.to(device)
            with autocast(device, amp):
                logits = model(x)
            total += float(F.multilabel_soft_margin_loss(logits.float(), y, reduction="sum"))
            n += x.shape[0]
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check_training_data(spec: DatasetSpec) -> np.ndarray:
    """Raise a clear error for data a classifier cannot learn from; return per-class counts."""
    if not spec.train:
        raise DatasetError(f"{spec.root}: no weakly labelled training images ({spec.layout} layout); "
                           "build a patch set with make-patches or label patches in the project")
    c = spec.classes.num_classes
    for s in spec.train:
        if np.asarray(s.labels).shape != (c,):
            raise DatasetError(f"{s.path or s.name}: label {np.asarray(s.labels).tolist()} has "
                               f"{np.asarray(s.labels).size} entries but the class table has {c} "
                               f"({', '.join(spec.classes.names)})")
    counts = np.sum([np.asarray(s.labels, dtype=np.int64) for s in spec.train], axis=0)
    present = [n for n, k in zip(spec.classes.names, counts) if k > 0]
    if len(present) < 2:
        raise DatasetError(
            f"{spec.root}: only {'one class (' + present[0] + ')' if present else 'no class'} occurs in the "
            f"{len(spec.train)} training labels; a classifier needs patches of at least two classes, so its CAMs "
            "cannot separate anything yet: label patches of another class next"
        )
    return counts


def single_label_warning(samples: Sequence[WeakSample], classes: ClassTable) -> str | None:
    """A warning when some labelled class never occurs alone in a patch: its CAM cannot be told
    apart from the classes it always comes with (tumour is learnt as "tumour + stroma"), so the
    pseudo-masks will mix them; None when every labelled class has single-label patches."""
    labels = np.array([np.asarray(s.labels) > 0 for s in samples], dtype=bool).reshape(len(samples), -1)
    if labels.size == 0:
        return None
    single = labels[labels.sum(axis=1) == 1]
    lonely = [n for c, n in enumerate(classes.names) if labels[:, c].any() and not single[:, c].any()]
    if not lonely:
        return None
    return (f"no training patch holds only {' or only '.join(lonely)}: the CAMs cannot separate "
            f"{'this class' if len(lonely) == 1 else 'these classes'} from the classes always labelled with "
            f"{'it' if len(lonely) == 1 else 'them'}; label a few patches that show only {' or only '.join(lonely)} next")


def _resolve_patch_size(spec: DatasetSpec, cfg: TrainConfig) -> tuple[int, str | None]:
    """Patch side to train at, and a note about resized images. Images smaller than the patch
    size are an error (upsampling would silently change the magnification)."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, s in enumerate(spec.train):
        if s.path is not None:
            sizes[i] = image_size(s.path)
    if not sizes:  # slide patches: the reader returns the project's patch size
        first = spec.train[0].image()
        sizes[0] = (first.shape[1], first.shape[0])
    sides = Counter(min(w, h) for w, h in sizes.values())
    patch = int(cfg.patch_size) if cfg.patch_size is not None else sides.most_common(1)[0][0]
    small = [i for i, (w, h) in sizes.items() if min(w, h) < patch]
    if small:
        s = spec.train[small[0]]
        w, h = sizes[small[0]]
        raise DatasetError(
            f"{s.path or s.name}: image is {w}x{h} px, smaller than the patch size {patch} px "
            f"({len(small)} of {len(sizes)} training images are); choose a smaller patch size or cut "
            "the images with make-patches, which pads small images with background"
        )
    other = sum(1 for w, h in sizes.values() if (w, h) != (patch, patch))
    note = f"{other} of {len(sizes)} training images are not {patch}x{patch} px and are resized to it" if other else None
    if patch < 32:
        raise DatasetError(f"{spec.root}: training images of {patch} px are too small for the classifier (>= 32 px)")
    return patch, note


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _scheduler_for(cfg: TrainConfig, patch_size: int, stride: int, mode: str) -> SegMixScheduler | None:
    if cfg.method != "segmix":
        return None
    tiles = cfg.segmix_tiles or default_tiles(patch_size, stride)
    return SegMixScheduler(tiles, cfg.segmix_shares, warmup_epochs=cfg.segmix_warmup, decay=cfg.segmix_decay, mode=mode,
                           schedule=cfg.segmix_schedule, total_epochs=cfg.epochs)


def train_classifier(
    dataset: DatasetSpec | str | Path,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[ProgressEvent]:
    """Train a CAM classifier on ``dataset`` into ``run_dir`` (see the module docstring).

    Yields ``start``, ``log``, ``step`` (every step, with the loss and ETA), ``epoch`` (with the
    row written to metrics.jsonl), ``checkpoint``, and finally ``done`` or ``cancelled``.
    ``should_stop()`` is polled before every step and during validation; when it returns True
    the current position is checkpointed and the generator ends with ``cancelled``. Closing the
    generator (``.close()``) also checkpoints. ``resume=True`` continues from
    ``checkpoints/last.pt`` (a run folder with a ``config.json`` but no checkpoint yet starts from
    the beginning; a folder holding no run is an error, so is a dataset whose fingerprint differs
    from the one in ``dataset.json``). The run and checkpoint folders are checked writable before
    the first step. The loop itself is :func:`~.engine.run_training`; this stage is its
    :class:`ClassifierTask`.

    Raises :class:`DatasetError` for unusable data (one class only, images smaller than the patch
    size, labels of the wrong length, no training images, no validation data for the chosen
    feedback; a patch that cannot be read, also in a loader worker) and :class:`TrainingError`
    for bad settings, a checkpoint of another class table, other settings or another dataset, a
    NaN/infinite loss and a checkpoint that cannot be written (disk full: the last good checkpoint
    is kept whole in both cases and named in the message).
    """
    cfg = config or TrainConfig()
    yield from run_training(ClassifierTask(dataset, cfg), cfg, run_dir, resume, should_stop)


class ClassifierTask(TrainingTask):
    """Stage one for :func:`~.engine.run_training`: the CAM classifier on weakly labelled
    patches (plain CAM or the SegMix curriculum, PDA, PSCL), validated by pseudo-mask mIoU on
    images with masks or by the loss on held-out patches, which also drives SegMix."""

    what = "training run"
    trained = "trained run"
    loss_per_item = True

    def __init__(self, dataset: DatasetSpec | str | Path, cfg: TrainConfig):
        super().__init__(cfg)
        self.dataset = dataset
        self.sched: SegMixScheduler | None = None
        self.level: Any = None
        self.pda_t: float | None = None

    def check_inputs(self) -> None:
        self.spec = self.dataset if isinstance(self.dataset, DatasetSpec) else load_dataset(self.dataset)

    def load(self, ctx: RunContext) -> None:
        spec = self.spec
        counts = _check_training_data(spec)
        self.classes = classes = spec.classes
        patch, resize_note = _resolve_patch_size(spec, self.cfg)
        self.cfg = cfg = dataclasses.replace(self.cfg, patch_size=patch)  # config.json records the size actually used
        self.patch_size = patch
        # -- validation data and feedback signal ------------------------------------------------
        val_masks = list(spec.val)
        if cfg.val_max_images is not None:
            val_masks = val_masks[: cfg.val_max_images]
        feedback = cfg.feedback if cfg.feedback != "auto" else ("miou" if val_masks else "loss")
        train_samples: list[WeakSample] = list(spec.train)
        held_out: list[WeakSample] = []
        if feedback == "miou" and not val_masks:
            raise DatasetError(f"{spec.root}: feedback 'miou' needs validation images with masks (val/img + val/mask), "
                               "but the validation set is empty; use feedback 'loss' or make-patches --val-fraction")
        if feedback == "loss" and not val_masks:
            n_val = int(round(cfg.val_fraction * len(train_samples)))
            if cfg.val_fraction > 0 and n_val == 0:
                n_val = 1
            if n_val == 0 or len(train_samples) - n_val < 2:
                raise DatasetError(
                    f"{spec.root}: no validation data: the dataset has no validation images with masks and "
                    f"{'val_fraction is 0' if cfg.val_fraction == 0 else f'{len(train_samples)} training images are too few to hold some out'}; "
                    "set val_fraction > 0 or add val/img + val/mask"
                )
            order = np.random.default_rng([int(cfg.seed), 7919]).permutation(len(train_samples))
            held_out = [train_samples[i] for i in sorted(order[:n_val])]
            train_samples = [train_samples[i] for i in sorted(order[n_val:])]
            ctx.info.append(f"no validation images with masks: {n_val} training patches held out for the validation loss")
        if resize_note:
            ctx.info.append(resize_note)
        missing = [n for n, k in zip(classes.names, counts) if k == 0]
        if missing:
            ctx.notes.append(f"no training patch is labelled {', '.join(missing)}: the classifier cannot learn it")
        alone = single_label_warning(train_samples, classes)
        if alone:
            ctx.notes.append(alone)
        self.val_masks, self.feedback = val_masks, feedback
        self.train_samples, self.held_out = train_samples, held_out
        self.higher_is_better = feedback == "miou"
        self.signal_name = "val mIoU" if feedback == "miou" else "val loss"

    def build_model(self, ctx: RunContext, fresh: bool) -> torch.nn.Module:
        return build_model(self.cfg, self.classes.num_classes, weights=None if fresh else "none").to(ctx.device)

    def setup(self, ctx: RunContext, model: torch.nn.Module) -> Iterator[ProgressEvent]:
        cfg, patch, world = self.cfg, self.patch_size, ctx.world
        side = min(patch, cfg.crop_size) if cfg.crop_size else patch  # the side of a training input
        self.sched = _scheduler_for(cfg, side, model.backbone.strides[-1], "max" if self.feedback == "miou" else "min")
        self.local_bs = ctx.dctx.local_batch_size(cfg.batch_size)
        self.synth, self.n_synth = self._synthetic(ctx, side), 0
        if self.synth is not None:
            self.n_synth = min(int(round(self.local_bs * cfg.synth_share)), self.local_bs - 1)
            if self.n_synth == 0:
                ctx.notes.append(f"synthesis off: a batch of {self.local_bs} patches per process holds no synthetic "
                                 f"share of {cfg.synth_share:g}; raise the batch size or the share")
                self.synth = None
        self.real_bs = self.local_bs - self.n_synth  # real patches loaded per step
        n_masked = sum(s.mask is not None for s in self.train_samples)
        self.with_masks = cfg.correction_pixel_weight > 0 and n_masked > 0
        if self.with_masks:
            ctx.info.append(f"pixel loss on the corrected masks of {n_masked} patch{'es' if n_masked != 1 else ''}, "
                            f"weight {cfg.correction_pixel_weight:g}"
                            + (" (not in SegMix's shuffled epochs)" if cfg.method == "segmix" else ""))
        self.stain = cfg.stain_jitter if cfg.augment else 0.0  # the real patches' and the synthetic images'
        items: torch.utils.data.Dataset = WeakLabelDataset(self.train_samples, size=patch, augment=cfg.augment,
                                                           masks=self.with_masks, background=self.classes.num_classes,
                                                           stain=self.stain)
        if side < patch:
            items = _RandomCrops(items, side)
        self.train_ds = _SeededItems(items, cfg.seed)
        # every rank runs the same number of steps (a rank with one step more would wait forever)
        self.per_rank = len(self.train_samples) // world
        if self.per_rank == 0:
            raise DatasetError(f"{self.spec.root}: {len(self.train_samples)} training patches cannot feed {world} processes")
        self.drop_last = self.per_rank >= self.local_bs
        steps = self.per_rank // self.local_bs if self.drop_last else 1
        if cfg.steps is not None:  # a step budget: the epochs split it, drawing patches again as needed
            if cfg.steps < cfg.epochs:
                raise TrainingError(f"a budget of {cfg.steps} steps cannot make {cfg.epochs} epochs of at least one "
                                    f"step each; raise steps or lower epochs to {cfg.steps} or fewer")
            steps = -(-int(cfg.steps) // int(cfg.epochs))
            self.drop_last = True
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps = steps
        self.val_loader = None
        if self.synth is not None:
            ctx.info.append(f"synthesis: {self.n_synth} of {self.local_bs} images per batch{' per process' if world > 1 else ''} "
                             f"are {'/'.join(cfg.synth_kinds)} images of {self.synth.side} px from single-label patches "
                             f"({self.synth.sizes()}), pixel-loss weight {cfg.synth_pixel_weight:g}")
        if self.held_out:
            self.val_loader = make_loader(_NamedItems(WeakLabelDataset(self.held_out, size=patch)), range(len(self.held_out)),
                                          cfg.batch_size, cfg.num_workers, False, ctx.pin)
        return iter(())

    def _synthetic(self, ctx: RunContext, side: int) -> SyntheticBatches | None:
        """The pools of the synthetic images (None when ``synth_share`` is 0, or with a note in
        the run's log when fewer than two classes have single-label patches)."""
        cfg = self.cfg
        if cfg.synth_share <= 0:
            return None
        try:
            return SyntheticBatches(self.train_samples, self.classes, self.patch_size, side, cfg.synth_kinds)
        except PatchReadError:
            raise  # an unreadable patch stops the run, naming it, as the training loader would
        except DatasetError as e:
            ctx.notes.append(f"synthesis off (synth_share {cfg.synth_share:g} ignored): {e}")
            return None

    def state_dict(self) -> dict:
        return {"segmix": self.sched.state_dict() if self.sched is not None else None}

    def load_state(self, extra: dict) -> None:
        if self.sched is not None and extra.get("segmix"):
            self.sched.load_state_dict(extra["segmix"])

    def wrap(self, ctx: RunContext, model: torch.nn.Module) -> torch.nn.Module:
        # DDP around forward_features when distributed, else the model's method
        return ctx.dctx.wrap_model(model, method="forward_features", find_unused_parameters=not self.cfg.pscl)

    def checkpoint_meta(self) -> dict:
        return {"cam_mode": self.cfg.cam_mode, "feedback": self.feedback}

    def start_message(self, ctx: RunContext) -> str:
        cfg = self.cfg
        return (f"{'resuming' if ctx.resumed else 'training'} {cfg.method} ({cfg.backbone}, {cfg.weights} weights, "
                f"os {cfg.output_stride}) on {len(self.train_samples)} patches of {self.patch_size} px, "
                f"{self.steps} steps/epoch, device {ctx.device}{f' x {ctx.world} processes' if ctx.world > 1 else ''}, "
                f"feedback {'val pseudo-mask mIoU' if self.feedback == 'miou' else 'val loss'}")

    def batches(self, ctx: RunContext, epoch: int, first: int) -> Iterable[Any]:
        cfg = self.cfg
        self.level = self.sched.current() if self.sched is not None else None
        self.pda_t = None  # the threshold of the epoch's last step so far (metrics.jsonl)
        self.train_ds.epoch = epoch
        bs = self.real_bs  # the rest of each batch is synthetic (loss)
        if cfg.steps is not None:
            order = budget_indices(len(self.train_samples), self.steps * bs, cfg.seed, epoch, ctx.rank, ctx.world)
            order = order[first * bs:]
            return make_loader(self.train_ds, order, bs, cfg.num_workers, True, ctx.pin)
        order = epoch_indices(len(self.train_samples), cfg.seed, epoch, ctx.rank, ctx.world)[: self.per_rank]
        order = order[first * bs: self.steps * bs if self.drop_last or self.n_synth else None]
        return make_loader(self.train_ds, order, bs, cfg.num_workers, self.drop_last, ctx.pin)

    def loss(self, ctx: RunContext, net: torch.nn.Module, batch: Any, epoch: int, step: int) -> tuple[Tensor, int]:
        cfg, level, rank = self.cfg, self.level, ctx.rank
        x, y, *extra = batch
        corrected = extra[0] if extra else None  # masks of corrected patches (background elsewhere)
        if level is not None:
            g_mix = torch.Generator().manual_seed(_item_seed(cfg.seed + rank, epoch, 1_000_000 + step))
            x, y, _ = segmix_batch(x, y, level.tile, level.share, generator=g_mix, target_mode=cfg.segmix_targets)
            corrected = None  # the shuffled tiles no longer match the masks
        n_real, masks = x.shape[0], None
        if self.synth is not None:  # the batch's synthetic share, after the real patches
            sx, sy, masks = self.synth.batch(self.n_synth, _item_seed(cfg.seed + rank, epoch, 3_000_000 + step),
                                               stain=self.stain)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        x, y = x.to(ctx.device, non_blocking=ctx.pin), y.to(ctx.device, non_blocking=ctx.pin)
        if cfg.pda:
            self.pda_t = self.pda_threshold(epoch, step)
        with ctx.autocast():
            out = net(x, pda_threshold=self.pda_t, embed=cfg.pscl)
            loss = F.multilabel_soft_margin_loss(out["logits"].float(), y)
            if masks is not None and cfg.synth_pixel_weight > 0:
                loss = loss + cfg.synth_pixel_weight * pixel_loss(out["cam"][n_real:], masks.to(ctx.device))
            if corrected is not None and bool((corrected < self.classes.num_classes).any()):
                loss = loss + cfg.correction_pixel_weight * pixel_loss(out["cam"][:n_real], corrected.to(ctx.device))
            if cfg.pscl:
                g_pix = torch.Generator().manual_seed(_item_seed(cfg.seed + rank, epoch, 2_000_000 + step))
                cam = out["cam"]
                if cam.shape[-2:] != out["embedding"].shape[-2:]:  # fused head: CAMs finer than the embedding
                    cam = F.adaptive_avg_pool2d(cam, out["embedding"].shape[-2:])
                loss = loss + cfg.pscl_weight * supcon_loss(
                    out["embedding"], cam, y, cfg.pscl_temperature, cfg.pscl_min_score, generator=g_pix)
        return loss, x.shape[0]

    def pda_threshold(self, epoch: int, step: int) -> float | None:
        """The PDA threshold of step ``step`` of ``epoch`` (0-based): MLPS's schedule over the
        share of the run done (``None``: off before ``pda_start``, or before ``pda_start_epoch``
        when that is set)."""
        cfg = self.cfg
        progress = (epoch * self.steps + step) / max(cfg.epochs * self.steps, 1)
        if cfg.pda_start_epoch is not None:
            return pda_threshold_at(progress, start=0.0, decay=cfg.pda_decay) if epoch >= cfg.pda_start_epoch else None
        return pda_threshold_at(progress, start=cfg.pda_start, decay=cfg.pda_decay)

    def validate(self, ctx: RunContext, model: torch.nn.Module) -> dict | None:
        if self.feedback == "miou" or self.val_masks:
            return evaluate_pseudo_masks(model, self.val_masks, self.classes, self.patch_size, self.cfg.cam_mode,
                                         ctx.device, ctx.validation_stop)
        loss_v = _evaluate_patches(model, self.val_loader, ctx.device, self.cfg.amp, ctx.validation_stop)
        return None if loss_v is None else {"val_loss": loss_v}

    def signal(self, val: dict, train_loss: float) -> float | None:
        return val["val_miou"] if self.feedback == "miou" else val["val_loss"]

    def epoch_row(self, ctx: RunContext, s: EpochSummary) -> dict:
        sched, level = self.sched, self.level
        seg_state = None
        if sched is not None:  # the feedback moves the curriculum
            sched.step(s.signal if s.signal is not None else float("nan"))
            seg_state = sched.state_dict()
            seg_state.pop("ladder", None)
        acc = s.acc
        return {
            "epoch": s.epoch,
            "train_loss": s.train_loss,
            **s.val,
            "feedback": self.feedback,
            "best_epoch": s.best_epoch,
            "lr": s.lr,
            # tile/share used in this epoch (None/0 = unshuffled), then the scheduler after its step
            "segmix": None if sched is None else {
                "tile": level.tile if level else None, "share": level.share if level else 0.0,
                "next_level": seg_state["level"], "next_tile": seg_state["tile"], "next_share": seg_state["share"],
                "threshold": seg_state["threshold"], "feedback": seg_state["feedback"], "mode": seg_state["mode"]},
            "pda_threshold": self.pda_t,
            "data_s": acc["data_s"],
            "compute_s": acc["compute_s"],
            "val_s": s.val_s,
            "patches_per_s": acc["samples"] / max(acc["data_s"] + acc["compute_s"], 1e-9),
        }

    def done_metrics(self) -> dict:
        return {"feedback": self.feedback}


def run_classes(run_dir: str | Path) -> ClassTable:
    """The class table a run was trained on (its ``classes.json``); TrainingError naming the file
    when it is missing or damaged."""
    path = Path(run_dir) / "classes.json"
    try:
        return ClassTable.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"{path}: unreadable class table: {e}") from e
    except HistoWSSSError as e:
        raise TrainingError(f"{path}: {e}") from e


def load_run(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu"
             ) -> tuple[CAMClassifier, ClassTable, TrainConfig]:
    """The trained classifier of a run folder (eval mode), its class table and its config.

    ``which``: ``"best"`` (falls back to ``last`` when no epoch finished validation yet),
    ``"last"``, or a checkpoint path. The class table in the checkpoint must match the run's
    ``classes.json``.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise TrainingError(f"{run}: not a training run folder (no config.json)")
    path = checkpoint_file(run, which)
    if which in ("best", "last") and not path.is_file():
        raise TrainingError(f"{run}: no checkpoint yet (training stopped before its first step?); resume or retrain it")
    cfg = TrainConfig.saved(run)
    classes = run_classes(run)
    model, meta = load_model(path, map_location=map_location)
    if not isinstance(model, CAMClassifier):
        raise TrainingError(f"{path}: holds a {meta.get('kind')} model, not a CAM classifier")
    check_classes(meta, classes, what=f"{run / 'classes.json'}")
    return model, classes, cfg
