"""Stage one: training the CAM classifier, as a cancellable generator of progress events.

:func:`train_classifier` is the one training loop for every option of :class:`TrainConfig`
(plain CAM or the SegMix shuffle curriculum, Progressive Dropout Attention, a PSCL-style
contrastive term). It yields :class:`ProgressEvent` objects that a CLI progress bar and a napari
``thread_worker`` consume alike, and it polls ``should_stop`` between steps.

A run folder holds::

    config.json          the TrainConfig (written first, atomically)
    classes.json         the class table the model is trained for
    dataset.json         the training dataset's folder and layout (stage two reads it)
    metrics.jsonl        one JSON object per finished epoch (losses, validation scores, timing,
                         the SegMix scheduler state), rewritten atomically each epoch
    checkpoints/last.pt  model + optimizer + scheduler + RNG state, after every epoch and on cancel
    checkpoints/best.pt  the model of the best epoch by the selection signal

Every file is written through :mod:`core.atomic`, so a run killed at any point can be resumed
from ``last.pt`` (``resume=True``) and reproduces, on the CPU, exactly what the uninterrupted
run would have computed: the data order is a function of ``(seed, epoch)``, each item's
augmentation of ``(seed, epoch, index)``, each SegMix shuffle of ``(seed, epoch, step)``, and the
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
tiles within each rank's share of the batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .atomic import remove_temporaries, write_json, write_text
from .classes import ClassTable
from .datasets import DatasetSpec, MaskedSample, WeakLabelDataset, WeakSample, image_size, load_dataset
from .device import autocast, grad_scaler, seed_everything
from .distributed import DistContext
from .errors import DatasetError, HistoWSSSError, TrainingError
from .models import CAMClassifier, check_classes, load_checkpoint, load_model, parameter_groups, save_model
from .models.classifier import CAM_MODES, normalize_cams, pda_threshold_at
from .segmix import SegMixScheduler, default_tiles, segmix_batch

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
EVENT_KINDS = ("start", "step", "epoch", "checkpoint", "done", "cancelled", "log")

# Settings that may differ when a run is resumed; every other field must match the saved config
# (they change the model, the data order or the optimisation, so the run would not be one run).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "amp", "num_workers", "val_max_images"})


@dataclass
class TrainConfig:
    """Everything that defines a classifier training run (saved as the run's ``config.json``).

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
    ``segmix_decay`` of the threshold, ``segmix_targets`` ``"area"``/``"union"``);
    ``pda`` (MLPS Progressive Dropout Attention from ``pda_start_epoch``, threshold decaying by
    ``pda_decay`` per epoch); ``pscl`` (supervised contrastive term on last-stage features
    labelled by their gated CAM argmax, weight ``pscl_weight``, temperature ``pscl_temperature``,
    pixels whose normalised CAM is below ``pscl_min_score`` left out).
    ``feedback``: ``"auto"`` (val pseudo-mask mIoU when validation masks exist, else val loss),
    ``"miou"`` or ``"loss"``; it drives SegMix and picks ``best.pt``.

    Defaults follow docs/benchmarks/stage1.md: plain CAM (SegMix did not beat it in the short
    CPU runs measured there), output stride 32 (stride 16 dilates the last
    stages, which PyTorch runs about ten times slower on CPUs for depthwise convolutions, for
    no measured gain in pseudo-mask mIoU) and single-layer CAMs (``"last"``), which scored
    above the multi-layer fusion in every measured run.
    """

    method: str = "cam"
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    max_steps_per_epoch: int | None = None
    backbone: str = "efficientnet-lite0"
    weights: str = "imagenet"
    output_stride: int = 32
    cam_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    num_workers: int = 0
    patch_size: int | None = None
    augment: bool = True
    cam_mode: str = "last"
    feedback: str = "auto"
    val_fraction: float = 0.1
    val_max_images: int | None = None
    segmix_tiles: tuple[int, ...] | None = None
    segmix_shares: tuple[float, ...] = (0.25, 0.5)
    segmix_warmup: int = 1
    segmix_decay: float = 0.93
    segmix_targets: str = "area"
    pda: bool = False
    pda_start_epoch: int = 4
    pda_decay: float = 0.98
    pscl: bool = False
    pscl_weight: float = 0.1
    pscl_temperature: float = 0.1
    pscl_min_score: float = 0.5

    def __post_init__(self) -> None:
        self.cam_weights = tuple(float(w) for w in self.cam_weights)
        self.segmix_shares = tuple(float(s) for s in self.segmix_shares)
        if self.segmix_tiles is not None:
            self.segmix_tiles = tuple(int(t) for t in self.segmix_tiles)

    def validate(self) -> None:
        """Raise :class:`TrainingError` naming the first setting that cannot work."""
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a positive number, got {self.lr}"),
            (self.head_lr_mult > 0, f"head_lr_mult must be positive, got {self.head_lr_mult}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.patch_size is None or self.patch_size >= 32, f"patch size must be >= 32 px, got {self.patch_size}"),
            (self.cam_mode in CAM_MODES, f"cam_mode must be one of {', '.join(CAM_MODES)}, got {self.cam_mode!r}"),
            (self.feedback in FEEDBACKS, f"feedback must be one of {', '.join(FEEDBACKS)}, got {self.feedback!r}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must lie in [0, 1), got {self.val_fraction}"),
            (self.val_max_images is None or self.val_max_images >= 1, "val_max_images must be >= 1 or None"),
            (self.segmix_targets in ("area", "union"), f"segmix_targets must be area or union, got {self.segmix_targets!r}"),
            (bool(self.segmix_shares) and all(0 < s <= 1 for s in self.segmix_shares),
             f"segmix_shares must lie in (0, 1], got {list(self.segmix_shares)}"),
            (self.segmix_tiles is None or (bool(self.segmix_tiles) and min(self.segmix_tiles) >= 1),
             f"segmix_tiles must be positive pixel sizes, got {self.segmix_tiles}"),
            (0 < self.segmix_decay <= 1, f"segmix_decay must lie in (0, 1], got {self.segmix_decay}"),
            (self.segmix_warmup >= 0, f"segmix_warmup must be >= 0, got {self.segmix_warmup}"),
            (0 < self.pda_decay <= 1, f"pda_decay must lie in (0, 1], got {self.pda_decay}"),
            (self.pscl_temperature > 0, f"pscl_temperature must be positive, got {self.pscl_temperature}"),
            (len(self.cam_weights) == 3 and min(self.cam_weights) >= 0 and sum(self.cam_weights) > 0,
             f"cam_weights must be three non-negative weights, got {list(self.cam_weights)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"training setting: {message}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys (from a newer version) are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"unknown training setting(s) {', '.join(unknown)} (saved by a newer version?)")
        return cls(**d)


@dataclass
class ProgressEvent:
    """One report of a long job. ``epoch`` counts from 1, ``step`` is the step within the epoch
    (or the item, for jobs without epochs), ``eta_s`` the estimated seconds left."""

    kind: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    eta_s: float | None = None
    message: str = ""


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, weights: str | None = None) -> CAMClassifier:
    """The CAM classifier of ``cfg`` (``weights`` overrides ``cfg.weights``, e.g. ``"none"`` when
    a checkpoint will be loaded anyway)."""
    return CAMClassifier(num_classes, backbone=cfg.backbone, weights=cfg.weights if weights is None else weights,
                         output_stride=cfg.output_stride, cam_weights=cfg.cam_weights)


def build_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW with the pretrained backbone at ``cfg.lr`` and the new layers ``head_lr_mult`` faster
    (``cfg``: a TrainConfig or a SegConfig; both have ``lr``, ``head_lr_mult``, ``weight_decay``).
    Each group remembers its base rate in ``"base_lr"`` for :func:`lr_at`."""
    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at global ``step`` of ``total``: linear warm-up, then cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The shuffled sample order of one epoch: a function of ``(seed, epoch)`` only, so runs and
    resumed runs agree; with ``world`` > 1 each rank takes every ``world``-th index."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    return order[rank::world]


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class _SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so each item's random augmentation depends only on (seed, epoch, index):
    the same in the main process and in loader workers, before and after a resume."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.epoch, i))
            return self.base[i]


def _loader(dataset: torch.utils.data.Dataset, indices: Sequence[int], batch_size: int, num_workers: int,
            drop_last: bool, pin: bool) -> torch.utils.data.DataLoader:
    # A private generator keeps the DataLoader from drawing on the global RNG (drop-connect uses it).
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=list(int(i) for i in indices), num_workers=num_workers,
        drop_last=drop_last, pin_memory=pin, persistent_workers=False, generator=torch.Generator().manual_seed(0),
    )


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
    from .cams import cams_for_image, pseudo_mask
    from .metrics import ConfusionMatrix

    names = classes.names + ["background"]
    cm = ConfusionMatrix(classes.num_classes + 1, classes.background_index)
    by_t = {t: ConfusionMatrix(classes.num_classes + 1, classes.background_index) for t in PROB_THRESHOLDS}
    losses = []
    for s in samples:
        if should_stop is not None and should_stop():
            return None
        rgb, gt = s.image(), s.mask()
        cams, probs = cams_for_image(model, rgb, device=device, mode=cam_mode, window=patch_size)
        cm.update(pseudo_mask(cams, classes, rgb=rgb, labels=s.labels), gt)
        for t, cm_t in by_t.items():
            cm_t.update(pseudo_mask(cams, classes, rgb=rgb, probs=probs, prob_threshold=t), gt)
        p = torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)
        losses.append(float(F.binary_cross_entropy(p, torch.from_numpy(s.labels.astype(np.float32)))))
    scores = cm.scores(names)
    prob = {t: cm_t.scores(names)["miou"] for t, cm_t in by_t.items()}
    best_t = max(PROB_THRESHOLDS, key=lambda t: (prob[t] if prob[t] is not None else -1.0, -t))
    return {"val_miou": scores["miou"], "val_fwiou": scores["fwiou"], "val_pixel_accuracy": scores["pixel_accuracy"],
            "val_iou": scores["per_class_iou"], "val_loss": float(np.mean(losses)) if losses else None,
            "val_miou_prob": prob[best_t], "prob_threshold": best_t,
            "val_miou_prob_by_threshold": {str(t): v for t, v in prob.items()}}


def calibrated_prob_threshold(run_dir: str | Path, which: str = "best") -> float | None:
    """The probability threshold for gating unlabelled images that validation chose for the
    ``best`` (or ``last``) checkpoint of a run (``prob_threshold`` in metrics.jsonl), or None
    when the run had no validation images with masks."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return None
    row = rows[-1]
    if which == "best":
        row = next((r for r in rows if r.get("epoch") == rows[-1].get("best_epoch")), rows[-1])
    value = row.get("prob_threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _evaluate_patches(model: CAMClassifier, loader: torch.utils.data.DataLoader, device: torch.device, amp: bool,
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
            f"{len(spec.train)} training labels; a classifier needs patches of at least two classes"
        )
    return counts


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


def _check_resume_config(saved: dict, cfg: TrainConfig, where: Path) -> None:
    mine = cfg.to_dict()
    diff = [k for k in mine if k not in RESUMABLE_CHANGES and k in saved and saved[k] != mine[k]]
    if diff:
        parts = ", ".join(f"{k}: saved {saved[k]!r} vs now {mine[k]!r}" for k in diff[:4])
        raise TrainingError(f"{where}: cannot resume with different settings ({parts}); only "
                            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change. Start a new run folder instead")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (stage one or two), up to ``upto_epoch`` if given;
    unreadable lines are skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (upto_epoch is None or int(row.get("epoch", 0)) <= upto_epoch):
                rows.append(row)
    return rows


def _scheduler_for(cfg: TrainConfig, patch_size: int, stride: int, mode: str) -> SegMixScheduler | None:
    if cfg.method != "segmix":
        return None
    tiles = cfg.segmix_tiles or default_tiles(patch_size, stride)
    return SegMixScheduler(tiles, cfg.segmix_shares, warmup_epochs=cfg.segmix_warmup, decay=cfg.segmix_decay, mode=mode)


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
    ``checkpoints/last.pt`` (a run folder without one starts from the beginning).

    Raises :class:`DatasetError` for unusable data (one class only, images smaller than the patch
    size, labels of the wrong length, no training images, no validation data for the chosen
    feedback) and :class:`TrainingError` for bad settings, a checkpoint of another class table
    or other settings, and a NaN/infinite loss (the last good checkpoint is kept).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    spec = dataset if isinstance(dataset, DatasetSpec) else load_dataset(dataset)
    run = Path(run_dir)
    dctx = DistContext.from_env(cfg.device).init()
    rank, world, main = dctx.rank, dctx.world_size, dctx.is_main
    counts = _check_training_data(spec)
    classes = spec.classes
    patch, resize_note = _resolve_patch_size(spec, cfg)
    cfg = dataclasses.replace(cfg, patch_size=patch)  # config.json records the size actually used
    ckpt_dir = run / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    metrics_path = run / "metrics.jsonl"

    # -- validation data and feedback signal --------------------------------------------------
    val_masks = list(spec.val)
    if cfg.val_max_images is not None:
        val_masks = val_masks[: cfg.val_max_images]
    feedback = cfg.feedback if cfg.feedback != "auto" else ("miou" if val_masks else "loss")
    train_samples: list[WeakSample] = list(spec.train)
    held_out: list[WeakSample] = []
    notes: list[str] = []
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
        notes.append(f"no validation images with masks: {n_val} training patches held out for the validation loss")
    if resize_note:
        notes.append(resize_note)
    missing = [n for n, k in zip(classes.names, counts) if k == 0]
    if missing:
        notes.append(f"no training patch is labelled {', '.join(missing)}: the classifier cannot learn it")

    # -- resume state ------------------------------------------------------------------------
    ckpt = None
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        check_classes(ckpt["meta"], classes, what=f"the dataset {spec.root}")
        _check_resume_config(ckpt["meta"].get("config", {}), cfg, last_path)
    elif resume:
        notes.append(f"{run} has no checkpoint yet: starting from the beginning")
    elif last_path.is_file():
        raise TrainingError(f"{run} already holds a trained run ({last_path}); resume it or choose a new folder")

    device = dctx.device
    local_bs = dctx.local_batch_size(cfg.batch_size)
    seed_everything(cfg.seed + rank)
    model = build_model(cfg, classes.num_classes, weights="none" if ckpt is not None else None).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.amp)
    stride = model.backbone.strides[-1]
    sched = _scheduler_for(cfg, patch, stride, "max" if feedback == "miou" else "min")

    start_epoch, start_batch, global_step = 0, 0, 0
    best: float | None = None
    best_epoch = 0
    acc = {"loss": 0.0, "n": 0, "data_s": 0.0, "compute_s": 0.0, "samples": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        ex = ckpt["extra"]
        optimizer.load_state_dict(ex["optimizer"])
        if ex.get("scaler"):
            scaler.load_state_dict(ex["scaler"])
        if sched is not None and ex.get("segmix"):
            sched.load_state_dict(ex["segmix"])
        start_epoch, start_batch, global_step = int(ex["epoch"]), int(ex["batch"]), int(ex["global_step"])
        best, best_epoch = ex.get("best"), int(ex.get("best_epoch", 0))
        acc.update(ex.get("acc", {}))
        torch.set_rng_state(ex["torch_rng"] if world == 1 else torch.get_rng_state())
        if start_epoch >= cfg.epochs:
            yield ProgressEvent("done", epoch=start_epoch, epochs=cfg.epochs,
                                message=f"{run} already trained for {start_epoch} of {cfg.epochs} epochs; raise epochs to continue")
            return

    if main:  # temporaries of a checkpoint write that a kill cut short
        remove_temporaries(ckpt_dir, ("last.pt", "best.pt"))
    if main:
        write_json(run / "config.json", cfg.to_dict())
        write_json(run / "classes.json", classes.to_dict())
        # where the patches came from, so that `train-seg RUN_DIR` finds them without --dataset
        write_json(run / "dataset.json", {"path": str(Path(spec.root).resolve()), "layout": spec.layout})
    history = read_metrics(metrics_path, start_epoch)

    train_ds = _SeededItems(WeakLabelDataset(train_samples, size=patch, augment=cfg.augment), cfg.seed)
    # every rank runs the same number of steps (a rank with one step more would wait forever)
    per_rank = len(train_samples) // world
    if per_rank == 0:
        raise DatasetError(f"{spec.root}: {len(train_samples)} training patches cannot feed {world} processes")
    drop_last = per_rank >= local_bs
    steps = per_rank // local_bs if drop_last else 1
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    total_steps = steps * cfg.epochs
    pin = device.type == "cuda"
    val_loader = None
    if held_out:
        val_loader = _loader(WeakLabelDataset(held_out, size=patch), range(len(held_out)), cfg.batch_size,
                             cfg.num_workers, False, pin)
    # the module the step calls: DDP around forward_features when distributed, else the model's method
    net = dctx.wrap_model(model, method="forward_features", find_unused_parameters=not cfg.pscl)

    def checkpoint(path: Path, epoch_done: int, batch_done: int, metrics: dict | None) -> None:
        meta = {"classes": classes, "config": cfg.to_dict(), "epoch": epoch_done, "patch_size": patch,
                "cam_mode": cfg.cam_mode, "feedback": feedback, "metrics": metrics or {}}
        extra = None
        if path == last_path:
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "segmix": sched.state_dict() if sched is not None else None,
                     "epoch": epoch_done, "batch": batch_done, "global_step": global_step,
                     "best": best, "best_epoch": best_epoch, "acc": dict(acc), "torch_rng": torch.get_rng_state(),
                     "world_size": world}
        save_model(path, model, meta, extra)

    what = "resuming" if ckpt is not None else "training"
    yield ProgressEvent(
        "start", epoch=start_epoch + 1, epochs=cfg.epochs, step=start_batch, steps=steps,
        message=(f"{what} {cfg.method} ({cfg.backbone}, {cfg.weights} weights, os {cfg.output_stride}) on "
                 f"{len(train_samples)} patches of {patch} px, {steps} steps/epoch, device {device}"
                 f"{f' x {world} processes' if world > 1 else ''}, "
                 f"feedback {'val pseudo-mask mIoU' if feedback == 'miou' else 'val loss'}"),
    )
    for n in notes:
        yield ProgressEvent("log", epoch=start_epoch + 1, epochs=cfg.epochs, message=n)

    # every rank validates the same synchronised model; a stop request during validation is
    # taken at the next step instead when distributed (ranks must agree on where they stop)
    val_stop = should_stop if world == 1 else None
    t_run = time.perf_counter()
    steps_done_here = 0
    pos = saved = (start_epoch, start_batch)  # (epoch, steps done in it) now / in last.pt
    try:
        for epoch in range(start_epoch, cfg.epochs):
            level = sched.current() if sched is not None else None
            pda_t = pda_threshold_at(epoch, cfg.pda_start_epoch, 1.0, cfg.pda_decay) if cfg.pda else None
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch:
                acc = {"loss": 0.0, "n": 0, "data_s": 0.0, "compute_s": 0.0, "samples": 0}
            train_ds.epoch = epoch
            order = epoch_indices(len(train_samples), cfg.seed, epoch, rank, world)[:per_rank]
            order = order[first * local_bs: steps * local_bs if drop_last else None]
            model.train()
            batch_i = first
            t_wait = time.perf_counter()
            for x, y in _loader(train_ds, order, local_bs, cfg.num_workers, drop_last, pin):
                if batch_i >= steps:
                    break
                if dctx.any(should_stop is not None and should_stop()):
                    if main:
                        checkpoint(last_path, epoch, batch_i, None)
                    saved = pos
                    yield ProgressEvent("cancelled", epoch=epoch + 1, epochs=cfg.epochs, step=batch_i, steps=steps,
                                        message=f"stopped at epoch {epoch + 1}, step {batch_i}; checkpoint {last_path}")
                    return
                t0 = time.perf_counter()
                acc["data_s"] += t0 - t_wait
                factor = lr_at(global_step, total_steps, min(cfg.warmup_steps, total_steps // 4))
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                if level is not None:
                    g_mix = torch.Generator().manual_seed(_item_seed(cfg.seed + rank, epoch, 1_000_000 + batch_i))
                    x, y, _ = segmix_batch(x, y, level.tile, level.share, generator=g_mix, target_mode=cfg.segmix_targets)
                x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
                with autocast(device, cfg.amp):
                    out = net(x, pda_threshold=pda_t, labels=y, embed=cfg.pscl)
                    loss = F.multilabel_soft_margin_loss(out["logits"].float(), y)
                    if cfg.pscl:
                        g_pix = torch.Generator().manual_seed(_item_seed(cfg.seed + rank, epoch, 2_000_000 + batch_i))
                        loss = loss + cfg.pscl_weight * supcon_loss(
                            out["embedding"], out["cam"], y, cfg.pscl_temperature, cfg.pscl_min_score,
                            generator=g_pix)
                value = dctx.all_reduce_mean(float(loss.detach()))
                if not math.isfinite(value):
                    kept = f"the last good checkpoint {last_path} is kept" if last_path.is_file() else "no checkpoint was written yet"
                    raise TrainingError(f"{run}: the loss became {value} at epoch {epoch + 1}, step {batch_i + 1} "
                                        f"(learning rate {cfg.lr:g}); {kept}. Lower the learning rate or check the data")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                acc["compute_s"] += t1 - t0
                acc["loss"] += value * x.shape[0]
                acc["n"] += x.shape[0]
                acc["samples"] += x.shape[0] * world
                batch_i += 1
                global_step += 1
                pos = (epoch, batch_i)
                steps_done_here += 1
                rate = (time.perf_counter() - t_run) / steps_done_here
                eta = rate * (total_steps - global_step)
                yield ProgressEvent("step", epoch=epoch + 1, epochs=cfg.epochs, step=batch_i, steps=steps, loss=value,
                                    eta_s=eta, metrics={"lr": cfg.lr * factor})
                t_wait = time.perf_counter()

            # -- end of epoch: validation, feedback, metrics, checkpoints -------------------------
            t_val = time.perf_counter()
            model.eval()
            if feedback == "miou" or val_masks:
                val = evaluate_pseudo_masks(model, val_masks, classes, patch, cfg.cam_mode, device, val_stop)
            else:
                loss_v = _evaluate_patches(model, val_loader, device, cfg.amp, val_stop)
                val = None if loss_v is None else {"val_loss": loss_v}
            if val is None:  # stopped during validation: the epoch's training is kept, validation redone on resume
                if main:
                    checkpoint(last_path, epoch, steps, None)
                saved = pos = (epoch, steps)
                yield ProgressEvent("cancelled", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                    message=f"stopped during validation of epoch {epoch + 1}; checkpoint {last_path}")
                return
            signal = val["val_miou"] if feedback == "miou" else val["val_loss"]
            seg_state = None
            if sched is not None:
                sched.step(signal if signal is not None else float("nan"))
                seg_state = sched.state_dict()
                seg_state.pop("ladder", None)
            improved = signal is not None and (best is None or (signal > best if feedback == "miou" else signal < best))
            if improved:
                best, best_epoch = float(signal), epoch + 1
            row = {
                "epoch": epoch + 1,
                "train_loss": acc["loss"] / max(acc["n"], 1),
                **val,
                "feedback": feedback,
                "best_epoch": best_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                # tile/share used in this epoch (None/0 = unshuffled), then the scheduler after its step
                "segmix": None if sched is None else {
                    "tile": level.tile if level else None, "share": level.share if level else 0.0,
                    "next_level": seg_state["level"], "next_tile": seg_state["tile"], "next_share": seg_state["share"],
                    "threshold": seg_state["threshold"], "feedback": seg_state["feedback"], "mode": seg_state["mode"]},
                "pda_threshold": pda_t,
                "data_s": acc["data_s"],
                "compute_s": acc["compute_s"],
                "val_s": time.perf_counter() - t_val,
                "patches_per_s": acc["samples"] / max(acc["data_s"] + acc["compute_s"], 1e-9),
            }
            history.append(row)
            if main:
                write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
                if improved:
                    checkpoint(best_path, epoch + 1, 0, row)
                checkpoint(last_path, epoch + 1, 0, row)
            saved = pos = (epoch + 1, 0)
            yield ProgressEvent("epoch", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                loss=row["train_loss"], metrics=row,
                                eta_s=(time.perf_counter() - t_run) / max(steps_done_here, 1) * (total_steps - global_step))
            yield ProgressEvent("checkpoint", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                message=f"saved {last_path}" + (f" and {best_path} (best so far)" if improved else ""))
        score = "n/a" if best is None else f"{best:.4f}"
        yield ProgressEvent("done", epoch=cfg.epochs, epochs=cfg.epochs, step=steps, steps=steps,
                            metrics={"best": best, "best_epoch": best_epoch, "feedback": feedback},
                            message=f"trained {cfg.epochs} epochs; best {'val mIoU' if feedback == 'miou' else 'val loss'} "
                                    f"{score} at epoch {best_epoch} -> {best_path}")
    except GeneratorExit:
        # The consumer closed the generator at a yield (e.g. a GUI cancelling hard): keep the position.
        if main and pos != saved:
            checkpoint(last_path, pos[0], pos[1], None)
        raise
    finally:
        dctx.shutdown()


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
    if which in ("best", "last"):
        path = run / "checkpoints" / f"{which}.pt"
        if which == "best" and not path.is_file():
            path = run / "checkpoints" / "last.pt"
        if not path.is_file():
            raise TrainingError(f"{run}: no checkpoint yet (training stopped before its first step?); resume or retrain it")
    else:
        path = Path(which)
    try:
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text(encoding="utf-8")))
        classes = ClassTable.from_dict(json.loads((run / "classes.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"{run}: config.json or classes.json is unreadable: {e}") from e
    except HistoWSSSError as e:
        raise TrainingError(f"{run}: {e}") from e
    model, meta = load_model(path, map_location=map_location)
    if not isinstance(model, CAMClassifier):
        raise TrainingError(f"{path}: holds a {meta.get('kind')} model, not a CAM classifier")
    check_classes(meta, classes, what=f"{run / 'classes.json'}")
    return model, classes, cfg
