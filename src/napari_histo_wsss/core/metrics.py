"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, fwIoU, pixel accuracy.

The convention (MLPS, Han et al. 2022), stated once and used everywhere:

* Masks hold class indices ``0..K-1``. With a :class:`~.classes.ClassTable` of ``C`` tissue
  classes, ``K = C + 1`` and index ``C`` is background/exclude.
* Pixels whose **ground truth** equals ``ignore_index`` (by default the background index) are
  dropped entirely: they count for no class. Pixels whose ground truth is a tissue class but whose
  **prediction** is ``ignore_index`` (predicted background) stay in: they are false negatives of
  the ground-truth class and lower pixel accuracy.
* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` for every scored class (all indices except
  ``ignore_index``). A class absent from both the (non-ignored) ground truth and the prediction
  has no IoU (``None``): it is left out of the mean rather than counted as 0 or 1.
* ``mIoU`` = mean of the defined per-class IoUs (a nanmean over the classes present in the ground
  truth or the prediction). Other papers differ: TPRO/PBIP score background as a further class
  (pass ``ignore_index=None``/``-1``), HisynSeg counts a missing class as 0.
* ``fwIoU = sum_c f_c * IoU_c`` with ``f_c`` the share of non-ignored ground-truth pixels of class
  ``c`` (classes absent from the ground truth weigh 0).
* ``pixel_accuracy = sum_c TP_c / number of non-ignored ground-truth pixels``.

Scores over a set of images come from the one summed confusion matrix (dataset-level IoU, as all
the cited papers compute it), not from a mean of per-image scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.errors import ClassTableError, DatasetError

CONVENTION = (
    "MLPS convention: ground-truth pixels equal to the ignore index are excluded; predicted "
    "ignore-index pixels on tissue count as false negatives; mIoU = mean IoU over scored classes "
    "present in the ground truth or the prediction; fwIoU weighted by ground-truth frequency"
)


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix, rows = ground truth, columns = prediction.

    ``num_classes`` is the number of label values ``K`` that may occur in masks (tissue classes
    plus background: ``ClassTable.num_classes + 1``). ``ignore_index`` is a ground-truth value
    whose pixels are skipped (usually ``K - 1``, the background); ``None`` or a negative value
    scores every index as a class.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = _normalise_ignore(ignore_index, self.num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one prediction/ground-truth pair of equal shape (integer class indices)."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
        gt = gt.ravel().astype(np.int64, copy=False)
        pred = pred.ravel().astype(np.int64, copy=False)
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            gt, pred = gt[keep], pred[keep]
        for what, arr in (("ground truth", gt), ("prediction", pred)):
            if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
                bad = np.unique(arr[(arr < 0) | (arr >= self.num_classes)])[:10].tolist()
                raise ClassTableError(f"{what} holds class index(es) {bad} outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def scores(self, names: Sequence[str]) -> dict:
        """Scores of the accumulated matrix; see :func:`compute_scores`."""
        return compute_scores(self.matrix, names, ignore_index=self.ignore_index)


def _normalise_ignore(ignore_index: int | None, k: int) -> int | None:
    if ignore_index is None or ignore_index < 0:
        return None
    if ignore_index >= k:
        raise ValueError(f"ignore_index {ignore_index} is outside 0..{k - 1}")
    return int(ignore_index)


def compute_scores(matrix: np.ndarray, names: Sequence[str], ignore_index: int | None = None) -> dict:
    """Per-class IoU, mIoU, fwIoU and pixel accuracy of a ``(K, K)`` matrix (rows = ground truth).

    ``names`` names either every index (``K`` names) or only the scored ones (``K`` minus the
    ignored index, e.g. ``ClassTable.names`` when the background is ignored). The returned dict has
    ``miou``, ``fwiou``, ``pixel_accuracy`` (floats, ``None`` when nothing was scored),
    ``per_class_iou`` (name -> float or ``None`` for a class absent from both ground truth and
    prediction), ``gt_pixels`` and ``pred_pixels`` (name -> int), and ``ignore_index``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    ignore_index = _normalise_ignore(ignore_index, k)
    scored = [i for i in range(k) if i != ignore_index]
    names = list(names)
    if len(names) == k:
        scored_names = [names[i] for i in scored]
    elif len(names) == len(scored):
        scored_names = names
    else:
        raise ValueError(f"{len(names)} class names for a {k}x{k} matrix with {len(scored)} scored classes")
    if ignore_index is not None:
        m = m.copy()
        m[ignore_index, :] = 0  # ignored ground truth never counts (update() already drops it)
    tp = np.diag(m)
    gt_total = m.sum(axis=1)
    pred_total = m.sum(axis=0)
    union = gt_total + pred_total - tp
    per_class: dict[str, float | None] = {}
    ious = []
    for name, i in zip(scored_names, scored):
        if union[i] > 0:
            iou = float(tp[i] / union[i])
            per_class[name] = iou
            ious.append(iou)
        else:
            per_class[name] = None
    total = float(gt_total[scored].sum())
    miou = float(np.mean(ious)) if ious else None
    if total > 0:
        fw = sum((gt_total[i] / total) * (tp[i] / union[i]) for i in scored if gt_total[i] > 0)
        fwiou: float | None = float(fw)
        pixel_accuracy: float | None = float(tp[scored].sum() / total)
    else:
        fwiou = pixel_accuracy = None
    return {
        "miou": miou,
        "fwiou": fwiou,
        "pixel_accuracy": pixel_accuracy,
        "per_class_iou": per_class,
        "gt_pixels": {n: int(gt_total[i]) for n, i in zip(scored_names, scored)},
        "pred_pixels": {n: int(pred_total[i]) for n, i in zip(scored_names, scored)},
        "ignore_index": ignore_index,
    }


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    classes: ClassTable,
    ignore_index: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score every prediction mask in ``pred_dir`` against the ground truth of the same file stem
    in ``gt_dir`` (palette/greyscale PNGs of class indices, or RGB masks in the class colours).

    ``ignore_index`` defaults to the class table's background index; pass ``-1`` to score the
    background as a class too. A ground truth without a prediction, a prediction without a ground
    truth, a size mismatch or an index outside the class table raises :class:`DatasetError`
    naming the file. Returns :func:`compute_scores`' dict plus ``n_images``, ``classes``
    (the scored names) and ``convention``. ``progress(done, total)`` is called after each image.
    """
    from napari_histo_wsss.core.data.datasets import list_images, read_index_mask

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise DatasetError(f"{d}: {what} folder not found")
    preds = list_images(pred_dir)
    gts = list_images(gt_dir)
    for stem in sorted(gts):
        if stem not in preds:
            raise DatasetError(f"{gts[stem]}: no prediction for this ground truth in {pred_dir}")
    for stem in sorted(preds):
        if stem not in gts:
            raise DatasetError(f"{preds[stem]}: no ground truth for this prediction in {gt_dir}")
    if not gts:
        raise DatasetError(f"{gt_dir}: no ground-truth masks found")
    k = classes.num_classes + 1
    if ignore_index is None:
        ignore_index = classes.background_index
    cm = ConfusionMatrix(k, ignore_index)
    stems = sorted(gts)
    for n, stem in enumerate(stems, 1):
        gt = read_index_mask(gts[stem], classes)
        pred = read_index_mask(preds[stem], classes)
        if pred.shape != gt.shape:
            raise DatasetError(
                f"{preds[stem]}: prediction is {pred.shape[1]}x{pred.shape[0]} px but its ground truth "
                f"{gts[stem]} is {gt.shape[1]}x{gt.shape[0]} px"
            )
        cm.update(pred, gt)
        if progress is not None:
            progress(n, len(stems))
    names = classes.names + [classes.background.name if classes.background is not None else "background"]
    out = cm.scores(names)
    out["n_images"] = len(stems)
    out["classes"] = list(out["per_class_iou"])
    out["convention"] = CONVENTION
    return out
