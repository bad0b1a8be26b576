"""Stage-one training loop: run folder, determinism, cancel + resume, checkpoints, bad input.

Runs are tiny (48-px generated patches, random initialisation, a few steps) so the file stays
fast on two CPU cores; the real-data check of CAM quality lives in test_cams.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import WeakSample, format_label_name, load_dataset
from napari_histo_wsss.core.errors import DatasetError, TrainingError
from napari_histo_wsss.core.stage1 import train as train_mod
from napari_histo_wsss.core.stage1.train import ProgressEvent, TrainConfig, load_run, train_classifier

COLOURS = np.array([(150, 40, 90), (230, 150, 190), (110, 60, 190)], dtype=np.uint8)  # tumour-ish, stroma-ish, other


def _texture(rng: np.random.Generator, shape: tuple[int, int], cls: int) -> np.ndarray:
    noise = rng.integers(-25, 26, size=(*shape, 3))
    return np.clip(COLOURS[cls][None, None].astype(int) + noise, 0, 254).astype(np.uint8)


def _weak_image(rng: np.random.Generator, size: int, classes: list[int]) -> np.ndarray:
    img = _texture(rng, (size, size), classes[0])
    if len(classes) > 1:
        cut = int(rng.integers(size // 4, 3 * size // 4))
        img[:, cut:] = _texture(rng, (size, size - cut), classes[1])
    return img


def make_dataset(root: Path, n_train: int = 24, size: int = 48, n_val: int = 2, seed: int = 0,
                 only_class: int | None = None) -> Path:
    """WSSS4LUAD-style folder: train/<name>-[a, b, c].png and val/img + val/mask (64 px, with white glass)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    combos = [[0], [1], [2], [0, 1], [1, 2], [0, 2]]
    for i in range(n_train):
        cls = [only_class] if only_class is not None else combos[i % len(combos)]
        labels = np.zeros(3, dtype=np.uint8)
        labels[cls] = 1
        Image.fromarray(_weak_image(rng, size, cls)).save(root / "train" / format_label_name(f"p{i:03d}", labels))
    if n_val:
        (root / "val" / "img").mkdir(parents=True)
        (root / "val" / "mask").mkdir(parents=True)
        for i in range(n_val):
            img = np.empty((64, 64, 3), np.uint8)
            mask = np.empty((64, 64), np.uint8)
            img[:, :32], mask[:, :32] = _texture(rng, (64, 32), i % 3), i % 3
            img[:, 32:], mask[:, 32:] = _texture(rng, (64, 32), (i + 1) % 3), (i + 1) % 3
            img[:8, :8], mask[:8, :8] = 255, 3  # glass
            Image.fromarray(img).save(root / "val" / "img" / f"v{i}.png")
            m = Image.fromarray(mask, mode="P")
            m.putpalette([0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255] + [0] * 756)
            m.save(root / "val" / "mask" / f"v{i}.png")
    return root


def tiny(**kw) -> TrainConfig:
    base = dict(method="segmix", epochs=2, batch_size=4, weights="none", device="cpu", seed=3, lr=1e-3, output_stride=32,
                max_steps_per_epoch=2, warmup_steps=1, cam_mode="last", segmix_warmup=1)
    base.update(kw)
    return TrainConfig(**base)


def run_all(dataset, run_dir, cfg, **kw) -> list[ProgressEvent]:
    return list(train_classifier(dataset, run_dir, cfg, **kw))


def weights_of(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    model, _, _ = load_run(run_dir, which)
    return model.state_dict()


def run_twice(data, tmp_path: Path, cfg) -> dict[str, torch.Tensor]:
    """Train ``cfg`` into ``tmp_path/a`` and ``tmp_path/b``; the two must agree bit for bit.
    Returns the weights."""
    run_all(data, tmp_path / "a", cfg)
    run_all(data, tmp_path / "b", cfg)
    ref = weights_of(tmp_path / "a")
    assert_same_weights(ref, weights_of(tmp_path / "b"))
    return ref


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_run_folder_metrics_and_segmix_state(data, tmp_path):
    run = tmp_path / "run"
    events = run_all(data, run, tiny(epochs=3, segmix_tiles=(24, 16)))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("epoch") == 3 and kinds.count("step") == 6
    steps = [e for e in events if e.kind == "step"]
    assert all(np.isfinite(e.loss) and e.eta_s is not None and e.eta_s >= 0 for e in steps)
    assert steps[-1].eta_s == pytest.approx(0.0, abs=1e-6)

    for name in ("config.json", "classes.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob(".*")], "temporary files left behind"
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert saved.patch_size == 48 and saved.method == "segmix"  # the native size is recorded
    assert ClassTable.from_dict(json.loads((run / "classes.json").read_text())).preset == "wsss4luad"

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["feedback"] == "miou" and 0.0 <= r["val_miou"] <= 1.0 and r["val_loss"] > 0
        assert set(r["val_iou"]) == {"tumor", "stroma", "normal"}
        seg = r["segmix"]
        assert {"tile", "share", "next_level", "next_tile", "next_share", "threshold", "feedback"} <= set(seg)
        assert seg["feedback"] == pytest.approx(r["val_miou"])
        assert r["data_s"] >= 0 and r["compute_s"] > 0 and r["patches_per_s"] > 0
    # warm-up epoch unshuffled, then the coarsest tile at the lowest share
    assert rows[0]["segmix"]["tile"] is None and rows[0]["segmix"]["share"] == 0.0
    assert (rows[1]["segmix"]["tile"], rows[1]["segmix"]["share"]) == (24, 0.25)
    assert rows[0]["segmix"]["next_tile"] == 24
    # the time schedule never steps back (its climb: tests/test_segmix.py)
    assert [r["segmix"]["next_level"] for r in rows] == sorted(r["segmix"]["next_level"] for r in rows)
    # the threshold is recorded in mIoU units once the curriculum started
    assert rows[0]["segmix"]["threshold"] is not None

    best = max(range(3), key=lambda i: (rows[i]["val_miou"], -i))
    assert rows[-1]["best_epoch"] == best + 1
    model, classes, cfg = load_run(run)
    assert classes.names == ["tumor", "stroma", "normal"] and cfg.epochs == 3
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["meta"]["epoch"] == best + 1
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["extra"]["segmix"]["level"] == rows[-1]["segmix"]["next_level"]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 3)


def test_seeded_runs_repeat_and_cancel_resume_matches(data, tmp_path):
    cfg = tiny(method="segmix", segmix_warmup=0, pda=True, pda_start_epoch=1, pscl=True)
    ref = run_twice(data, tmp_path, cfg)

    run_all(data, tmp_path / "c", dataclasses.replace(cfg, seed=4))
    other = weights_of(tmp_path / "c")
    assert any(not torch.equal(ref[k], other[k]) for k in ref)

    # cancel in the middle of the second epoch, then resume: same weights as the uninterrupted run
    seen = {"steps": 0}

    def stop() -> bool:
        return seen["steps"] >= 3

    run = tmp_path / "d"
    events = []
    for ev in train_classifier(data, run, cfg, should_stop=stop):
        events.append(ev)
        seen["steps"] += ev.kind == "step"
    assert events[-1].kind == "cancelled" and (events[-1].epoch, events[-1].step) == (2, 1)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["extra"]["epoch"], ck["extra"]["batch"]) == (1, 1)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    _model, _classes, _cfg = load_run(run)  # usable while cancelled
    resumed = run_all(data, run, cfg, resume=True)
    assert resumed[0].kind == "start" and "resuming" in resumed[0].message
    assert [e.kind for e in resumed].count("step") == 1
    assert_same_weights(ref, weights_of(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] == pytest.approx(ref_rows[1]["train_loss"], rel=1e-6)
    assert rows[1]["val_miou"] == pytest.approx(ref_rows[1]["val_miou"])


def test_pda_starts_on_the_mlps_schedule_and_changes_the_forward_pass(data, tmp_path, monkeypatch):
    """pda=True: off for the first 15 % of the run's steps, then MLPS's threshold (0.98 ** (20 x
    share done)); at its first step the logits differ from the plain forward pass."""
    from napari_histo_wsss.core.models.classifier import CAMClassifier

    seen: list[float | None] = []
    changed: list[bool] = []
    original = CAMClassifier.forward_features

    def spy(self, x, pda_threshold=None, embed=False):
        out = original(self, x, pda_threshold, embed)
        if self.training:
            if pda_threshold is not None and not any(t is not None for t in seen):
                with torch.no_grad():
                    plain = original(self, x)["logits"]
                changed.append(not torch.allclose(plain, out["logits"].detach(), rtol=1e-2, atol=0.0))
            seen.append(pda_threshold)
        return out

    monkeypatch.setattr(CAMClassifier, "forward_features", spy)
    cfg = tiny(method="cam", epochs=2, steps=10, max_steps_per_epoch=None, synth_share=0.0, pda=True)
    events = run_all(data, tmp_path / "run", cfg)
    assert events[-1].kind == "done"
    assert seen[:2] == [None, None] and len(seen) == 10  # steps 0 and 1: 0 % and 10 % of the run
    assert all(abs(t - 0.98 ** (20 * k / 10)) < 1e-9 for k, t in enumerate(seen) if k >= 2)
    assert changed == [True]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pda_threshold"] for r in rows] == pytest.approx([0.98 ** 8, 0.98 ** 18])
    monkeypatch.undo()
    # off: no threshold anywhere
    run_all(data, tmp_path / "off", dataclasses.replace(cfg, pda=False))
    rows = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pda_threshold"] for r in rows] == [None, None]


def test_closing_the_generator_checkpoints_and_resume_adds_epochs(data, tmp_path):
    run = tmp_path / "run"
    gen = train_classifier(data, run, tiny(method="cam", epochs=1))
    n = 0
    for ev in gen:
        n += ev.kind == "step"
        if n == 1:
            break
    gen.close()
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["extra"]["epoch"], ck["extra"]["batch"]) == (0, 1)
    events = run_all(data, run, tiny(method="cam", epochs=1), resume=True)
    assert [e.kind for e in events].count("step") == 1 and events[-1].kind == "done"
    # a finished run can be extended: only epochs may grow
    events = run_all(data, run, tiny(method="cam", epochs=2), resume=True)
    assert [e.kind for e in events].count("epoch") == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(TrainingError, match="cannot resume with different settings.*lr"):
        run_all(data, run, tiny(method="cam", epochs=3, lr=0.5), resume=True)
    with pytest.raises(TrainingError, match="already holds a trained run"):
        run_all(data, run, tiny(method="cam"))


def test_validation_loss_without_masks_and_empty_validation(tmp_path):
    ds = make_dataset(tmp_path / "nomask", n_val=0)
    events = run_all(ds, tmp_path / "run", tiny(epochs=1, val_fraction=0.25))
    logs = " ".join(e.message for e in events if e.kind == "log")
    assert "held out" in logs
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["feedback"] == "loss" and row["val_loss"] > 0 and "val_miou" not in row
    with pytest.raises(DatasetError, match="validation set is empty"):
        run_all(ds, tmp_path / "r2", tiny(feedback="miou"))
    with pytest.raises(DatasetError, match="no validation data"):
        run_all(ds, tmp_path / "r3", tiny(val_fraction=0.0))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_bad_input_messages(tmp_path):
    one = make_dataset(tmp_path / "one", only_class=1, n_val=0)
    with pytest.raises(DatasetError, match=r"only one class \(stroma\)"):
        run_all(one, tmp_path / "r1", tiny())

    ds = make_dataset(tmp_path / "ok", n_val=0)
    small = np.full((40, 40, 3), 200, np.uint8)
    Image.fromarray(small).save(ds / "train" / "tiny-[1, 0, 0].png")
    with pytest.raises(DatasetError, match=r"tiny-\[1, 0, 0\]\.png: image is 40x40 px, smaller than the patch size 48"):
        run_all(ds, tmp_path / "r2", tiny(patch_size=48))

    spec = load_dataset(ds)
    spec.train.append(WeakSample("bad", np.array([1, 0], np.uint8), None, reader=lambda: small))
    with pytest.raises(DatasetError, match="bad.*2 entries but the class table has 3"):
        run_all(spec, tmp_path / "r3", tiny())

    with pytest.raises(TrainingError, match="method must be one of"):
        run_all(ds, tmp_path / "r4", tiny(method="mixup"))
    assert not any((tmp_path / n).exists() for n in ("r1", "r2", "r3", "r4"))


def test_checkpoint_of_another_class_table_and_nan_loss(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_all(data, run, tiny(method="cam", epochs=1))
    other = load_dataset(data, classes=ClassTable.custom(["a", "b", "c"]))
    with pytest.raises(TrainingError, match=r"trained for classes \[tumor, stroma, normal\].*\[a, b, c\]"):
        run_all(other, run, tiny(method="cam", epochs=2), resume=True)

    before = (run / "checkpoints" / "last.pt").read_bytes()
    real = train_mod.F.multilabel_soft_margin_loss
    monkeypatch.setattr(train_mod.F, "multilabel_soft_margin_loss", lambda logits, y, **kw: real(logits, y, **kw) * float("nan"))
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 1.*last good checkpoint .*last.pt is kept"):
        run_all(data, run, tiny(method="cam", epochs=2), resume=True)
    monkeypatch.undo()
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    load_run(run)  # still usable, and resumable
    events = run_all(data, run, tiny(method="cam", epochs=2), resume=True)
    assert events[-1].kind == "done"


def test_config_round_trip_and_validation():
    cfg = TrainConfig(segmix_tiles=[32, 16], cam_weights=[1, 0, 0])
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(TrainingError, match="unknown training setting.*colour"):
        TrainConfig.from_dict({**d, "colour": 1})
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(cam_mode="grad"), dict(segmix_shares=(0.0,)), dict(val_fraction=1.0)):
        with pytest.raises(TrainingError):
            TrainConfig(**bad).validate()


def test_loader_workers_do_not_change_the_run(data, tmp_path):
    """Augmentation is seeded per (seed, epoch, item), so worker processes give the same run."""
    run_all(data, tmp_path / "w0", tiny(method="cam", epochs=1, num_workers=0))
    run_all(data, tmp_path / "w2", tiny(method="cam", epochs=1, num_workers=2))
    assert_same_weights(weights_of(tmp_path / "w0"), weights_of(tmp_path / "w2"))
