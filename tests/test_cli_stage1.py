"""``histo-wsss train-cls`` and ``histo-wsss pseudo-masks`` end to end (in-process, tiny runs)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_dataset  # the generated WSSS4LUAD-style folder of the training tests

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import read_index_mask
from napari_histo_wsss.core.stage1 import train as train_mod

TINY = ["--weights", "none", "--device", "cpu", "--batch-size", "4", "--max-steps-per-epoch", "2", "--seed", "1", "--output-stride", "32",
        "--cam-mode", "last"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "ds")


def test_train_resume_and_pseudo_masks(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-cls", str(data), str(run), "--method", "segmix", "--epochs", "1", *TINY]) == 0
    out = capsys.readouterr()
    assert "epoch 1/1" in out.out and "val mIoU" in out.out and "patches/s" in out.out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "segmix" and cfg["batch_size"] == 4 and cfg["weights"] == "none" and cfg["epochs"] == 1

    # --resume keeps the saved settings and only extends the epochs
    assert main(["train-cls", str(data), str(run), "--resume", "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["segmix"] is not None
    assert json.loads((run / "config.json").read_text())["epochs"] == 2

    images = data / "val" / "img"
    out_dir = tmp_path / "pm"
    assert main(["pseudo-masks", str(run), str(images), str(out_dir), "--cams", "--labels", str(data / "val" / "mask"),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(p.name for p in images.glob("*.png"))
    luad = get_preset("wsss4luad")
    for p in out_dir.glob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "P" and im.getpalette()[:12] == luad.palette()[:12]
            assert im.size == Image.open(images / p.name).size
        gt = read_index_mask(data / "val" / "mask" / p.name, luad)
        present = set(np.unique(gt)) - {luad.background_index}
        assert set(np.unique(read_index_mask(p, luad))) <= present | {luad.background_index}
        assert np.load(out_dir / "cams" / f"{p.stem}.npy").shape == (3, *gt.shape)

    # without labels the masks are gated by predicted probabilities at the threshold that the
    # run's validation chose (recorded per epoch), unless one is given
    row = next(r for r in rows if r["epoch"] == rows[-1]["best_epoch"])
    by_t = row["val_miou_prob_by_threshold"]
    assert set(by_t) == {"0.5", "0.6", "0.7", "0.8", "0.9"}
    assert row["prob_threshold"] == min(float(t) for t, v in by_t.items() if v == max(by_t.values()))
    assert row["val_miou_prob"] == max(by_t.values())
    capsys.readouterr()
    assert main(["pseudo-masks", str(run), str(images), str(tmp_path / "pm-prob"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"at {row['prob_threshold']:g} (chosen on the run's validation images)" in out
    # the default gating, prob-area: the area floor and its offsets come from the same validation
    from napari_histo_wsss.core.stage1.cams import AREA_FLOORS
    assert row["min_area"] in AREA_FLOORS and len(row["raw_offsets"]["prob-area"]) == 3
    assert f"area floor {row['min_area']:g}: a probable class" in out
    assert main(["pseudo-masks", str(run), str(images), str(tmp_path / "pm-09"), "--device", "cpu",
                 "--prob-threshold", "0.9"]) == 0
    assert "chosen on the run's validation" not in capsys.readouterr().out


def test_bad_input_is_one_line_error(tmp_path, capsys):
    one = make_dataset(tmp_path / "one", only_class=0, n_val=0)
    assert main(["train-cls", str(one), str(tmp_path / "run"), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only one class (tumor)" in err[0] and err[0].startswith("histo-wsss train-cls: error:")
    assert main(["pseudo-masks", str(tmp_path / "nowhere"), str(one / "train"), str(tmp_path / "o")]) == 2
    assert "not a training run folder" in capsys.readouterr().err


def test_ctrl_c_checkpoints_and_resume_finishes(data, tmp_path, monkeypatch, capsys):
    real = train_mod.train_classifier

    def interrupted(*args, **kwargs):
        for ev in real(*args, **kwargs):
            if ev.kind == "step" and ev.step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
            yield ev

    monkeypatch.setattr(train_mod, "train_classifier", interrupted)
    run = tmp_path / "run"
    assert main(["train-cls", str(data), str(run), "--method", "cam", "--epochs", "1", *TINY]) == 130
    assert "--resume" in capsys.readouterr().out
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(train_mod, "train_classifier", real)
    assert main(["train-cls", str(data), str(run), "--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
