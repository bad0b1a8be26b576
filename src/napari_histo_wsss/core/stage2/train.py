"""Stage two: train a DeepLabV3+ segmenter on (corrected) pseudo-masks, as a cancellable
generator of progress events.

Supervision, per training image:

* **MLPS multi-layer pseudo-supervision**: several pseudo-mask sets (by default three, from the
  stage-one classifier's fused multi-layer CAM, its last-stage CAM and its stride-8 LayerCAM)
  each give a cross-entropy term with the background/unlabelled index ignored; the terms are
  summed with weights (default 0.6 / 0.2 / 0.2).
* **OEEM** (optional): on images whose pseudo-mask holds two or more classes, each pixel's loss
  is weighted by a softmax over the image of minus its (detached) loss, times the number of
  pixels, so that easy (probably correct) pixels count more than hard (probably mislabelled) ones.
* **Pathologist corrections** (project datasets): where the project's ``corrected_flag`` is set,
  the ``corrected`` mask overrides every pseudo-mask set and the pixel's loss is multiplied by
  ``corrected_weight``.
* **HisynSeg synthesis** (optional, ``synthesis=("mosaic", "bezier")``): synthetic images with
  exact masks (filtered by a real-vs-synthetic discriminator) are mixed into every batch
  (``synthesis_share`` of it); the segmenter then has an image-level CAM head trained with the
  multi-label loss on the real patches plus a consistency loss between its CAM and the
  segmentation on those patches. An epoch is the same number of batches with or without
  synthesis (training images // batch size), so switching synthesis on costs no extra steps.
  Before training starts, each of its phases (sorting the patches, synthesis, the filter's
  training and scoring) yields a ``step`` event per image / filter step, with its ETA, and a stop
  is honoured between two of them (nothing is written before training starts).
* **Full supervision** (the reference): a folder of ground-truth masks as the only mask set, or
  ``supervision="full"`` on a make-patches dataset, which crops each patch's mask from the
  source masks recorded in ``make_patches.json``.

Without mask folders, the pseudo-mask sets are made from the stage-one run's training patches
(:func:`make_pseudo_mask_sets`: one multi-layer CAM pass, gated by the labels in the file names) under
``<out>/pseudo/<set>/`` and reused by later runs.

A segmenter run folder (default ``<stage-one run>/segmenter``) holds ``config.json`` (with the
absolute paths of the stage-one run and the dataset), ``classes.json``, ``dataset.json`` (the
dataset's fingerprint, as in stage one), ``metrics.jsonl`` and ``checkpoints/{last,best}.pt``,
all written atomically; ``resume=True`` continues from ``last.pt`` (a folder holding no run, or
a dataset other than the run's, is an error, found before any pseudo-mask is made); cancelling
(``should_stop`` or closing the generator) checkpoints the position first. The run folders are
checked writable before any work, and a checkpoint that cannot be written (disk full) is one
line naming the checkpoint to resume from. ``best.pt`` is chosen by validation mIoU when the dataset has
validation images with masks, else by the training loss.

The loop is the training skeleton both stages share (:func:`~.engine.run_training`: run folder,
resume, optimiser step, cancel, bookkeeping); this module supplies its :class:`SegmenterTask`.
Batches come from a DataLoader (``num_workers`` worker processes; each item's augmentation then
seeded by ``(seed, epoch, position)``, so any number of workers gives the same run; without
workers the items draw on the global torch RNG in batch order, as earlier versions did).

Under ``torchrun`` the loop runs data-parallel through :class:`~.distributed.DistContext`, as
stage one does: rank ``r`` of N takes every N-th item of each global batch (real and synthetic
shares alike), DistributedDataParallel averages the gradients, batch norms use global
statistics, losses, NaN checks and stop requests are agreed by all ranks, and only rank 0
writes files (it also makes missing pseudo-mask sets while the other ranks wait).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import (
    DatasetSpec,
    MaskedSample,
    WeakSample,
    _apply_geometry,
    _colour_jitter,
    _random_geometry,
    image_size,
    list_images,
    load_dataset,
    read_index_mask,
    to_tensor,
)
from napari_histo_wsss.core.engine import (
    EpochSummary,
    RunContext,
    TrainingTask,
    common_setting,
    item_seed,
    make_loader,
    run_training,
)
from napari_histo_wsss.core.errors import DatasetError, TrainingError
from napari_histo_wsss.core.io.atomic import write_text
from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.models import Segmenter, load_model
from napari_histo_wsss.core.models.backbones import OUTPUT_STRIDES
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.review import MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_PSEUDO
from napari_histo_wsss.core.runs import checkpoint_file
from napari_histo_wsss.core.settings import Settings, positive_sum, setting
from napari_histo_wsss.core.stage2.synthesis import (
    SYNTHESIS_KINDS,
    RealnessFilter,
    consistency_loss,
    group_pools,
    image_level_loss,
    iter_synthesize,
    most_real,
    pool_keys,
)

__all__ = ["SegConfig", "SegSample", "SegDataset", "SegmenterTask", "train_segmenter", "load_segmenter", "recorded_stage_one",
           "mlps_loss", "oeem_weights", "make_pseudo_mask_sets", "PSEUDO_SETS"]

#: The pseudo-mask sets made from a stage-one classifier: name -> (CAM mode, weights of the
#: last-stage CAM and the stride-16 and stride-8 LayerCAMs; None = the classifier's own).
#: ``raw`` is stage one's own pixel rule instead (what ``histo-wsss pseudo-masks`` writes): the
#: raw CAM logits plus the per-class offsets the run's validation calibrated, argmax among the
#: patch's labelled classes, refined by the dense CRF when pydensecrf is installed.
PSEUDO_SETS: dict[str, tuple[str, tuple[float, float, float] | None]] = {
    "fused": ("multi", None),               # the classifier's own fusion of the three depths
    "last": ("last", None),                 # last-stage CAM: coarse, reliable class evidence
    "shallow": ("multi", (0.0, 0.0, 1.0)),  # stride-8 LayerCAM: sharp, noisier boundaries
    "raw": ("raw", None),                   # raw logits + calibrated offsets (+ dense CRF)
}

# Sections of `histo-wsss train-seg --help` and of the Segmenter panel's "Advanced" form.
_RUN, _OPT, _MODEL, _SUP, _PERF = "training settings", "optimisation", "model", "supervision", "performance"
_SYNTH = "HisynSeg synthesis"


@dataclass
class SegConfig(Settings):
    """Everything that defines a segmenter training run (saved as ``config.json``, beside the
    ``records`` of its inputs).

    Each field is declared once with its help, range and choices (:func:`~.settings.setting`);
    validation, ``config.json``, the resume rule, the ``train-seg`` options and the Segmenter
    panel's form all come from these declarations. Optimisation as in stage one (AdamW, the new
    layers ``head_lr_mult`` faster, warm-up then cosine); supervision and synthesis as in the
    module notes above."""

    what = "segmenter setting"
    error = TrainingError
    #: written into config.json beside the settings: the stage-one run, the dataset, what supervised
    records = frozenset({"stage_one", "dataset", "supervision_source"})

    epochs: int = setting(10, range=(1, None), basic=True, resumable=True, group=_RUN, help="number of epochs")
    batch_size: int = setting(8, range=(1, None), basic=True, group=_RUN, help="images per step")
    lr: float = setting(3e-4, range=(0, None), open="lo", basic=True, group=_RUN, label="Learning rate", decimals=6,
                        step=1e-4, help="learning rate of the backbone (new layers: x head_lr_mult)")
    head_lr_mult: float = common_setting("head_lr_mult")
    weight_decay: float = common_setting("weight_decay")
    warmup_steps: int = common_setting("warmup_steps")
    max_steps_per_epoch: int | None = common_setting("max_steps_per_epoch")
    backbone: str = common_setting("backbone")
    weights: str = common_setting("weights")
    output_stride: int = setting(16, choices=OUTPUT_STRIDES, group=_MODEL,
                                 help="8, 16 or 32: feature stride of the DeepLabV3+ encoder (smaller = finer, slower)")
    device: str = common_setting("device")
    seed: int = common_setting("seed")
    amp: bool = common_setting("amp")
    num_workers: int = common_setting("num_workers")
    patch_size: int | None = setting(None, range=(32, None), none="auto", gui=False, group=_SUP,
                                     help="training image side (default: stage one's)")
    augment: bool = setting(True, group=_SUP, label="Augment (flips, turns, colour jitter)",
                            help="flips, 90-degree turns and mild colour jitter of the training images")
    pseudo_sets: tuple[str, ...] = setting(("fused", "last", "shallow"), choices=tuple(PSEUDO_SETS), min_items=1,
                                           group=_SUP, gui=False, label="Pseudo-mask sets",
                                           help="the MLPS pseudo-mask sets made from the stage-one run, in the order of "
                                                "the set weights: fused, last and shallow (CAM depths, per-class "
                                                "normalised) or raw (stage one's raw-logit rule with its calibrated "
                                                "offsets and the dense CRF, as pseudo-masks writes)")
    set_weights: tuple[float, ...] = setting((0.6, 0.2, 0.2), range=(0, None), min_items=1, check=positive_sum,
                                             group=_SUP, label="Mask set weights",
                                             help="loss weights of the pseudo-mask sets (MLPS), e.g. 0.6,0.2,0.2")
    oeem: bool = setting(False, group=_SUP, label="OEEM pixel weighting",
                         help="OEEM pixel weighting of noisy pseudo-masks")
    corrected_weight: float = setting(2.0, range=(0, None), open="lo", group=_SUP, label="Corrected-pixel weight",
                                      help="loss weight of the pixels a pathologist corrected")
    supervision: str = setting("pseudo", choices=("pseudo", "full"), gui=False, group=_SUP,
                               help="pseudo (pseudo-masks) or full (ground truth cropped from a make-patches "
                                    "dataset's source masks: the reference)")
    synthesis: tuple[str, ...] = setting(
        (), choices=SYNTHESIS_KINDS, basic=True, toggle=SYNTHESIS_KINDS, group=_SYNTH,
        label="HisynSeg synthesis (Mosaic + Bezier)",
        help="HisynSeg synthesis: mosaic, bezier or mosaic,bezier. Synthetic images with exact masks, built from "
             "single-label patches, join every batch (plus a consistency loss); helps texture-like classes "
             "(lung tumour/stroma/normal), not gland-shaped ones (docs/benchmarks/stage2.md)")
    synthesis_count: int = setting(256, range=(1, None), group=_SYNTH, label="Synthetic images",
                                   help="synthetic images trained with (after the realness filter)")
    synthesis_share: float = setting(0.5, range=(0, 1), open="both", group=_SYNTH, label="Synthetic share",
                                     help="share of each batch that is synthetic")
    synthesis_filter: bool = setting(True, group=_SYNTH, label="Realness filter",
                                     help="keep the synthetic images a real-vs-synthetic discriminator finds most real")
    synthesis_keep: float = setting(0.5, range=(0, 1), open="lo", group=_SYNTH, label="Realness filter keeps",
                                    help="share of the synthetic images the realness filter keeps")
    filter_steps: int = setting(150, range=(1, None), group=_SYNTH, label="Realness filter steps",
                                help="training steps of the realness filter")
    consistency_weight: float = setting(0.1, range=(0, None), group=_SYNTH, label="Consistency weight",
                                        help="weight of the CAM-segmentation consistency loss (with synthesis)")
    image_loss_weight: float = setting(0.1, range=(0, None), group=_SYNTH, label="Image-level loss weight",
                                       help="weight of the image-level loss of the CAM head (with synthesis)")
    val_max_images: int | None = setting(None, range=(1, None), none="all", resumable=True, group=_SUP,
                                         label="Max. validation images",
                                         help="score at most this many validation images per epoch")


# ---------------------------------------------------------------------------------------------
# samples: an image, its mask sets, optional corrections
# ---------------------------------------------------------------------------------------------
@dataclass
class SegSample:
    """A training image for stage two. ``masks``: one loader per mask set, each giving a uint8
    class-index mask of the image's size (``C`` = ignore); ``corrected``: a loader of ``(mask,
    flag)`` from a pathologist's corrections, or None."""

    name: str
    image: Callable[[], np.ndarray]
    masks: list[Callable[[], np.ndarray]]
    labels: np.ndarray
    corrected: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)


def _resize_to(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if arr.shape[:2] == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


class SegDataset(torch.utils.data.Dataset):
    """``(image (3, s, s), targets (S, s, s) long, weight (s, s) float, labels (C,) float)``:
    mask sets with corrected pixels overriding them, the corrected pixels weighted
    ``corrected_weight``; images and masks resized to ``size`` (nearest for masks) and augmented
    alike (flips, quarter turns; colour jitter on the image)."""

    def __init__(self, samples: Sequence[SegSample], classes: ClassTable, size: int, augment: bool = False,
                 corrected_weight: float = 2.0):
        self.samples = list(samples)
        self.classes = classes
        self.size = int(size)
        self.augment = augment
        self.corrected_weight = float(corrected_weight)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        rgb = s.image()
        h, w = rgb.shape[:2]
        masks = []
        for k, load in enumerate(s.masks):
            m = np.array(load(), dtype=np.uint8)  # a writable copy: corrections are painted into it
            if m.shape != (h, w):
                raise DatasetError(f"{s.name}: mask set {k + 1} is {m.shape[1]}x{m.shape[0]} px but the image is {w}x{h} px")
            masks.append(m)
        weight = np.ones((h, w), dtype=np.float32)
        if s.corrected is not None:
            cm, flag = s.corrected()
            if flag.any():
                for m in masks:
                    m[flag] = cm[flag]
                weight[flag] = self.corrected_weight
        rgb = _resize_to(rgb, self.size, False)
        masks = [_resize_to(m, self.size, True) for m in masks]
        weight = _resize_to(weight, self.size, True) if weight.shape != (self.size, self.size) else weight
        if self.augment:
            geom = _random_geometry()
            rgb = _colour_jitter(_apply_geometry(rgb, geom))
            masks = [_apply_geometry(m, geom) for m in masks]
            weight = _apply_geometry(weight, geom)
        return (to_tensor(rgb), torch.from_numpy(np.stack(masks).astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(weight)), torch.from_numpy(s.labels.astype(np.float32)))


class _SyntheticDataset(torch.utils.data.Dataset):
    """Synthetic ``(image, exact mask)`` pairs in the :class:`SegDataset` item format (one mask
    set, weight 1, labels from the mask)."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], classes: ClassTable, n_sets: int):
        self.pairs = list(pairs)
        self.classes = classes
        self.n_sets = n_sets

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rgb, mask = self.pairs[i]
        geom = _random_geometry()
        rgb, mask = _apply_geometry(rgb, geom), _apply_geometry(mask, geom)
        counts = np.bincount(mask.ravel(), minlength=self.classes.background_index + 1)[: self.classes.num_classes]
        m = torch.from_numpy(mask.astype(np.int64))
        return (to_tensor(rgb), m[None].expand(self.n_sets, -1, -1).clone(), torch.ones(mask.shape),
                torch.from_numpy((counts > 0).astype(np.float32)))


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def oeem_weights(loss: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """OEEM pixel weights (B, H, W): per image with >= 2 target classes, ``n_valid * softmax(-loss)``
    over its valid pixels (easy pixels weigh more, mean weight 1); 1 on single-class images."""
    b = loss.shape[0]
    w = torch.ones_like(loss)
    for i in range(b):
        v = valid[i]
        if int(v.sum()) == 0:
            continue
        present = torch.unique(targets[i][v])
        present = present[present != ignore_index]
        if present.numel() < 2:
            continue
        neg = torch.where(v, -loss[i].detach(), torch.full_like(loss[i], -torch.inf))
        w[i] = torch.softmax(neg.flatten(), dim=0).view_as(neg) * v.sum()
    return w


def mlps_loss(logits: torch.Tensor, targets: torch.Tensor, set_weights: Sequence[float], ignore_index: int,
              pixel_weight: torch.Tensor | None = None, oeem: bool = False) -> torch.Tensor:
    """Weighted cross-entropy over several target sets: ``sum_s w_s * CE(logits, targets[:, s])``
    per pixel (ignored pixels contribute 0), optionally times OEEM and per-pixel weights,
    normalised by the weighted count of supervised pixels. ``targets``: (B, S, H, W) long."""
    s = targets.shape[1]
    if len(set_weights) < s:
        raise TrainingError(f"{s} mask sets but only {len(set_weights)} set weights {list(set_weights)}")
    total = torch.zeros(logits.shape[0], *logits.shape[-2:], device=logits.device)
    norm = torch.zeros_like(total)
    lf = logits.float()
    for k in range(s):
        t = targets[:, k]
        ce = F.cross_entropy(lf, t.clamp_max(lf.shape[1] - 1).masked_fill(t == ignore_index, 0), reduction="none")
        valid = (t != ignore_index).float()
        total = total + set_weights[k] * ce * valid
        norm = norm + set_weights[k] * valid
    weight = torch.ones_like(total) if pixel_weight is None else pixel_weight.to(total.dtype)
    if oeem:
        per_pixel = total / norm.clamp_min(1e-6)
        weight = weight * oeem_weights(per_pixel, norm > 0, targets[:, 0], ignore_index)
    return (total * weight).sum() / (norm * weight).sum().clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------
# where the masks come from
# ---------------------------------------------------------------------------------------------
def _stage_one_dataset(run_dir: Path) -> Path:
    """The dataset a stage-one run was trained on, if the run records it."""
    for name, key in (("dataset.json", "path"), ("config.json", "dataset")):
        p = run_dir / name
        if p.is_file():
            try:
                value = json.loads(p.read_text(encoding="utf-8")).get(key)
            except (OSError, ValueError) as e:
                raise TrainingError(f"{p}: unreadable: {e}") from e
            if value:
                return Path(value)
    raise TrainingError(f"{run_dir}: the run does not record its training dataset; pass the dataset folder explicitly")


def make_pseudo_mask_sets(model: torch.nn.Module, classes: ClassTable, images_dir: Path, out_dir: Path,
                          sets: Sequence[str] = ("fused", "last", "shallow"), batch_size: int = 16,
                          device: torch.device | str | None = None,
                          should_stop: Callable[[], bool] | None = None,
                          offsets: Sequence[float] | None = None) -> Iterator[Any]:
    """Write the MLPS pseudo-mask sets of a folder of weakly labelled patches (labels in the
    names) to ``out_dir/<set>/<stem>.png``; a complete earlier result is reused.

    One pass per batch of same-sized patches: :meth:`CAMClassifier.layer_cams` gives the last-stage
    CAM and the two LayerCAMs once, and every CAM set is a weighting of them (:data:`PSEUDO_SETS`),
    turned into a mask by :func:`~.cams.pseudo_mask` (gated by the image labels, white glass =
    background). The ``raw`` set takes the raw CAM logits of the same batch plus ``offsets`` (the
    run's calibrated ``prob-raw`` offsets; None = zeros) through :func:`~.cams.raw_argmax_mask`,
    gated by the labels and refined by the dense CRF when pydensecrf is installed (a ``log`` event
    says when it is not). Yields ``log`` events with the progress, or ``cancelled``."""
    from napari_histo_wsss.core.data.datasets import parse_label_name, read_rgb
    from napari_histo_wsss.core.models.classifier import normalize_cams
    from napari_histo_wsss.core.stage1.cams import pseudo_mask, raw_argmax_mask, save_pseudo_mask
    from napari_histo_wsss.core.stage1.refine import CRF_MISSING, crf_available

    for name in sets:
        if name not in PSEUDO_SETS:
            raise TrainingError(f"unknown pseudo-mask set {name!r}; choose from {', '.join(PSEUDO_SETS)}")
    images = list_images(images_dir)
    marker = out_dir / ".complete"
    if marker.is_file() and all((out_dir / n).is_dir() and len(list_images(out_dir / n)) == len(images) for n in sets):
        return
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    fused_w = list(model.arch.get("cam_weights", (0.5, 0.25, 0.25)))
    cam_sets = [n for n in sets if PSEUDO_SETS[n][0] != "raw"]
    weights = {n: ([1.0, 0.0, 0.0] if PSEUDO_SETS[n][0] == "last" else list(PSEUDO_SETS[n][1] or fused_w)) for n in cam_sets}
    raw_sets = [n for n in sets if PSEUDO_SETS[n][0] == "raw"]
    refine = "crf" if crf_available() else "none"
    if raw_sets and refine == "none":
        yield ProgressEvent("log", message=f"pseudo-mask set raw: {CRF_MISSING}")
    by_size: dict[tuple[int, int], list[Path]] = {}
    for p in images.values():
        by_size.setdefault(image_size(p), []).append(p)
    done, n = 0, len(images)
    for paths in by_size.values():
        for i in range(0, len(paths), batch_size):
            if should_stop is not None and should_stop():
                yield ProgressEvent("cancelled", step=done, steps=n, message=f"pseudo-masks stopped after {done} of {n} images")
                return
            chunk = paths[i:i + batch_size]
            rgbs = [read_rgb(p) for p in chunk]
            x = torch.stack([to_tensor(r) for r in rgbs]).to(dev)
            labels = [classes.check_labels(parse_label_name(p)[1], where=str(p)) for p in chunk]
            if cam_sets:
                maps = model.layer_cams(x)
            for name in cam_sets:
                fused = normalize_cams(sum(w * m for w, m in zip(weights[name], maps) if w > 0)).cpu().numpy()
                for p, rgb, cam, lab in zip(chunk, rgbs, fused, labels):
                    save_pseudo_mask(out_dir / name / f"{p.stem}.png", pseudo_mask(cam, classes, rgb=rgb, labels=lab), classes)
            if raw_sets:
                with torch.no_grad():
                    logits = model.forward_features(x)["cam"].float()
                    logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).cpu().numpy()
                for name in raw_sets:
                    for p, rgb, lg, lab in zip(chunk, rgbs, logits, labels):
                        m = raw_argmax_mask(lg, classes, offsets, rgb=rgb, labels=lab, refine=refine)
                        save_pseudo_mask(out_dir / name / f"{p.stem}.png", m, classes)
            done += len(chunk)
            yield ProgressEvent("log", step=done, steps=n, message=f"pseudo-masks {done}/{n}")
    write_text(marker, "")


def _folder_masks(samples: Sequence[WeakSample], folder: Path, classes: ClassTable) -> list[Callable[[], np.ndarray]]:
    """Loaders of the masks named like each sample (same stem) in ``folder``; every image must
    have one of its size (DatasetError naming the first that does not)."""
    masks = list_images(folder)
    missing = [s for s in samples if s.name not in masks]
    if missing:
        raise DatasetError(f"{folder}: no mask for {len(missing)} of {len(samples)} training images, "
                           f"e.g. {missing[0].name}.png")
    out = []
    for s in samples:
        mp = masks[s.name]
        if s.path is not None and image_size(mp) != image_size(s.path):
            (w, h), (mw, mh) = image_size(s.path), image_size(mp)
            raise DatasetError(f"{mp}: mask is {mw}x{mh} px but its image {s.path.name} is {w}x{h} px")
        out.append(lambda mp=mp: read_index_mask(mp, classes))
    return out


def _source_masks(spec: DatasetSpec) -> list[Callable[[], np.ndarray]]:
    """Ground-truth crops of make-patches training patches, from the source masks recorded in
    ``make_patches.json`` (patches reaching past a small image are padded with background)."""
    info_path, csv_path = spec.root / "make_patches.json", spec.root / "patches.csv"
    if spec.layout != "patches" or not info_path.is_file() or not csv_path.is_file():
        raise DatasetError(f"{spec.root}: full supervision without a mask folder needs a make-patches dataset "
                           "(patches.csv + make_patches.json); otherwise pass the ground-truth mask folder")
    settings = json.loads(info_path.read_text(encoding="utf-8"))["settings"]
    masks_dir = Path(settings["masks_dir"])
    if not masks_dir.is_dir():
        raise DatasetError(f"{info_path}: source mask folder {masks_dir} not found")
    sources = list_images(masks_dir)
    rows = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows[Path(row["file"]).stem] = row
    bg = spec.classes.background_index
    out = []
    for s in spec.train:
        row = rows.get(s.name)
        if row is None:
            raise DatasetError(f"{csv_path}: no row for training patch {s.name}")
        src = sources.get(Path(row["source"]).stem)
        if src is None:
            raise DatasetError(f"{masks_dir}: no source mask for {row['source']}")
        x, y, size = int(row["x"]), int(row["y"]), int(row["size"])

        def load(src=src, x=x, y=y, size=size) -> np.ndarray:
            m = read_index_mask(src, spec.classes)
            crop = np.full((size, size), bg, dtype=np.uint8)
            part = m[y:y + size, x:x + size]
            crop[: part.shape[0], : part.shape[1]] = part
            return crop
        out.append(load)
    return out


def _project_samples(spec: DatasetSpec) -> list[SegSample]:
    """Labelled project patches with the project's pseudo-mask and corrections cropped to them."""
    from napari_histo_wsss.core.data.project import Project

    project = Project.open(spec.root)
    size = int(project.settings["patch_size"])
    cache: dict[tuple[str, str], tuple[np.ndarray, float] | None] = {}

    def mask_of(sid: str, name: str) -> tuple[np.ndarray, float] | None:
        if (sid, name) not in cache:
            cache[(sid, name)] = project.read_mask(sid, name)
        return cache[(sid, name)]

    bg = spec.classes.background_index

    def crop(arr: np.ndarray, ds: float, x: int, y: int, s0: int, size: int, fill: int = bg) -> np.ndarray:
        # a patch reaching past the mask is padded with background/ignore (never with class 0)
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        n = max(1, int(round(s0 / ds)))
        part = np.full((n, n), fill, dtype=arr.dtype)
        src = arr[y0:y0 + n, x0:x0 + n]
        part[: src.shape[0], : src.shape[1]] = src
        return _resize_to(part, size, True)

    out = []
    for s in spec.train:
        sid, x, y, s0 = s.name.rsplit("_", 3)
        x, y, s0 = int(x), int(y), int(s0)
        pseudo = mask_of(sid, MASK_PSEUDO)
        if pseudo is None:
            raise DatasetError(f"{spec.root}: slide {sid} has labelled patches but no pseudo-mask; "
                               "make its pseudo-masks (review step) before training the segmenter")
        corr, flag = mask_of(sid, MASK_CORRECTED), mask_of(sid, MASK_CORRECTED_FLAG)

        def load_mask(arr=pseudo[0], ds=pseudo[1], x=x, y=y, s0=s0, size=size) -> np.ndarray:
            return crop(arr, ds, x, y, s0, size)

        corrected = None
        if corr is not None and flag is not None:
            def corrected(c=corr, f=flag, x=x, y=y, s0=s0, size=size) -> tuple[np.ndarray, np.ndarray]:
                return (crop(c[0], c[1], x, y, s0, size),
                        crop(f[0].astype(np.uint8), f[1], x, y, s0, size, fill=0).astype(bool))
        out.append(SegSample(s.name, s.image, [load_mask], s.labels, corrected))
    return out


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
def _evaluate(model: Segmenter, samples: Sequence[MaskedSample], classes: ClassTable, device: torch.device,
              tile: int, should_stop: Callable[[], bool] | None) -> dict | None:
    from napari_histo_wsss.core.stage2.infer import predict_image, segmenter_predict_fn

    fn = segmenter_predict_fn(model, classes, device)
    cm = ConfusionMatrix(classes.background_index + 1, classes.background_index)
    for s in samples:
        if should_stop is not None and should_stop():
            return None
        scores = predict_image(s.image(), fn, tile=max(tile, 512), overlap=64)
        cm.update(np.argmax(scores, axis=0), s.mask())
    model.train()
    return cm.scores(classes.names)


def load_segmenter(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu"
                   ) -> tuple[Segmenter, ClassTable, SegConfig, dict]:
    """The trained segmenter of a run folder (a segmenter run, or a stage-one run holding
    ``segmenter/``), its class table, config and checkpoint meta (its ``stage_one`` made
    absolute, also for runs that recorded it relative: :func:`recorded_stage_one`)."""
    path = checkpoint_file(Path(run_dir), which, subrun="segmenter")
    run = path.parent.parent if path.parent.name == "checkpoints" else Path(run_dir)
    if not path.is_file():
        raise TrainingError(f"{run}: no segmenter checkpoint (train-seg first)")
    model, meta = load_model(path, map_location=map_location)
    if not isinstance(model, Segmenter):
        raise TrainingError(f"{path}: holds a {meta.get('kind')} model, not a segmenter")
    classes = ClassTable.from_dict(meta["classes"])
    cfg = SegConfig.from_dict(meta.get("config", {}))
    if meta.get("stage_one"):
        seg_dir = path.parent.parent if path.parent.name == "checkpoints" else run
        meta["stage_one"] = recorded_stage_one(meta["stage_one"], seg_dir)
    return model, classes, cfg, meta


def _is_stage_one_run(folder: Path) -> bool:
    try:
        return "method" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def recorded_stage_one(recorded: str, seg_dir: str | Path) -> str:
    """The stage-one run a segmenter run records, as an absolute path. Runs are saved with it
    absolute; older runs kept it as typed, often relative to the folder the command ran in, so
    such an entry is looked up against each folder above the segmenter run (which, by default,
    lies inside its stage-one run), then the current folder, then taken to be the segmenter run's
    parent if that is a stage-one run; otherwise it is returned unchanged (loading it then names
    it)."""
    p = Path(recorded)
    if p.is_absolute():
        return recorded
    seg = Path(seg_dir).resolve()
    for base in (*seg.parents, Path.cwd()):
        if _is_stage_one_run(base / p):
            return str((base / p).resolve())
    if _is_stage_one_run(seg.parent):
        return str(seg.parent)
    return recorded


def train_segmenter(
    run_dir: str | Path,
    pseudo_masks: str | Path | Sequence[str | Path] | None = None,
    config: SegConfig | None = None,
    dataset: DatasetSpec | str | Path | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Any]:
    """Train a segmenter for the stage-one run ``run_dir`` (see the module docstring).

    ``pseudo_masks``: one folder or several (MLPS sets, weighted by ``config.set_weights``) of
    masks named like the training images; a folder of ground-truth masks trains the fully
    supervised reference. None: make the sets from the stage-one classifier (or, for a project
    dataset, use its pseudo-mask and corrections). ``dataset``: the training data (default: the
    one the run records). ``out_dir``: default ``run_dir/segmenter``.

    Yields ``start``, ``log``, ``step``, ``epoch``, ``checkpoint`` and ``done``/``cancelled``
    progress events (``core.progress.ProgressEvent``). The loop itself is
    :func:`~.engine.run_training`, as for stage one; this stage is its :class:`SegmenterTask`.
    """
    cfg = config or SegConfig()
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "segmenter"
    yield from run_training(SegmenterTask(run, pseudo_masks, cfg, dataset), cfg, out, resume, should_stop)


class _BatchItems(torch.utils.data.Dataset):
    """The items of stage two's batches, by key ``(synthetic, index, seed)``: item ``index`` of
    the real or the synthetic dataset. With a ``seed`` its random augmentation depends on that
    seed only (loader workers: the same run for any number of them); without, it draws on the
    global torch RNG in the training process, in batch order (no workers: the random stream of
    earlier versions, so their runs repeat exactly)."""

    def __init__(self, real: torch.utils.data.Dataset, synthetic: torch.utils.data.Dataset | None):
        self.real, self.synthetic = real, synthetic

    def __len__(self) -> int:
        return len(self.real) + (len(self.synthetic) if self.synthetic is not None else 0)

    def __getitem__(self, key: tuple[bool, int, int | None]) -> Any:
        synthetic, i, seed = key
        ds = self.synthetic if synthetic else self.real
        if seed is None:
            return ds[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ds[i]


class SegmenterTask(TrainingTask):
    """Stage two for :func:`~.engine.run_training`: a DeepLabV3+ segmenter on (corrected)
    pseudo-mask sets or ground truth, optionally with HisynSeg synthetic images mixed into every
    batch; validated by mIoU on the dataset's validation images (without them, best.pt follows
    the train loss)."""

    what = "segmenter run"
    trained = "trained segmenter"
    loss_per_item = False  # the train loss is the mean of the steps' losses
    higher_is_better = True  # val mIoU, or minus the train loss without validation images

    def __init__(self, run: Path, pseudo_masks: str | Path | Sequence[str | Path] | None, cfg: SegConfig,
                 dataset: DatasetSpec | str | Path | None):
        super().__init__(cfg)
        self.stage_one, self.pseudo_masks, self.dataset = Path(run), pseudo_masks, dataset

    def check_inputs(self) -> None:
        if not self.stage_one.is_dir():
            raise TrainingError(f"{self.stage_one}: stage-one run folder not found")

    def load(self, ctx: RunContext) -> None:
        from napari_histo_wsss.core.stage1.train import load_run

        run, cfg, dataset = self.stage_one, self.cfg, self.dataset
        self.classifier, classes, cls_cfg = load_run(run)
        spec = dataset if isinstance(dataset, DatasetSpec) else load_dataset(dataset or _stage_one_dataset(run), classes)
        if spec.classes.names != classes.names:
            raise TrainingError(f"{spec.root}: dataset classes ({', '.join(spec.classes.names)}) differ from the "
                                f"stage-one run's ({', '.join(classes.names)})")
        if not spec.train:
            raise DatasetError(f"{spec.root}: no training images")
        self.classes, self.spec = classes, spec
        self.patch_size = cfg.patch_size or cls_cfg.patch_size or _common_side(spec.train)
        self.val = list(spec.val)[: cfg.val_max_images] if cfg.val_max_images else list(spec.val)
        self.signal_name = "val mIoU" if self.val else "train loss"

    @property
    def classes_source(self) -> str:
        return f"the stage-one run {self.stage_one}"

    def run_apart_from(self, run: Path) -> tuple[list[Path], list[Path]]:
        """Also the stage-one run: the segmenter run may not be or hold it (its checkpoints and
        config would be replaced), and lies inside it only as its ``segmenter/`` (the default)."""
        inputs, holders = super().run_apart_from(run)
        default = Path(os.path.realpath(run)) == Path(os.path.realpath(self.stage_one / "segmenter"))
        return ([*inputs], [*holders, self.stage_one]) if default else ([*inputs, self.stage_one], [*holders])

    def prepare(self, ctx: RunContext) -> Iterator[ProgressEvent]:
        """The supervision: mask sets (made from the classifier when none are given), or the
        project's pseudo-mask and corrections."""
        cfg, spec, classes, pseudo_masks = self.cfg, self.spec, self.classes, self.pseudo_masks
        if spec.layout == "project" and pseudo_masks is None:
            samples = _project_samples(spec)
            source = "project pseudo-mask + corrections"
        else:
            if any(s.path is None for s in spec.train):
                raise DatasetError(f"{spec.root}: mask folders need training images stored as files")
            if cfg.supervision == "full" and pseudo_masks is None:
                sets = [_source_masks(spec)]
                source = "ground truth (make-patches source masks)"
            else:
                if pseudo_masks is None:
                    folder = ctx.run / "pseudo"
                    images_dir = spec.train[0].path.parent
                    if ctx.main:
                        from napari_histo_wsss.core.stage1.train import calibrated_offsets

                        yield ProgressEvent("log", message=f"making pseudo-mask sets {', '.join(cfg.pseudo_sets)} under {folder}")
                        for ev in make_pseudo_mask_sets(self.classifier, classes, images_dir, folder, sets=cfg.pseudo_sets,
                                                        device=ctx.device, should_stop=ctx.validation_stop,
                                                        offsets=calibrated_offsets(self.stage_one, "best", "prob-raw")):
                            yield ev
                            if ev.kind == "cancelled":
                                return
                    ctx.dctx.barrier()  # the other ranks read what rank 0 wrote
                    folders = [folder / name for name in cfg.pseudo_sets]
                else:
                    folders = ([Path(pseudo_masks)] if isinstance(pseudo_masks, (str, Path))
                               else [Path(p) for p in pseudo_masks])
                for f in folders:
                    if not f.is_dir():
                        raise DatasetError(f"{f}: pseudo-mask folder not found")
                sets = [_folder_masks(spec.train, f, classes) for f in folders]
                source = ", ".join(str(f) for f in folders)
            samples = [SegSample(s.name, s.image, [ms[i] for ms in sets], np.asarray(s.labels))
                       for i, s in enumerate(spec.train)]
        n_sets = len(samples[0].masks)
        set_weights = tuple(cfg.set_weights[:n_sets]) if len(cfg.set_weights) >= n_sets else (1.0,) * n_sets
        if n_sets == 1:
            set_weights = (1.0,)
        self.samples, self.source, self.n_sets, self.set_weights = samples, source, n_sets, set_weights

    def build_model(self, ctx: RunContext, fresh: bool) -> torch.nn.Module:
        cfg = self.cfg
        return Segmenter(self.classes.num_classes, cfg.backbone, cfg.weights if fresh else "none",
                         cfg.output_stride, aux_head=bool(cfg.synthesis)).to(ctx.device)

    def setup(self, ctx: RunContext, model: torch.nn.Module) -> Iterator[ProgressEvent]:
        cfg, classes, patch = self.cfg, self.classes, self.patch_size
        synth_ds = None
        if cfg.synthesis:
            pairs = yield from self._synthesise(ctx)
            if pairs is None:
                return
            synth_ds = _SyntheticDataset(pairs, classes, self.n_sets)
        real_ds = SegDataset(self.samples, classes, patch, augment=cfg.augment, corrected_weight=cfg.corrected_weight)
        n_synth = int(round(cfg.batch_size * cfg.synthesis_share)) if synth_ds is not None else 0
        n_real = max(1, cfg.batch_size - n_synth)
        if n_real < ctx.world:
            raise TrainingError(f"{n_real} real images per batch cannot be shared by {ctx.world} processes; "
                                f"raise the batch size or lower the synthesis share")
        steps = max(1, len(real_ds) // cfg.batch_size)  # the same compute per epoch with or without synthesis
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.items = _BatchItems(real_ds, synth_ds)
        self.n_real, self.n_synth = n_real, n_synth
        self.local_real = len(range(ctx.rank, n_real, ctx.world))
        self.steps = steps

    def _synthesise(self, ctx: RunContext) -> Generator[ProgressEvent, None, list | None]:
        """HisynSeg's synthetic ``(image, mask)`` pairs, kept by the realness filter. Each phase
        (sorting the patches into pools, synthesis, loading real patches, training the filter,
        scoring) yields a ``step`` event per unit of work with its ETA and polls ``should_stop``
        before each unit; a stop yields ``cancelled`` and returns None, with nothing written."""
        cfg, spec, classes = self.cfg, self.spec, self.classes
        stop = ctx.validation_stop  # (distributed: the training loop's stop, which all ranks agree on)
        phases = ["sorting single-label patches", "synthesising images", "loading real patches",
                  "training the realness filter", "scoring synthetic images"][: 5 if cfg.synthesis_filter else 2]

        def phase(items: Iterator[Any], n: int) -> Generator[ProgressEvent, None, list | None]:
            name = phases[len(done)]
            done.append(name)
            out = yield from _tracked(items, n, f"{name} ({len(done)} of {len(phases)})", stop)
            if out is None:
                kept = (f"checkpoint {ctx.last_path} unchanged (resume to continue)" if ctx.last_path.is_file()
                        else "nothing saved yet: start the run again")
                yield ProgressEvent("cancelled", step=0, steps=n, message=f"stopped while {name}; {kept}")
            return out

        done: list[str] = []
        keys = yield from phase(pool_keys(spec.train), len(spec.train))
        if keys is None:
            return None
        pools = group_pools(spec.train, keys, classes)
        want = cfg.synthesis_count
        n_make = int(math.ceil(want / cfg.synthesis_keep)) if cfg.synthesis_filter else want
        sizes = ", ".join(f"{classes.names[k]} {len(v)}" for k, v in sorted(pools.items()))
        yield ProgressEvent("log", message=f"synthesising {n_make} {'/'.join(cfg.synthesis)} images "
                                           f"from single-label patches ({sizes})")
        pairs = yield from phase(iter_synthesize(pools, classes, n_make, self.patch_size, cfg.synthesis, seed=cfg.seed),
                                 n_make)
        if pairs is None or not cfg.synthesis_filter:
            return pairs
        order = np.random.default_rng(cfg.seed).permutation(len(spec.train))[:256]
        real = yield from phase((spec.train[i].image() for i in order), len(order))
        if real is None:
            return None
        filt = RealnessFilter(steps=cfg.filter_steps, seed=cfg.seed, device=ctx.device)
        images = [p[0] for p in pairs]
        losses = yield from phase(filt.fit_steps(real, images), cfg.filter_steps)
        if losses is None:
            return None
        scores = yield from phase(filt.score_batches(images), -(-len(images) // filt.SCORE_BATCH))
        if scores is None:
            return None
        pairs = [pairs[i] for i in most_real(np.concatenate(scores), cfg.synthesis_keep)]
        ctx.info.append(f"realness filter kept {len(pairs)} of {n_make} synthetic images "
                         f"(discriminator loss {np.mean(losses[-20:]):.3f})")
        return pairs

    def run_record(self) -> dict:
        # absolute paths: `predict --gate` and a resume find the stage-one run from any folder
        return {**self.cfg.to_dict(), "stage_one": str(self.stage_one.resolve()),
                "dataset": str(Path(self.spec.root).resolve()), "supervision_source": self.source}

    def checkpoint_meta(self) -> dict:
        return {"stage_one": str(self.stage_one.resolve())}

    def start_message(self, ctx: RunContext) -> str:
        return (f"segmenter on {len(self.samples)} images ({self.patch_size} px) from {self.source}; "
                f"{self.n_sets} mask set(s) weighted {list(self.set_weights)}; device {ctx.device}"
                f"{f' x {ctx.world} processes' if ctx.world > 1 else ''}")

    def batches(self, ctx: RunContext, epoch: int, first: int) -> Iterable[Any]:
        cfg, n_real, n_synth, rank, world = self.cfg, self.n_real, self.n_synth, ctx.rank, ctx.world
        real, synth = self.items.real, self.items.synthetic
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(real), generator=g).tolist()
        s_order = torch.randperm(len(synth), generator=g).tolist() if synth is not None else []
        workers = cfg.num_workers > 0

        def seed(slot: int) -> int | None:  # slot: position in the epoch's global batches
            return item_seed(cfg.seed, epoch, slot) if workers else None

        keys = []
        for b in range(first, self.steps):
            # this rank's share of the global batch: every world-th real and synthetic item
            step = [(False, order[(b * n_real + j) % len(order)], seed(b * cfg.batch_size + j))
                    for j in range(rank, n_real, world)]
            if n_synth:
                step += [(True, s_order[(b * n_synth + j) % len(s_order)], seed(b * cfg.batch_size + n_real + j))
                         for j in range(rank, n_synth, world)]
            keys.append(step)
        return make_loader(self.items, num_workers=cfg.num_workers, pin=ctx.pin, batches=keys)

    def loss(self, ctx: RunContext, net: torch.nn.Module, batch: Any, epoch: int, step: int) -> tuple[torch.Tensor, int]:
        cfg = self.cfg
        x, targets, weight, labels = (t.to(ctx.device) for t in batch)
        with ctx.autocast():
            if cfg.synthesis:
                logits, aux_logits, cam = net(x, return_aux=True)
            else:
                logits = net(x)
        loss = mlps_loss(logits, targets, self.set_weights, self.classes.background_index, weight, oeem=cfg.oeem)
        if cfg.synthesis:  # the image-level head and the consistency term learn from the real images only
            real = slice(0, self.local_real)
            loss = loss + cfg.image_loss_weight * image_level_loss(aux_logits[real], labels[real])
            loss = loss + cfg.consistency_weight * consistency_loss(logits[real], cam[real])
        return loss, x.shape[0]

    def validate(self, ctx: RunContext, model: torch.nn.Module) -> dict | None:
        if not self.val:
            return {}
        scores = _evaluate(model, self.val, self.classes, ctx.device, self.patch_size, ctx.validation_stop)
        if scores is None:
            return None
        return {"val_miou": scores["miou"], "val_per_class_iou": scores["per_class_iou"]}

    def signal(self, val: dict, train_loss: float) -> float | None:
        return val["val_miou"] if val else -train_loss

    def format_signal(self, value: float | None) -> str:
        if value is not None and not self.val:
            value = -value  # the train loss, kept negated so that higher is better
        return super().format_signal(value)

    def epoch_row(self, ctx: RunContext, s: EpochSummary) -> dict:
        return {"epoch": s.epoch, "train_loss": s.train_loss, "lr": s.lr,
                "val_miou": s.val.get("val_miou"), "val_per_class_iou": s.val.get("val_per_class_iou"),
                "seconds": s.seconds}


def _tracked(items: Iterator[Any], n: int, what: str,
             should_stop: Callable[[], bool] | None) -> Generator[ProgressEvent, None, list | None]:
    """Collect the ``n`` items of ``items``, yielding a ``step`` event (``what``, with an ETA)
    after each and polling ``should_stop`` before each; None when it asked to stop."""
    out: list = []
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        if should_stop is not None and should_stop():
            return None
        out.append(next(items))
        elapsed = time.perf_counter() - t0
        yield ProgressEvent("step", step=i, steps=n, eta_s=elapsed / i * (n - i), message=what)
    return out


def _common_side(samples: Sequence[WeakSample]) -> int:
    sides = [min(image_size(s.path)) for s in samples[:200] if s.path is not None]
    if not sides:
        return 224
    return int(np.bincount(sides).argmax())
