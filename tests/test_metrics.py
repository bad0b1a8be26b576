"""Metrics (hand-computed confusion matrices, the MLPS convention) and the evaluate /
make-patches command lines end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import load_dataset, read_index_mask
from napari_histo_wsss.core.errors import ClassTableError, DatasetError
from napari_histo_wsss.core.metrics import ConfusionMatrix, compute_scores, evaluate_folders

WSSS = get_preset("wsss4luad")  # tumor, stroma, normal; background = 3
NAMES = WSSS.names

# A hand-checked example (rows = ground truth, columns = prediction; 3 = background, ignored):
#   kept pairs (gt, pred): (0,0) x3, (0,1) x1, (1,1) x4, (2,3) x1; gt-background pixels dropped
GT = np.array([[0, 0, 1, 1], [0, 2, 1, 3], [3, 3, 1, 0]], np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 3, 1, 0], [2, 1, 1, 0]], np.uint8)
MATRIX = np.array([[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def _save_mask(path: Path, idx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(idx.astype(np.uint8), mode="P")
    im.putpalette(WSSS.palette())
    im.save(path)


# -- confusion matrix and scores ------------------------------------------------------------------
def test_hand_computed_scores():
    cm = ConfusionMatrix(4, ignore_index=3)
    cm.update(PRED, GT)
    assert np.array_equal(cm.matrix, MATRIX)
    s = cm.scores(NAMES)
    # IoU tumor 3/(4+3-3), stroma 4/(4+5-4), normal 0/(1+0-0)
    assert s["per_class_iou"] == pytest.approx({"tumor": 0.75, "stroma": 0.8, "normal": 0.0})
    assert s["miou"] == pytest.approx((0.75 + 0.8 + 0.0) / 3)
    assert s["fwiou"] == pytest.approx(4 / 9 * 0.75 + 4 / 9 * 0.8 + 1 / 9 * 0.0)
    assert s["pixel_accuracy"] == pytest.approx(7 / 9)
    assert s["gt_pixels"] == {"tumor": 4, "stroma": 4, "normal": 1}
    assert s["pred_pixels"] == {"tumor": 3, "stroma": 5, "normal": 0}
    # the same from the matrix alone, with names for every index
    assert compute_scores(MATRIX, NAMES + ["background"], ignore_index=3)["miou"] == pytest.approx(s["miou"])


def test_ignore_index_drops_gt_background_but_keeps_predicted_background():
    gt = np.array([[3, 3, 0, 0]])
    pred = np.array([[0, 1, 3, 0]])  # tissue predicted on glass: not counted; glass predicted on tumour: a miss
    s = ConfusionMatrix(4, 3)
    s.update(pred, gt)
    r = s.scores(NAMES)
    assert r["per_class_iou"] == {"tumor": 0.5, "stroma": None, "normal": None}
    assert r["miou"] == 0.5 and r["pixel_accuracy"] == 0.5
    everything = ConfusionMatrix(4, None)  # background scored as a fourth class (TPRO/PBIP style)
    everything.update(pred, gt)
    r = everything.scores(NAMES + ["background"])
    assert r["per_class_iou"] == pytest.approx({"tumor": 1 / 3, "stroma": 0.0, "normal": None, "background": 0.0})
    assert r["miou"] == pytest.approx(1 / 9) and r["pixel_accuracy"] == pytest.approx(0.25)
    assert ConfusionMatrix(4, -1).ignore_index is None


def test_absent_classes_are_none_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4, 3)
    cm.update(np.array([[0, 1], [0, 2]]), np.array([[0, 1], [1, 3]]))  # "normal" only predicted on glass
    r = cm.scores(NAMES)
    assert r["per_class_iou"] == {"tumor": 0.5, "stroma": 0.5, "normal": None}
    assert r["miou"] == 0.5
    # a class predicted but absent from the ground truth has IoU 0 and does count
    cm = ConfusionMatrix(4, 3)
    cm.update(np.array([[0, 1]]), np.array([[0, 0]]))
    r = cm.scores(NAMES)
    assert r["per_class_iou"] == {"tumor": 0.5, "stroma": 0.0, "normal": None}
    assert r["miou"] == 0.25 and r["fwiou"] == 0.5


def test_nothing_scored():
    cm = ConfusionMatrix(4, 3)
    cm.update(np.full((2, 2), 1), np.full((2, 2), 3))
    r = cm.scores(NAMES)
    assert r["miou"] is None and r["fwiou"] is None and r["pixel_accuracy"] is None
    assert r["per_class_iou"] == {"tumor": None, "stroma": None, "normal": None}


def test_matrix_sums_over_images_not_a_mean_of_image_scores():
    a_gt, a_pred = np.zeros((10, 10), int), np.zeros((10, 10), int)  # a large perfect tumour image
    b_gt, b_pred = np.ones((1, 2), int), np.array([[1, 0]])  # a tiny half-wrong stroma image
    cm = ConfusionMatrix(4, 3)
    cm.update(a_pred, a_gt)
    cm.update(b_pred, b_gt)
    r = cm.scores(NAMES)
    assert r["per_class_iou"]["tumor"] == pytest.approx(100 / 101) and r["per_class_iou"]["stroma"] == 0.5
    assert r["pixel_accuracy"] == pytest.approx(101 / 102)


def test_bad_input_to_the_matrix():
    cm = ConfusionMatrix(4, 3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ClassTableError, match=r"prediction holds class index\(es\) \[5\]"):
        cm.update(np.array([[5]]), np.array([[0]]))
    with pytest.raises(ClassTableError, match="ground truth"):
        cm.update(np.array([[0]]), np.array([[-1]]))
    with pytest.raises(ValueError, match="ignore_index 4"):
        ConfusionMatrix(4, 4)
    with pytest.raises(ValueError, match="class names"):
        compute_scores(MATRIX, ["a", "b"], ignore_index=3)


# -- evaluate_folders ----------------------------------------------------------------------------
@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(3):
        gt = rng.integers(0, 4, (20 + i, 30))
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 4, gt.shape))
        _save_mask(tmp_path / "gt" / f"img{i}.png", gt)
        _save_mask(tmp_path / "pred" / f"img{i}.png", pred)
        pairs.append((pred, gt))
    return tmp_path / "pred", tmp_path / "gt", pairs


def test_evaluate_folders_matches_the_matrix(folders):
    pred_dir, gt_dir, pairs = folders
    cm = ConfusionMatrix(4, 3)
    for pred, gt in pairs:
        cm.update(pred, gt)
    want = cm.scores(NAMES)
    got = evaluate_folders(pred_dir, gt_dir, WSSS)
    assert got["n_images"] == 3 and got["classes"] == NAMES
    for k in ("miou", "fwiou", "pixel_accuracy"):
        assert got[k] == pytest.approx(want[k])
    assert got["per_class_iou"] == pytest.approx(want["per_class_iou"])
    assert 0.4 < got["miou"] < 0.9
    # an RGB prediction painted in the class colours scores the same as the palette PNG
    colours = np.array([c.color for c in WSSS.classes] + [(255, 255, 255)], np.uint8)
    Image.fromarray(colours[pairs[0][0]]).save(pred_dir / "img0.png")
    assert evaluate_folders(pred_dir, gt_dir, WSSS)["miou"] == pytest.approx(want["miou"])
    with_bg = evaluate_folders(pred_dir, gt_dir, WSSS, ignore_index=-1)
    assert set(with_bg["per_class_iou"]) == set(NAMES) | {"background"}


def test_evaluate_folders_bad_input(folders):
    pred_dir, gt_dir, pairs = folders
    (pred_dir / "img1.png").rename(pred_dir / "other.png")
    with pytest.raises(DatasetError, match=r"gt/img1.png: no prediction for this ground truth"):
        evaluate_folders(pred_dir, gt_dir, WSSS)
    (pred_dir / "other.png").rename(pred_dir / "img1.png")
    _save_mask(pred_dir / "extra.png", np.zeros((4, 4)))
    with pytest.raises(DatasetError, match=r"pred/extra.png: no ground truth for this prediction"):
        evaluate_folders(pred_dir, gt_dir, WSSS)
    (pred_dir / "extra.png").unlink()
    _save_mask(pred_dir / "img2.png", np.zeros((5, 5)))
    with pytest.raises(DatasetError, match=r"pred/img2.png: prediction is 5x5 px but its ground truth"):
        evaluate_folders(pred_dir, gt_dir, WSSS)
    _save_mask(pred_dir / "img2.png", np.full(pairs[2][1].shape, 9))
    with pytest.raises(DatasetError, match=r"pred/img2.png: mask holds class index\(es\) \[9\]"):
        evaluate_folders(pred_dir, gt_dir, WSSS)
    with pytest.raises(DatasetError, match="prediction folder not found"):
        evaluate_folders(pred_dir.parent / "nope", gt_dir, WSSS)


# -- command line -------------------------------------------------------------------------------
def test_cli_evaluate_json_keys_and_table(folders, capsys):
    pred_dir, gt_dir, _ = folders
    want = evaluate_folders(pred_dir, gt_dir, WSSS)
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"miou", "fwiou", "pixel_accuracy", "per_class_iou", "n_images"}
    assert got["n_images"] == 3 and got["miou"] == pytest.approx(want["miou"])
    assert got["per_class_iou"] == pytest.approx(want["per_class_iou"])
    assert main(["evaluate", str(pred_dir), str(gt_dir)]) == 0
    text = capsys.readouterr().out
    for name in NAMES:
        assert name in text
    assert f"mIoU {want['miou']:6.4f}" in text
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--json", "--ignore-index", "-1"]) == 0
    assert "background" in json.loads(capsys.readouterr().out)["per_class_iou"]
    (pred_dir / "img0.png").unlink()
    assert main(["evaluate", str(pred_dir), str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert "histo-wsss evaluate: error:" in err and str(gt_dir / "img0.png") in err


def test_cli_make_patches_then_evaluate_on_real_images(wsss4luad_dir, tmp_path, capsys):
    stems = ["00", "01", "02", "03", "04", "05"]
    for sub in ("img", "mask"):
        (tmp_path / sub).mkdir()
        for s in stems:  # links, not copies, of the shared data
            (tmp_path / sub / f"{s}.png").symlink_to(wsss4luad_dir / "val" / sub / f"{s}.png")
    out = tmp_path / "patches"
    argv = ["make-patches", str(tmp_path / "img"), str(tmp_path / "mask"), str(out),
            "--patch-size", "128", "--stride", "64", "--val-fraction", "0.34", "--seed", "1", "--json"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_images"] == {"train": 4, "val": 2, "test": 0}
    assert stats["settings"]["patch_size"] == 128 and stats["settings"]["stride"] == 64
    spec = load_dataset(out)
    assert spec.layout == "patches" and len(spec.train) == stats["n_patches"] > 20
    assert {s.name.split("_")[0] for s in spec.train} == set(stats["images"]["train"])
    assert sorted(s.name for s in spec.val) == stats["images"]["val"]
    assert all(s.image().shape == (128, 128, 3) for s in spec.train[:5])

    # the human-readable summary
    assert main(["make-patches", str(tmp_path / "img"), str(tmp_path / "mask"), str(tmp_path / "again"),
                 "--patch-size", "160"]) == 0
    text = capsys.readouterr().out
    assert "images: 6 train, 0 val, 0 test" in text and "label combination" in text

    # evaluate the held-out masks against themselves and against a degraded copy; classes.json of
    # the patch set is found from OUT/val/mask
    gt_dir = out / "val" / "mask"
    assert main(["evaluate", str(gt_dir), str(gt_dir), "--json"]) == 0
    perfect = json.loads(capsys.readouterr().out)
    assert perfect["miou"] == 1.0 and perfect["n_images"] == 2
    pred_dir = tmp_path / "pred"
    cm = ConfusionMatrix(4, 3)
    for p in sorted(gt_dir.iterdir()):
        gt = read_index_mask(p, WSSS)
        pred = gt.copy()
        pred[gt == 0] = 1  # every tumour pixel called stroma
        _save_mask(pred_dir / p.name, pred)
        cm.update(pred, gt)
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = cm.scores(NAMES)
    assert got["miou"] == pytest.approx(want["miou"]) and got["miou"] < 1.0

    assert main(["make-patches", str(tmp_path / "missing"), str(tmp_path / "mask"), str(tmp_path / "o3")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_console_script_evaluate(folders):
    pred_dir, gt_dir, _ = folders
    exe = Path(sys.executable).parent / "histo-wsss"
    res = subprocess.run([str(exe), "evaluate", str(pred_dir), str(gt_dir), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) == {"miou", "fwiou", "pixel_accuracy", "per_class_iou", "n_images"}
