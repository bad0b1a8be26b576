"""Stage-one training for small label sets: step budget, random crops, frozen BatchNorm and early
stages, the fused stride-16/32 head, raw-logit gating with calibrated offsets, and the warning
for label sets whose classes never occur alone.

Generated 48-px data and random initialisation keep every run to a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_dataset, run_all, tiny

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import WeakSample
from napari_histo_wsss.core.errors import HistoWSSSError, TrainingError
from napari_histo_wsss.core.models.classifier import CAMClassifier
from napari_histo_wsss.core.stage1.cams import calibrate_offsets, logit_maps, raw_argmax_mask
from napari_histo_wsss.core.stage1.train import budget_indices, load_run, single_label_warning


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("budget") / "ds", n_train=10)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_step_budget_is_honoured_beyond_one_pass(data, tmp_path):
    # 10 patches, batch 4: one pass is 2 steps; a budget of 9 steps over 3 epochs makes 3 per epoch
    events = run_all(data, tmp_path / "r", tiny(method="cam", steps=9, epochs=3, max_steps_per_epoch=None))
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 9
    assert {e.steps for e in steps} == {3}
    assert events[-1].kind == "done"


def test_budget_smaller_than_the_epochs_is_a_clear_error(data, tmp_path):
    with pytest.raises(TrainingError, match="budget of 2 steps cannot make 3 epochs"):
        run_all(data, tmp_path / "r", tiny(method="cam", steps=2, epochs=3, max_steps_per_epoch=None))


def test_budget_indices_cover_every_sample_before_repeating():
    idx = budget_indices(10, 25, seed=1, epoch=0)
    assert len(idx) == 25
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:20].tolist()) == list(range(10))
    assert np.array_equal(idx, budget_indices(10, 25, seed=1, epoch=0))
    assert not np.array_equal(idx, budget_indices(10, 25, seed=1, epoch=1))
    both = np.sort(np.concatenate([budget_indices(10, 6, 1, 0, rank=r, world=2) for r in range(2)]))
    assert np.array_equal(both, np.sort(budget_indices(10, 12, 1, 0)))


def test_crops_frozen_bn_and_stages_train_and_repeat(data, tmp_path):
    cfg = tiny(method="cam", steps=4, epochs=2, max_steps_per_epoch=None, crop_size=32, freeze_bn=True, freeze_stages=2)
    init = CAMClassifier(3, weights="none", output_stride=32)
    torch.manual_seed(cfg.seed)
    run_all(data, tmp_path / "a", cfg)
    run_all(data, tmp_path / "b", cfg)
    a, _, _ = load_run(tmp_path / "a", "last")
    b, _, _ = load_run(tmp_path / "b", "last")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # same seed -> the same run, bit for bit
    # frozen BatchNorm: running statistics still those of the freshly built network
    bn_a = {k: v for k, v in a.state_dict().items() if "running_mean" in k or "running_var" in k}
    bn_init = {k: v for k, v in init.state_dict().items() if k in bn_a}
    assert bn_a and all(torch.equal(bn_a[k], bn_init[k]) for k in bn_a)


def test_freeze_keeps_bn_in_eval_and_early_stages_without_gradient():
    m = CAMClassifier(3, weights="none", output_stride=32)
    m.freeze(batchnorm=True, stages=2)
    m.train()
    bns = [x for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    x = torch.randn(2, 3, 64, 64)
    m.forward_features(x)["logits"].sum().backward()
    stem = m.backbone._conv_stem.weight
    late = m.backbone._conv_head.weight
    assert stem.grad is None and not stem.requires_grad
    assert late.grad is not None and late.grad.abs().sum() > 0
    with pytest.raises(Exception, match="frozen stages must be 0 to 3"):
        m.freeze(stages=5)


def test_frozen_batchnorm_stays_frozen_after_the_data_parallel_swap():
    """Data-parallel training swaps every batch norm for a synchronised one in place; the swapped
    ones must stay in eval mode too (else N ranks normalise by batch statistics that one process
    never uses, and the runs part)."""
    from napari_histo_wsss.core.distributed import GlobalBatchNorm, convert_batchnorm

    m = CAMClassifier(3, weights="none", output_stride=32)
    m.freeze(batchnorm=True, stages=0)
    convert_batchnorm(m)
    m.train()
    bns = [x for x in m.backbone.modules() if isinstance(x, GlobalBatchNorm)]
    assert bns and not any(b.training for b in bns)
    assert m.head.training


def test_fused_head_doubles_the_cam_resolution_and_keeps_cams_faithful():
    x = torch.randn(2, 3, 128, 128)
    last = CAMClassifier(3, weights="none", output_stride=32)
    fused = CAMClassifier(3, weights="none", output_stride=32, head="fused").eval()
    assert last.eval().forward_features(x)["cam"].shape[-2:] == (4, 4)
    out = fused.forward_features(x)
    assert out["cam"].shape == (2, 3, 8, 8)  # stride 16
    assert torch.allclose(out["cam"].mean(dim=(2, 3)), out["logits"], atol=1e-5)
    assert fused.arch["head"] == "fused" and "head" not in last.arch  # older checkpoints rebuild as before
    maps = logit_maps(fused, np.full((100, 90, 3), 128, np.uint8))
    assert maps.shape == (3, 100, 90)


def test_raw_argmax_gating_and_calibrated_offsets_on_a_constructed_case():
    classes = get_preset("wsss4luad")
    # ground truth: left half tumour (0), right half stroma (1); the raw logits favour stroma by 1.5
    gt = np.zeros((20, 20), np.uint8)
    gt[:, 10:] = 1
    logits = np.zeros((3, 20, 20), np.float32)
    logits[0, :, :10] = 2.0
    logits[1] = 3.0
    logits[1, :, 10:] = 4.0
    logits[2] = -5.0
    plain = raw_argmax_mask(logits, classes)
    assert (plain == 1).all()  # stroma everywhere before calibration
    off, miou = calibrate_offsets([(logits, gt)], classes, subsample=1)
    assert off[0] == 0 and off[1] <= -1.0 and miou == pytest.approx(1.0)
    assert np.array_equal(raw_argmax_mask(logits, classes, off), gt)
    # labels restrict the choice; white glass becomes background
    only_tumour = raw_argmax_mask(logits, classes, labels=[1, 0, 0])
    assert (only_tumour == 0).all()
    rgb = np.full((20, 20, 3), 120, np.uint8)
    rgb[:15, :15] = 255
    with_glass = raw_argmax_mask(logits, classes, off, rgb=rgb)
    assert (with_glass[:15, :15] == classes.background_index).all()


def test_area_floor_drops_a_probable_class_that_covers_little_tissue():
    from napari_histo_wsss.core.stage1.cams import allowed_classes, class_shares

    classes = get_preset("wsss4luad")
    # an image whose raw argmax is tumour on 71 % of the tissue, stroma on 26 %, normal on 2 %,
    # with a white glass corner; the image probabilities call all three present
    logits = np.zeros((3, 20, 20), np.float32)
    logits[0, :12] = 5.0
    logits[1, 12:] = 5.0
    logits[2, 12:14, :4] = 9.0
    rgb = np.full((20, 20, 3), 120, np.uint8)
    rgb[12:, 12:] = 255
    shares = class_shares(raw_argmax_mask(logits, classes, rgb=rgb), classes)
    tissue = 400 - 64
    assert shares == pytest.approx([240 / tissue, (160 - 64 - 8) / tissue, 8 / tissue])
    probs = np.array([0.99, 0.95, 0.9], np.float32)
    assert allowed_classes(classes, probs=probs, prob_threshold=0.8).tolist() == [True, True, True]
    # the floor drops normal; 0 keeps every class that holds a pixel; the probabilities still gate
    assert allowed_classes(classes, probs=probs, prob_threshold=0.8, shares=shares, min_area=0.05).tolist() == [True, True, False]
    assert allowed_classes(classes, probs=probs, prob_threshold=0.8, shares=shares, min_area=0.0).tolist() == [True, True, True]
    assert allowed_classes(classes, probs=np.array([0.99, 0.5, 0.9], np.float32), prob_threshold=0.8, shares=shares,
                           min_area=0.05).tolist() == [True, False, False]
    # a floor above every share keeps the largest; no tissue at all leaves the decision to the probabilities
    assert allowed_classes(classes, probs=probs, prob_threshold=0.8, shares=shares, min_area=0.9).tolist() == [True, False, False]
    assert allowed_classes(classes, probs=probs, prob_threshold=0.8, shares=np.zeros(3), min_area=0.1).all()
    with pytest.raises(HistoWSSSError, match="2 class shares for 3 classes"):
        allowed_classes(classes, probs=probs, shares=np.zeros(2))


def test_warning_when_a_class_never_occurs_alone(data, tmp_path):
    classes = get_preset("wsss4luad")
    both = [WeakSample(f"p{i}", np.array([1, 1, 0], np.uint8)) for i in range(4)]
    msg = single_label_warning(both, classes)
    assert msg and "only tumor" in msg and "stroma" in msg and "label a few patches" in msg
    assert single_label_warning(both + [WeakSample("a", np.array([1, 0, 0])), WeakSample("b", np.array([0, 1, 0]))],
                                classes) is None
    # the training run logs it: the generated set's stroma+normal / tumour+normal pairs all have singles
    events = run_all(data, tmp_path / "r", tiny(method="cam", epochs=1))
    assert not any("holds only" in (e.message or "") for e in events)


def test_validation_calibrates_raw_offsets_and_pseudo_masks_use_them(data, tmp_path):
    from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings, generate_pseudo_masks
    from napari_histo_wsss.core.stage1.train import calibrated_offsets

    run = tmp_path / "r"
    run_all(data, run, tiny(method="cam", epochs=1))
    for gating in ("raw", "prob-raw", "prob-area"):
        off = calibrated_offsets(run, "best", gating)
        assert off is not None and len(off) == 3 and off[0] == 0.0
    model, classes, _ = load_run(run)
    out = tmp_path / "pm"
    s = PseudoMaskSettings(mode="last", gating="prob-raw", offsets=tuple(calibrated_offsets(run, "best", "prob-raw")))
    events = list(generate_pseudo_masks(model, classes, data / "val" / "img", out, s))
    assert events[-1].kind == "done"
    masks = sorted(out.glob("*.png"))
    assert len(masks) == 2
    from PIL import Image
    m = np.array(Image.open(masks[0]))
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1, 2, 3}
    assert (m[:8, :8] == 3).all()  # white glass stays background
    # prob-area (the default): the run's floor and offsets; a floor of 1 leaves each image one class
    from napari_histo_wsss.core.stage1.cams import AREA_FLOORS
    from napari_histo_wsss.core.stage1.train import apply_area_calibration, area_calibration, calibrated_min_area

    assert calibrated_min_area(run) in AREA_FLOORS
    s = PseudoMaskSettings(mode="last", prob_threshold=0.0)
    assert s.gating == "prob-area" and apply_area_calibration(s, run) is None
    assert s.min_area == calibrated_min_area(run) and s.offsets == tuple(calibrated_offsets(run, "best", "prob-area"))
    cal = area_calibration(run)  # the one reader the slide canvas uses too
    assert (cal.min_area, cal.offsets, cal.raw_offsets) == (s.min_area, s.offsets, s.area_offsets)
    assert list(generate_pseudo_masks(model, classes, data / "val" / "img", tmp_path / "pa", s))[-1].kind == "done"
    # the masks written are the rule's: the floor met by the shares of the ungated raw argmax
    from napari_histo_wsss.core.data.datasets import read_rgb
    from napari_histo_wsss.core.stage1.cams import allowed_classes, cams_for_image, class_shares

    for floor in (None, 1.0):
        st = PseudoMaskSettings(mode="last", window=16, prob_threshold=0.0, min_area=floor, refine="none")
        apply_area_calibration(st, run)
        assert st.min_area == (calibrated_min_area(run) if floor is None else floor)  # a floor given is kept
        out = tmp_path / f"pa-{floor}"
        list(generate_pseudo_masks(model, classes, data / "val" / "img", out, st))
        for img in sorted((data / "val" / "img").glob("*.png")):
            rgb = read_rgb(img)
            lg = logit_maps(model, rgb)
            shares = class_shares(raw_argmax_mask(lg, classes, st.area_offsets, rgb=rgb), classes)
            probs = cams_for_image(model, rgb, mode="last", window=16)[1]
            gate = allowed_classes(classes, probs=probs, prob_threshold=0.0, shares=shares, min_area=st.min_area)
            want = raw_argmax_mask(lg, classes, st.offsets, rgb=rgb, labels=gate.astype(np.uint8))
            got = np.array(Image.open(out / f"{img.stem}.png"))
            assert np.array_equal(got, want)
            if floor == 1.0:
                assert gate.sum() == 1 and len(set(np.unique(got)) - {classes.background_index}) <= 1
    # a run from before the floor: prob-raw, said in one line
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("min_area", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    old = PseudoMaskSettings(mode="last")
    assert area_calibration(run) is None and "gating as prob-raw" in apply_area_calibration(old, run)
    assert old.min_area is None and old.offsets == tuple(calibrated_offsets(run, "best", "prob-raw"))
