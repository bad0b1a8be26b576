"""Stage two: train a DeepLabV3+ segmenter on (corrected) pseudo-masks, as a cancellable
generator of progress events.

Supervision, per training image (design notes section 6):

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
* **Full supervision** (the reference): a folder of ground-truth masks as the only mask set, or
  ``supervision="full"`` on a make-patches dataset, which crops each patch's mask from the
  source masks recorded in ``make_patches.json``.

Without mask folders, the pseudo-mask sets are made from the stage-one run's training patches
(:func:`make_pseudo_mask_sets`: one multi-layer CAM pass, gated by the labels in the file names) under
``<out>/pseudo/<set>/`` and reused by later runs.

A segmenter run folder (default ``<stage-one run>/segmenter``) holds ``config.json``,
``classes.json``, ``metrics.jsonl`` and ``checkpoints/{last,best}.pt``, all written atomically;
``resume=True`` continues from ``last.pt``; cancelling (``should_stop`` or closing the generator)
checkpoints the position first. ``best.pt`` is chosen by validation mIoU when the dataset has
validation images with masks, else by the training loss.

Under ``torchrun`` the loop runs data-parallel through :class:`~.distributed.DistContext`, as
stage one does: rank ``r`` of N takes every N-th item of each global batch (real and synthetic
shares alike), DistributedDataParallel averages the gradients, batch norms use global
statistics, losses, NaN checks and stop requests are agreed by all ranks, and only rank 0
writes files (it also makes missing pseudo-mask sets while the other ranks wait).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import remove_temporaries, write_json, write_text
from .classes import ClassTable
from .datasets import (
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
from .device import autocast, grad_scaler, seed_everything
from .distributed import DistContext
from .errors import DatasetError, TrainingError
from .metrics import ConfusionMatrix
from .models import Segmenter, check_classes, load_checkpoint, load_model, save_model
from .synthesis import (
    SYNTHESIS_KINDS,
    RealnessFilter,
    consistency_loss,
    image_level_loss,
    single_label_pools,
    synthesize,
)

__all__ = ["SegConfig", "SegSample", "SegDataset", "train_segmenter", "load_segmenter", "mlps_loss",
           "oeem_weights", "make_pseudo_mask_sets", "PSEUDO_SETS"]

#: The pseudo-mask sets made from a stage-one classifier: name -> (CAM mode, weights of the
#: last-stage CAM and the stride-16 and stride-8 LayerCAMs; None = the classifier's own).
PSEUDO_SETS: dict[str, tuple[str, tuple[float, float, float] | None]] = {
    "fused": ("multi", None),               # the classifier's own fusion of the three depths
    "last": ("last", None),                 # last-stage CAM: coarse, reliable class evidence
    "shallow": ("multi", (0.0, 0.0, 1.0)),  # stride-8 LayerCAM: sharp, noisier boundaries
}

# Settings that may change when resuming (others would make it a different run).
_RESUMABLE = frozenset({"epochs", "device", "amp", "num_workers", "val_max_images"})


@dataclass
class SegConfig:
    """Everything that defines a segmenter training run (saved as ``config.json``)."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    max_steps_per_epoch: int | None = None
    backbone: str = "efficientnet-lite0"
    weights: str = "imagenet"
    output_stride: int = 16
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    num_workers: int = 0
    patch_size: int | None = None
    augment: bool = True
    set_weights: tuple[float, ...] = (0.6, 0.2, 0.2)
    oeem: bool = False
    corrected_weight: float = 2.0
    supervision: str = "pseudo"
    synthesis: tuple[str, ...] = ()
    synthesis_count: int = 256
    synthesis_share: float = 0.5
    synthesis_filter: bool = True
    synthesis_keep: float = 0.5
    filter_steps: int = 150
    consistency_weight: float = 0.1
    image_loss_weight: float = 0.1
    val_max_images: int | None = None

    def __post_init__(self) -> None:
        self.set_weights = tuple(float(w) for w in self.set_weights)
        self.synthesis = tuple(str(s) for s in self.synthesis)

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}"),
            (bool(self.set_weights) and min(self.set_weights) >= 0 and sum(self.set_weights) > 0,
             f"set_weights must be non-negative with a positive sum, got {list(self.set_weights)}"),
            (self.corrected_weight > 0, f"corrected_weight must be positive, got {self.corrected_weight}"),
            (self.supervision in ("pseudo", "full"), f"supervision must be pseudo or full, got {self.supervision!r}"),
            (all(s in SYNTHESIS_KINDS for s in self.synthesis),
             f"synthesis must be among {', '.join(SYNTHESIS_KINDS)}, got {list(self.synthesis)}"),
            (0 < self.synthesis_share < 1, f"synthesis_share must lie in (0, 1), got {self.synthesis_share}"),
            (0 < self.synthesis_keep <= 1, f"synthesis_keep must lie in (0, 1], got {self.synthesis_keep}"),
            (self.synthesis_count >= 1, f"synthesis_count must be >= 1, got {self.synthesis_count}"),
            (self.patch_size is None or self.patch_size >= 32, f"patch size must be >= 32 px, got {self.patch_size}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1 or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"segmenter setting: {message}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["set_weights"] = list(self.set_weights)
        d["synthesis"] = list(self.synthesis)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"unknown segmenter settings: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def saved(cls, seg_dir: str | Path) -> "SegConfig":
        """The settings a segmenter run folder was trained with (its ``config.json``, without the
        records written beside them: ``stage_one``, ``dataset``, ``supervision_source``); an
        unreadable file is a TrainingError naming it."""
        path = Path(seg_dir) / "config.json"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path}: unreadable run config: {e}") from e
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in d.items() if k in known})


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
                          sets: Sequence[str] = tuple(PSEUDO_SETS), batch_size: int = 16,
                          device: torch.device | str | None = None,
                          should_stop: Callable[[], bool] | None = None) -> Iterator[Any]:
    """Write the MLPS pseudo-mask sets of a folder of weakly labelled patches (labels in the
    names) to ``out_dir/<set>/<stem>.png``; a complete earlier result is reused.

    One pass per batch of same-sized patches: :meth:`CAMClassifier.layer_cams` gives the last-stage
    CAM and the two LayerCAMs once, and every set is a weighting of them (:data:`PSEUDO_SETS`),
    turned into a mask by :func:`~.cams.pseudo_mask` (gated by the image labels, white glass =
    background). Yields ``log`` events with the progress, or ``cancelled``."""
    from .cams import pseudo_mask, save_pseudo_mask
    from .datasets import parse_label_name, read_rgb
    from .models.classifier import normalize_cams
    from .train import ProgressEvent

    for name in sets:
        if name not in PSEUDO_SETS:
            raise TrainingError(f"unknown pseudo-mask set {name!r}; choose from {', '.join(PSEUDO_SETS)}")
    images = list_images(images_dir)
    marker = out_dir / ".complete"
    if marker.is_file() and all(len(list_images(out_dir / n)) == len(images) for n in sets if (out_dir / n).is_dir()):
        return
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    fused_w = list(model.arch.get("cam_weights", (0.5, 0.25, 0.25)))
    weights = {n: ([1.0, 0.0, 0.0] if PSEUDO_SETS[n][0] == "last" else list(PSEUDO_SETS[n][1] or fused_w)) for n in sets}
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
            maps = model.layer_cams(torch.stack([to_tensor(r) for r in rgbs]).to(dev))
            for name in sets:
                fused = normalize_cams(sum(w * m for w, m in zip(weights[name], maps) if w > 0)).cpu().numpy()
                for p, rgb, cam in zip(chunk, rgbs, fused):
                    labels = classes.check_labels(parse_label_name(p)[1], where=str(p))
                    save_pseudo_mask(out_dir / name / f"{p.stem}.png", pseudo_mask(cam, classes, rgb=rgb, labels=labels), classes)
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
    from .project import Project

    project = Project.open(spec.root)
    size = int(project.settings["patch_size"])
    cache: dict[tuple[str, str], tuple[np.ndarray, float] | None] = {}

    def mask_of(sid: str, name: str) -> tuple[np.ndarray, float] | None:
        if (sid, name) not in cache:
            cache[(sid, name)] = project.read_mask(sid, name)
        return cache[(sid, name)]

    def crop(arr: np.ndarray, ds: float, x: int, y: int, s0: int, size: int) -> np.ndarray:
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        n = max(1, int(round(s0 / ds)))
        part = np.zeros((n, n), dtype=arr.dtype)
        src = arr[y0:y0 + n, x0:x0 + n]
        part[: src.shape[0], : src.shape[1]] = src
        return _resize_to(part, size, True)

    out = []
    for s in spec.train:
        sid, x, y, s0 = s.name.rsplit("_", 3)
        x, y, s0 = int(x), int(y), int(s0)
        pseudo = mask_of(sid, "pseudo")
        if pseudo is None:
            raise DatasetError(f"{spec.root}: slide {sid} has labelled patches but no pseudo-mask; "
                               "make its pseudo-masks (review step) before training the segmenter")
        corr, flag = mask_of(sid, "corrected"), mask_of(sid, "corrected_flag")

        def load_mask(arr=pseudo[0], ds=pseudo[1], x=x, y=y, s0=s0, size=size) -> np.ndarray:
            return crop(arr, ds, x, y, s0, size)

        corrected = None
        if corr is not None and flag is not None:
            def corrected(c=corr, f=flag, x=x, y=y, s0=s0, size=size) -> tuple[np.ndarray, np.ndarray]:
                return crop(c[0], c[1], x, y, s0, size), crop(f[0].astype(np.uint8), f[1], x, y, s0, size).astype(bool)
        out.append(SegSample(s.name, s.image, [load_mask], s.labels, corrected))
    return out


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
def _evaluate(model: Segmenter, samples: Sequence[MaskedSample], classes: ClassTable, device: torch.device,
              tile: int, should_stop: Callable[[], bool] | None) -> dict | None:
    from .infer import predict_image, segmenter_predict_fn

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
    ``segmenter/``), its class table, config and checkpoint meta."""
    run = Path(run_dir)
    if (run / "segmenter" / "checkpoints").is_dir():
        run = run / "segmenter"
    if which in ("best", "last"):
        path = run / "checkpoints" / f"{which}.pt"
        if which == "best" and not path.is_file():
            path = run / "checkpoints" / "last.pt"
    else:
        path = Path(which)
    if not path.is_file():
        raise TrainingError(f"{run}: no segmenter checkpoint (train-seg first)")
    model, meta = load_model(path, map_location=map_location)
    if not isinstance(model, Segmenter):
        raise TrainingError(f"{path}: holds a {meta.get('kind')} model, not a segmenter")
    classes = ClassTable.from_dict(meta["classes"])
    cfg = SegConfig.from_dict(meta.get("config", {}))
    return model, classes, cfg, meta


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
    progress events (``core.train.ProgressEvent``).
    """
    from .train import ProgressEvent, build_optimizer, load_run, lr_at, read_metrics

    cfg = config or SegConfig()
    cfg.validate()
    run = Path(run_dir)
    if not run.is_dir():
        raise TrainingError(f"{run}: stage-one run folder not found")
    out = Path(out_dir) if out_dir is not None else run / "segmenter"
    classifier, classes, cls_cfg = load_run(run)
    spec = dataset if isinstance(dataset, DatasetSpec) else load_dataset(dataset or _stage_one_dataset(run), classes)
    if spec.classes.names != classes.names:
        raise TrainingError(f"{spec.root}: dataset classes ({', '.join(spec.classes.names)}) differ from the "
                            f"stage-one run's ({', '.join(classes.names)})")
    if not spec.train:
        raise DatasetError(f"{spec.root}: no training images")
    patch = cfg.patch_size or cls_cfg.patch_size or _common_side(spec.train)
    dctx = DistContext.from_env(cfg.device).init()
    rank, world, main = dctx.rank, dctx.world_size, dctx.is_main
    device = dctx.device
    dctx.local_batch_size(cfg.batch_size)  # refuses a batch that does not split over the ranks

    # -- supervision ------------------------------------------------------------------------
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
                folder = out / "pseudo"
                images_dir = spec.train[0].path.parent
                if main:
                    yield ProgressEvent("log", message=f"making pseudo-mask sets {', '.join(PSEUDO_SETS)} under {folder}")
                    for ev in make_pseudo_mask_sets(classifier, classes, images_dir, folder, device=device,
                                                    should_stop=should_stop if world == 1 else None):
                        yield ev
                        if ev.kind == "cancelled":
                            return
                dctx.barrier()  # the other ranks read what rank 0 wrote
                folders = [folder / name for name in PSEUDO_SETS]
            else:
                folders = [Path(pseudo_masks)] if isinstance(pseudo_masks, (str, Path)) else [Path(p) for p in pseudo_masks]
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

    # -- resume state ---------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    metrics_path = out / "metrics.jsonl"
    ckpt = None
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        check_classes(ckpt["meta"], classes, what=f"the stage-one run {run}")
        saved = ckpt["meta"].get("config", {})
        diff = [k for k, v in cfg.to_dict().items() if k not in _RESUMABLE and saved.get(k) != v]
        if diff:
            raise TrainingError(f"{last_path}: cannot resume with changed settings: {', '.join(diff)}")
    elif last_path.is_file() and not resume:
        raise TrainingError(f"{out} already holds a trained segmenter ({last_path}); resume it or choose another folder")

    seed_everything(cfg.seed)
    use_aux = bool(cfg.synthesis)
    model = Segmenter(classes.num_classes, cfg.backbone, "none" if ckpt is not None else cfg.weights,
                      cfg.output_stride, aux_head=use_aux).to(device)
    optimizer = build_optimizer(model, cfg)  # SegConfig has the same lr / head_lr_mult / weight_decay
    scaler = grad_scaler(device, cfg.amp)

    # -- synthetic data -----------------------------------------------------------------------
    synth_ds = None
    notes = []
    if cfg.synthesis:
        pools = single_label_pools(spec.train, classes)
        want = cfg.synthesis_count
        n_make = int(math.ceil(want / cfg.synthesis_keep)) if cfg.synthesis_filter else want
        sizes = ", ".join(f"{classes.names[k]} {len(v)}" for k, v in sorted(pools.items()))
        yield ProgressEvent("log", message=f"synthesising {n_make} {'/'.join(cfg.synthesis)} images "
                                           f"from single-label patches ({sizes})")
        pairs = synthesize(pools, classes, n_make, patch, cfg.synthesis, seed=cfg.seed)
        if cfg.synthesis_filter:
            real = [spec.train[i].image() for i in np.random.default_rng(cfg.seed).permutation(len(spec.train))[:256]]
            filt = RealnessFilter(steps=cfg.filter_steps, seed=cfg.seed, device=device)
            losses = filt.fit(real, [p[0] for p in pairs])
            keep = filt.keep([p[0] for p in pairs], cfg.synthesis_keep)
            pairs = [pairs[i] for i in keep]
            notes.append(f"realness filter kept {len(pairs)} of {n_make} synthetic images "
                         f"(discriminator loss {np.mean(losses[-20:]):.3f})")
        synth_ds = _SyntheticDataset(pairs, classes, n_sets)

    real_ds = SegDataset(samples, classes, patch, augment=cfg.augment, corrected_weight=cfg.corrected_weight)
    n_synth = int(round(cfg.batch_size * cfg.synthesis_share)) if synth_ds is not None else 0
    n_real = max(1, cfg.batch_size - n_synth)
    if n_real < world:
        raise TrainingError(f"{n_real} real images per batch cannot be shared by {world} processes; "
                            f"raise the batch size or lower the synthesis share")
    local_real = len(range(rank, n_real, world))
    steps = max(1, len(real_ds) // cfg.batch_size)  # the same compute per epoch with or without synthesis
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    total_steps = steps * cfg.epochs
    val = list(spec.val)[: cfg.val_max_images] if cfg.val_max_images else list(spec.val)

    start_epoch, start_batch, global_step = 0, 0, 0
    best: float | None = None
    best_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        ex = ckpt["extra"]
        optimizer.load_state_dict(ex["optimizer"])
        if ex.get("scaler"):
            scaler.load_state_dict(ex["scaler"])
        start_epoch, start_batch, global_step = int(ex["epoch"]), int(ex["batch"]), int(ex["global_step"])
        best, best_epoch = ex.get("best"), int(ex.get("best_epoch", 0))
        torch.set_rng_state(ex["torch_rng"] if world == 1 else torch.get_rng_state())
        if start_epoch >= cfg.epochs:
            yield ProgressEvent("done", epoch=start_epoch, epochs=cfg.epochs,
                                message=f"{out} already trained for {start_epoch} of {cfg.epochs} epochs")
            return
    if main:  # temporaries of a checkpoint write that a kill cut short
        remove_temporaries(ckpt_dir, ("last.pt", "best.pt"))
    if main:
        write_json(out / "config.json", {**cfg.to_dict(), "stage_one": str(run), "dataset": str(spec.root),
                                         "supervision_source": source})
        write_json(out / "classes.json", classes.to_dict())
    net = dctx.wrap_model(model)
    history = read_metrics(metrics_path, start_epoch)

    def checkpoint(path: Path, epoch_done: int, batch_done: int, metrics: dict | None) -> None:
        meta = {"classes": classes, "config": cfg.to_dict(), "epoch": epoch_done, "patch_size": patch,
                "stage_one": str(run), "metrics": metrics or {}}
        extra = None
        if path == last_path:
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch_done,
                     "batch": batch_done, "global_step": global_step, "best": best, "best_epoch": best_epoch,
                     "torch_rng": torch.get_rng_state()}
        save_model(path, model, meta, extra)

    yield ProgressEvent("start", epoch=start_epoch, epochs=cfg.epochs, steps=steps,
                        message=f"segmenter on {len(samples)} images ({patch} px) from {source}; "
                                f"{n_sets} mask set(s) weighted {list(set_weights)}; device {device}"
                                f"{f' x {world} processes' if world > 1 else ''}")
    for note in notes:
        yield ProgressEvent("log", message=note)

    bg = classes.background_index
    pos = saved_pos = (start_epoch, start_batch)
    t_run = time.perf_counter()
    steps_here = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = torch.randperm(len(real_ds), generator=g).tolist()
            s_order = torch.randperm(len(synth_ds), generator=g).tolist() if synth_ds is not None else []
            model.train()
            run_loss, n_loss = 0.0, 0
            for b in range(start_batch if epoch == start_epoch else 0, steps):
                if dctx.any(should_stop is not None and should_stop()):
                    if main:
                        checkpoint(last_path, epoch, b, None)
                    saved_pos = pos
                    yield ProgressEvent("cancelled", epoch=epoch + 1, epochs=cfg.epochs, step=b, steps=steps,
                                        message=f"stopped at epoch {epoch + 1} step {b}; {last_path} saved (resume to continue)")
                    return
                # this rank's share of the global batch: every world-th real and synthetic item
                items = [real_ds[order[(b * n_real + j) % len(order)]] for j in range(rank, n_real, world)]
                if n_synth:
                    items += [synth_ds[s_order[(b * n_synth + j) % len(s_order)]] for j in range(rank, n_synth, world)]
                x, targets, weight, labels = (torch.stack(t).to(device) for t in zip(*items))
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_at(global_step, total_steps, cfg.warmup_steps)
                with autocast(device, cfg.amp):
                    if use_aux:
                        logits, aux_logits, cam = net(x, return_aux=True)
                    else:
                        logits = net(x)
                loss = mlps_loss(logits, targets, set_weights, bg, weight, oeem=cfg.oeem)
                if use_aux:
                    real = slice(0, local_real)
                    loss = loss + cfg.image_loss_weight * image_level_loss(aux_logits[real], labels[real])
                    loss = loss + cfg.consistency_weight * consistency_loss(logits[real], cam[real])
                value = dctx.all_reduce_mean(float(loss.detach()))
                if not math.isfinite(value):
                    raise TrainingError(f"loss became {value} at epoch {epoch + 1} step {b + 1}; "
                                        f"lower the learning rate (last good checkpoint: {last_path})")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                global_step += 1
                steps_here += 1
                run_loss += value
                n_loss += 1
                pos = (epoch, b + 1)
                elapsed = time.perf_counter() - t_run
                yield ProgressEvent("step", epoch=epoch + 1, epochs=cfg.epochs, step=b + 1, steps=steps, loss=value,
                                    eta_s=elapsed / steps_here * (total_steps - global_step))
            scores = _evaluate(model, val, classes, device, patch, should_stop if world == 1 else None) if val else None
            train_loss = run_loss / max(n_loss, 1)
            signal = scores["miou"] if scores is not None else -train_loss
            improved = best is None or (signal is not None and signal > best)
            if improved:
                best, best_epoch = signal, epoch + 1
            row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                   "val_miou": scores["miou"] if scores else None,
                   "val_per_class_iou": scores["per_class_iou"] if scores else None,
                   "seconds": time.perf_counter() - t_run}
            history.append(row)
            if main:
                write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
                if improved:
                    checkpoint(best_path, epoch + 1, 0, row)
                checkpoint(last_path, epoch + 1, 0, row)
            pos = saved_pos = (epoch + 1, 0)
            yield ProgressEvent("epoch", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps, loss=train_loss,
                                metrics=row)
            yield ProgressEvent("checkpoint", epoch=epoch + 1, epochs=cfg.epochs,
                                message=f"saved {last_path}" + (f" and {best_path}" if improved else ""))
        yield ProgressEvent("done", epoch=cfg.epochs, epochs=cfg.epochs, metrics={"best": best, "best_epoch": best_epoch},
                            message=f"trained {cfg.epochs} epochs; best epoch {best_epoch} -> {best_path}")
    except GeneratorExit:
        if main and pos != saved_pos:
            checkpoint(last_path, pos[0], pos[1], None)
        raise
    finally:
        dctx.shutdown()


def _common_side(samples: Sequence[WeakSample]) -> int:
    sides = [min(image_size(s.path)) for s in samples[:200] if s.path is not None]
    if not sides:
        return 224
    return int(np.bincount(sides).argmax())
