"""Synthetic images in stage one (issue 10): Mosaic/Bezier images with exact masks, to break the
co-occurrence of the image labels (almost every WSSS4LUAD patch is tumour + stroma, so a CAM
classifier trained on image labels alone cannot tell the two apart).

The images are stage two's HisynSeg synthesis (:mod:`~napari_histo_wsss.core.stage2.synthesis`:
the single-label pools, :func:`~.stage2.synthesis.mosaic`, :func:`~.stage2.synthesis.bezier`),
made on the fly for each training batch:

* :class:`SyntheticBatches` holds the pools: the single-label training patches that are not
  mostly white, each decoded once when the pools are built (at the training scale, cut to the
  training input side, so a pool image costs ``side * side * 3`` bytes) and kept in memory;
* :meth:`SyntheticBatches.batch` makes ``n`` images of the training input side for one step,
  a function of its seed only (the training loop seeds it with ``(seed + rank, epoch, step)``),
  with their image labels: the tissue classes present in each exact mask;
* :func:`pixel_loss`: cross-entropy of the CAM logits against the exact masks, pooled to the CAM
  grid (soft targets: each cell's class shares among its tissue pixels; cells mostly glass left
  out).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import WeakSample, stain_jitter, to_tensor
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.stage2.synthesis import group_pools, iter_synthesize, pool_keys

__all__ = ["SyntheticBatches", "mask_labels", "pixel_loss"]


class PatchReadError(DatasetError):
    """A training patch could not be read while the pools were built (names the patch)."""


class _DecodedOnce:
    """A sample's pixels, decoded on the first call only: resized to ``patch`` (as the training
    patches are) and cut to the central ``side`` x ``side`` (the training input side), read-only."""

    def __init__(self, sample: WeakSample, patch: int, side: int):
        self.sample, self.patch, self.side = sample, int(patch), int(side)
        self.rgb: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        if self.rgb is None:
            try:
                rgb = self.sample.image()
            except OSError as e:  # as the training loader says it: the patch, then the reason
                where = self.sample.path or self.sample.name
                raise PatchReadError(f"{where}: cannot read the training patch: {e}") from e
            if rgb.shape[:2] != (self.patch, self.patch):
                rgb = np.asarray(Image.fromarray(rgb).resize((self.patch, self.patch), Image.BILINEAR))
            top = (self.patch - self.side) // 2
            rgb = np.array(rgb[top:top + self.side, top:top + self.side], dtype=np.uint8)
            rgb.flags.writeable = False
            self.rgb = rgb
        return self.rgb


def mask_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot image labels (float32, ``num_classes``): the tissue classes present in ``mask``."""
    return (np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes] > 0).astype(np.float32)


class SyntheticBatches:
    """Pools of single-label patches and, per training step, a batch of synthetic images.

    ``samples``: the training patches; ``patch``: the side they are trained at; ``side``: the
    training input side (the crop size), also the synthetic images' side; ``kinds``: among
    ``mosaic`` and ``bezier``. Raises :class:`DatasetError` (from
    :func:`~.stage2.synthesis.group_pools`) when fewer than two classes have single-label patches.
    """

    def __init__(self, samples: Sequence[WeakSample], classes: ClassTable, patch: int, side: int,
                 kinds: Sequence[str]):
        once = [WeakSample(s.name, np.asarray(s.labels), reader=_DecodedOnce(s, patch, min(side, patch)))
                for s in samples]
        self.pools = group_pools(once, list(pool_keys(once)), classes)
        self.classes, self.side, self.kinds = classes, int(min(side, patch)), tuple(kinds)

    def sizes(self) -> str:
        """The pools' sizes, e.g. ``tumor 12, stroma 30``."""
        return ", ".join(f"{self.classes.names[k]} {len(v)}" for k, v in sorted(self.pools.items()))

    def batch(self, n: int, seed: int, stain: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` synthetic images (``(n, 3, side, side)``, normalised like the training patches),
        their image labels ``(n, C)`` and exact masks ``(n, side, side)`` (long, background =
        the class table's background index); a function of ``seed`` only. ``stain`` > 0: each
        image gets its own H&E stain jitter of that strength (:func:`~.data.datasets.stain_jitter`)."""
        pairs = list(iter_synthesize(self.pools, self.classes, n, self.side, self.kinds, seed=seed))
        c = self.classes.num_classes
        if stain > 0:
            g = torch.Generator().manual_seed(int(seed))
            pairs = [(stain_jitter(img, stain, g), m) for img, m in pairs]
        x = torch.stack([to_tensor(img) for img, _ in pairs])
        y = torch.from_numpy(np.stack([mask_labels(m, c) for _, m in pairs]))
        masks = torch.from_numpy(np.stack([m for _, m in pairs]).astype(np.int64))
        return x, y, masks


def pixel_loss(cam: Tensor, masks: Tensor, min_tissue: float = 0.5) -> Tensor:
    """Cross-entropy of the CAM logits ``cam`` (n, C, h, w) against exact masks ``masks``
    (n, H, W; values ``0..C-1`` tissue, ``C`` background) pooled to the CAM grid: each cell's
    target is the share of each class among its tissue pixels; cells whose tissue share is below
    ``min_tissue`` are left out (zero, with a gradient path, when none is left)."""
    c = cam.shape[1]
    if masks.shape[0] != cam.shape[0]:
        raise DatasetError(f"{masks.shape[0]} masks for {cam.shape[0]} CAMs")
    onehot = F.one_hot(masks.clamp(0, c), c + 1)[..., :c].permute(0, 3, 1, 2).float()
    share = F.adaptive_avg_pool2d(onehot.to(cam.device), cam.shape[-2:])
    tissue = share.sum(dim=1)
    keep = tissue >= min_tissue
    if not bool(keep.any()):
        return cam.float().sum() * 0.0
    target = share / tissue.clamp_min(1e-6)[:, None]
    ce = -(target * F.log_softmax(cam.float(), dim=1)).sum(dim=1)
    return ce[keep].mean()
