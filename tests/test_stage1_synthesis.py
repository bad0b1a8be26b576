"""Synthesis in stage one (issue 10): a share of each training batch replaced by Mosaic/Bezier
images made from single-label patches, labelled by the classes of their exact masks, and an
optional pixel loss of the CAM logits against those masks.

Generated 48-px data (``make_dataset``: single-label patches of every class) and random
initialisation keep every run to a few steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import _no_torchrun_env, _torchrun
from test_stage1_budget import _threads  # noqa: F401 - autouse fixture: one torch thread
from test_train import assert_same_weights, make_dataset, run_all, run_twice, tiny, weights_of

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import WeakSample, load_dataset
from napari_histo_wsss.core.models.classifier import CAMClassifier
from napari_histo_wsss.core.stage1.synthesis import SyntheticBatches, mask_labels, pixel_loss
from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "ds", n_train=12)


def synth(**kw) -> TrainConfig:
    base = dict(method="cam", steps=6, epochs=2, max_steps_per_epoch=None, synth_share=0.5, crop_size=32)
    base.update(kw)
    return tiny(**base)


def test_settings_declare_the_switches_for_cli_and_form():
    cfg = TrainConfig()
    # the defaults won on the validation images (docs/benchmarks/stage1.md: p128-synth-pix)
    assert cfg.synth_share == 0.25 and cfg.synth_kinds == ("mosaic", "bezier") and cfg.synth_pixel_weight == 0.5
    names = {f.name for f in TrainConfig.settings_fields()}
    assert {"synth_share", "synth_kinds", "synth_pixel_weight"} <= names
    assert any("synth_share" in p for p in dataclasses.replace(cfg, synth_share=1.0).problems())
    assert any("synth_kinds" in p for p in dataclasses.replace(cfg, synth_kinds=("blend",)).problems())


def test_labels_are_the_classes_of_the_exact_mask_and_batches_repeat(data):
    spec = load_dataset(data)
    classes = spec.classes
    reads = {"n": 0}

    def counted(s: WeakSample) -> WeakSample:
        def read() -> np.ndarray:
            reads["n"] += 1
            return s.image()
        return WeakSample(s.name, s.labels, reader=read)

    samples = [counted(s) for s in spec.train]
    singles = sum(int(np.asarray(s.labels).sum() == 1) for s in samples)
    sb = SyntheticBatches(samples, classes, patch=48, side=32, kinds=("mosaic", "bezier"))
    assert sorted(sb.pools) == [0, 1, 2]
    for seed in range(4):
        x, y, masks = sb.batch(5, seed)
        assert x.shape == (5, 3, 32, 32) and y.shape == (5, 3) and masks.shape == (5, 32, 32)
        for lab, m in zip(y.numpy(), masks.numpy()):
            present = sorted(set(np.unique(m).tolist()) - {classes.background_index})
            assert np.flatnonzero(lab).tolist() == present
            assert len(present) >= 1
    assert reads["n"] <= singles  # each pool image decoded once, when the pools were built
    a, b, c = sb.batch(4, 7), sb.batch(4, 7), sb.batch(4, 8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert mask_labels(np.array([[0, 3], [3, 2]], np.uint8), 3).tolist() == [1.0, 0.0, 1.0]


def test_training_batches_hold_the_synthetic_share(data, tmp_path, monkeypatch):
    made, seen = [], []
    real_batch = SyntheticBatches.batch

    def spy_batch(self, n, seed, **kw):
        out = real_batch(self, n, seed, **kw)
        made.append((n, seed, out[0]))
        return out

    real_ff = CAMClassifier.forward_features

    def spy_ff(self, x, *a, **kw):
        if torch.is_grad_enabled() and self.training:
            seen.append(x.detach().clone())
        return real_ff(self, x, *a, **kw)

    monkeypatch.setattr(SyntheticBatches, "batch", spy_batch)
    monkeypatch.setattr(CAMClassifier, "forward_features", spy_ff)
    events = run_all(data, tmp_path / "r", synth(synth_share=0.25, batch_size=8))
    assert events[-1].kind == "done"
    assert any("synthesis: 2 of 8 images per batch" in (e.message or "") for e in events)
    assert len(made) == len(seen) == 6  # every step
    assert len({s for _, s, _ in made}) == 6  # a different seed per step
    for (n, _, sx), x in zip(made, seen):
        assert n == 2 and x.shape[0] == 8
        assert torch.equal(x[-2:], sx)  # the last two inputs are the synthetic ones
        assert not any(torch.equal(x[i], sx[j]) for i in range(6) for j in range(2))


def test_synthesis_runs_repeat_bit_for_bit_and_resume_exactly(data, tmp_path):
    cfg = synth(synth_pixel_weight=0.5)
    ref = run_twice(data, tmp_path, cfg)
    run_all(data, tmp_path / "off", dataclasses.replace(cfg, synth_share=0.0))
    off = weights_of(tmp_path / "off")
    assert any(not torch.equal(ref[k], off[k]) for k in ref)  # synthesis changed the training

    count = {"steps": 0}
    run = tmp_path / "c"
    for ev in train_classifier(data, run, cfg, should_stop=lambda: count["steps"] >= 4):
        count["steps"] += ev.kind == "step"
    assert ev.kind == "cancelled" and (ev.epoch, ev.step) == (2, 1)
    resumed = run_all(data, run, cfg, resume=True)
    assert [e.kind for e in resumed].count("step") == 2
    assert_same_weights(ref, weights_of(run))


def test_pixel_weight_changes_the_run(data, tmp_path):
    run_all(data, tmp_path / "img", synth(steps=2, epochs=1))
    run_all(data, tmp_path / "pix", synth(steps=2, epochs=1, synth_pixel_weight=1.0))
    a, b = weights_of(tmp_path / "img"), weights_of(tmp_path / "pix")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head"))


def test_fewer_than_two_single_label_classes_warns_and_trains_without_synthesis(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", n_train=12)
    for i in (1, 2, 7, 8):  # the single-label stroma and normal patches (make_dataset's combos)
        (path,) = (ds / "train").glob(f"p{i:03d}*")
        path.unlink()
    calls = []
    monkeypatch.setattr(SyntheticBatches, "batch", lambda self, n, seed, **kw: calls.append(n))
    events = run_all(ds, tmp_path / "r", synth())
    assert events[-1].kind == "done" and not calls
    notes = [e.message for e in events if e.kind == "log"]
    assert any("synthesis off" in m and "at least two classes" in m and "tumor" in m for m in notes), notes


def test_pixel_loss_follows_the_mask_and_reaches_the_cam_head():
    # constructed case: left half class 0, right half class 1, top-left cell glass
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[:, :, 8:] = 1
    mask[:, :4, :4] = 3
    right = torch.full((1, 3, 4, 4), -5.0)
    right[:, 0, :, :2] = 5.0
    right[:, 1, :, 2:] = 5.0
    wrong = right.flip(-1)
    assert pixel_loss(right, mask) < 0.01 < 5.0 < pixel_loss(wrong, mask)
    glass = torch.full((1, 16, 16), 3, dtype=torch.long)
    assert float(pixel_loss(right, glass)) == 0.0

    model = CAMClassifier(3, weights="none", output_stride=32, head="fused")
    sb = SyntheticBatches([WeakSample(f"s{c}", np.eye(3, dtype=np.uint8)[c % 3],
                                      reader=lambda c=c: np.full((32, 32, 3), 60 + 40 * (c % 3), np.uint8))
                           for c in range(6)], get_preset("wsss4luad"), patch=32, side=32, kinds=("mosaic",))
    x, _, masks = sb.batch(2, 0)
    out = model.forward_features(x)
    pixel_loss(out["cam"], masks).backward()
    grads = [p.grad for p in model.head.parameters()]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_data_parallel_ranks_make_their_own_synthetic_share(tmp_path, monkeypatch):
    _no_torchrun_env(monkeypatch)
    ds = make_dataset(tmp_path / "data", n_train=12, size=48)
    run = tmp_path / "ddp"
    r = _torchrun("train-cls", str(ds), str(run), "--method", "cam", "--epochs", "1", "--steps", "2",
                  "--batch-size", "4", "--weights", "none", "--backbone", "resnet18", "--crop-size", "32",
                  "--synth-share", "0.5", "--synth-pixel-weight", "0.5", "--json")
    out = r.stdout + r.stderr
    assert "x 2 processes" in out and "synthesis: 1 of 2 images per batch per process" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["synth_share"] == 0.5 and cfg["synth_pixel_weight"] == 0.5
    assert (run / "checkpoints" / "last.pt").is_file()


def test_stain_jitter_scales_and_shifts_each_stain_of_a_real_h_and_e_image(wsss4luad_dir):
    from PIL import Image

    from napari_histo_wsss.core.data.datasets import _HED_FROM_RGB, stain_jitter

    path = sorted((wsss4luad_dir / "val" / "img").glob("*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))[:96, :96]
    assert stain_jitter(rgb, 0.0) is rgb  # off: the patch as it was

    def hed(img: np.ndarray) -> np.ndarray:
        return -np.log((img.astype(np.float64) + 1.0) / 256.0) @ _HED_FROM_RGB

    out = stain_jitter(rgb, 0.2, torch.Generator().manual_seed(5))
    r = (torch.rand(6, generator=torch.Generator().manual_seed(5)).numpy().astype(np.float64) * 2 - 1) * 0.2
    expected = hed(rgb) * (1 + r[:3]) + r[3:]
    inside = ((out > 0) & (out < 255)).all(axis=-1)  # pixels that were not clipped
    assert inside.mean() > 0.9
    err = np.abs(hed(out) - expected)[inside]
    assert np.median(err) < 0.01  # the output's stains are the input's, scaled and shifted (uint8 rounding)
    assert np.abs(out.astype(int) - rgb).mean() > 3  # and that moved the colours visibly
    again = stain_jitter(rgb, 0.2, torch.Generator().manual_seed(5))
    other = stain_jitter(rgb, 0.2, torch.Generator().manual_seed(6))
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_stain_jitter_reaches_the_synthetic_images_and_the_run(data, tmp_path):
    spec = load_dataset(data)
    sb = SyntheticBatches(spec.train, spec.classes, patch=48, side=32, kinds=("mosaic", "bezier"))
    x0, y0, m0 = sb.batch(4, 7)
    x1, y1, m1 = sb.batch(4, 7, stain=0.2)
    assert torch.equal(y0, y1) and torch.equal(m0, m1)  # same images, same masks and labels
    assert not torch.equal(x0, x1)  # other colours
    assert all(torch.equal(u, v) for u, v in zip(sb.batch(4, 7, stain=0.2), (x1, y1, m1)))  # a function of seed

    assert TrainConfig().stain_jitter == 0.0  # off by default (docs/benchmarks/stage1.md)
    assert any("stain_jitter" in p for p in dataclasses.replace(TrainConfig(), stain_jitter=1.5).problems())
    run_all(data, tmp_path / "plain", synth(steps=2, epochs=1))
    run_all(data, tmp_path / "stain", synth(steps=2, epochs=1, stain_jitter=0.2))
    run_all(data, tmp_path / "noaug", synth(steps=2, epochs=1, augment=False))
    run_all(data, tmp_path / "noaug-stain", synth(steps=2, epochs=1, augment=False, stain_jitter=0.2))
    a, b = weights_of(tmp_path / "plain"), weights_of(tmp_path / "stain")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head"))
    # no augmentation, no stain jitter either
    assert_same_weights(weights_of(tmp_path / "noaug"), weights_of(tmp_path / "noaug-stain"))
