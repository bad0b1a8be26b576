"""The correction-budget bench (bench/stage2_corrections.py): its per-patch IoU, the oracle's
choice of the worst patches, and corrections that reach stage two's loss as a pathologist's do."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from stage2_corrections import correct_samples, patch_iou, worst_patches  # noqa: E402

from napari_histo_wsss.core.data.classes import get_preset  # noqa: E402
from napari_histo_wsss.core.stage2.train import SegDataset, SegSample  # noqa: E402

BG = 3  # wsss4luad: tumour, stroma, normal, background


def test_patch_iou_ignores_background_ground_truth_and_counts_missed_tissue():
    gt = np.full((8, 8), BG, np.uint8)
    gt[:, :4] = 0
    pred = np.ones((8, 8), np.uint8)
    pred[:, :4] = 0
    assert patch_iou(pred, gt, BG) == 1.0  # the wrong class lies on background ground truth only
    pred[:, :2] = BG  # half the tumour left background
    assert patch_iou(pred, gt, BG) == 0.5
    pred[:, :4] = 1  # all of it stroma: IoU 0 for both classes
    assert patch_iou(pred, gt, BG) == 0.0
    assert patch_iou(pred, np.full((8, 8), BG, np.uint8), BG) == 1.0  # no tissue: nothing to correct


def test_oracle_picks_the_lowest_iou_patches_of_a_generated_set():
    rng = np.random.default_rng(0)
    gts, preds = {}, {}
    for i in range(20):
        gt = rng.integers(0, 3, (16, 16)).astype(np.uint8)
        pred = gt.copy()
        wrong = rng.random((16, 16)) < i / 20  # patch i is wrong on about i/20 of its pixels
        pred[wrong] = (gt[wrong] + 1) % 3
        gts[f"p{i:02d}"], preds[f"p{i:02d}"] = gt, pred
    ious = {n: patch_iou(preds[n], gts[n], BG) for n in gts}
    assert worst_patches(ious, 0) == []
    assert set(worst_patches(ious, 10)) == {"p19", "p18"}
    assert len(worst_patches(ious, 30)) == 6 and max(ious[n] for n in worst_patches(ious, 30)) < min(
        ious[n] for n in ious if n not in worst_patches(ious, 30))
    assert sorted(worst_patches(ious, 100)) == sorted(ious)


def test_corrected_patches_get_their_ground_truth_at_the_corrected_weight():
    classes = get_preset("wsss4luad")
    rgb = np.full((16, 16, 3), 200, np.uint8)
    pseudo = np.zeros((16, 16), np.uint8)
    gt = np.full((16, 16), 2, np.uint8)
    samples = [SegSample(n, lambda: rgb, [lambda: pseudo], np.array([1, 0, 0])) for n in ("a", "b")]
    correct_samples(samples, {"b": lambda: gt})
    ds = SegDataset(samples, classes, 16, corrected_weight=2.0)
    _, masks_a, weight_a, _ = ds[0]
    _, masks_b, weight_b, _ = ds[1]
    assert (masks_a == 0).all() and (weight_a == 1).all()
    assert (masks_b == 2).all() and (weight_b == 2).all()
