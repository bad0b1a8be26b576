"""Stage-two training: MLPS weighted losses, OEEM, corrected pixels, pseudo-mask sets made from a
real stage-one run on WSSS4LUAD patches, checkpoints, cancel + resume, synthesis switch, the fully
supervised reference, and clear errors for bad masks."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import make_patches, read_index_mask
from napari_histo_wsss.core.errors import DatasetError, TrainingError
from napari_histo_wsss.core.stage2.train import (
    SegConfig,
    SegDataset,
    SegSample,
    load_segmenter,
    mlps_loss,
    oeem_weights,
    train_segmenter,
)

CLASSES = get_preset("wsss4luad")
BG = CLASSES.background_index


def tiny(**kw) -> SegConfig:
    base = dict(epochs=1, batch_size=2, max_steps_per_epoch=2, val_max_images=1, warmup_steps=0, seed=0)
    base.update(kw)
    return SegConfig(**base)


@pytest.fixture(scope="module")
def stage_one(wsss4luad_dir, tmp_path_factory):
    """A real (tiny) stage-one run on 64-px WSSS4LUAD patches of three images, one held out."""
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("s1")
    for sub in ("img", "mask"):
        (root / "src" / sub).mkdir(parents=True)
        for name in ("00.png", "03.png", "01.png"):
            shutil.copy(wsss4luad_dir / "val" / sub / name, root / "src" / sub / name)
    make_patches(root / "src" / "img", root / "src" / "mask", root / "patches", CLASSES, patch_size=64,
                 stride=128, val_fraction=0.34, seed=1)
    cfg = TrainConfig(method="cam", epochs=1, batch_size=4, max_steps_per_epoch=1, patch_size=64, val_max_images=1,
                      warmup_steps=0)
    events = list(train_classifier(root / "patches", root / "run", cfg))
    assert events[-1].kind == "done"
    return root


def test_mlps_loss_is_weighted_cross_entropy_without_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    t = torch.randint(0, 3, (2, 8, 8))
    one = mlps_loss(logits, t[:, None], (1.0,), BG)
    assert one.item() == pytest.approx(F.cross_entropy(logits, t).item(), rel=1e-5)
    same = mlps_loss(logits, torch.stack([t, t, t], 1), (0.6, 0.2, 0.2), BG)
    assert same.item() == pytest.approx(one.item(), rel=1e-5)
    ignored = t.clone()
    ignored[:, :4] = BG
    expected = F.cross_entropy(logits, ignored, ignore_index=BG)
    assert mlps_loss(logits, ignored[:, None], (1.0,), BG).item() == pytest.approx(expected.item(), rel=1e-5)
    other = torch.randint(0, 3, (2, 8, 8))
    mixed = mlps_loss(logits, torch.stack([t, other], 1), (0.75, 0.25), BG)
    ref = 0.75 * F.cross_entropy(logits, t) + 0.25 * F.cross_entropy(logits, other)
    assert mixed.item() == pytest.approx(ref.item(), rel=1e-5)
    weight = torch.ones(2, 8, 8)
    weight[:, :, :4] = 3.0  # corrected pixels weigh more
    ce = F.cross_entropy(logits, t, reduction="none")
    ref = (ce * weight).sum() / weight.sum()
    assert mlps_loss(logits, t[:, None], (1.0,), BG, weight).item() == pytest.approx(ref.item(), rel=1e-5)


def test_oeem_weights_favour_easy_pixels_on_multi_class_images():
    loss = torch.tensor([[[0.1, 2.0], [0.5, 0.1]], [[0.1, 2.0], [0.5, 0.1]]])
    valid = torch.ones_like(loss, dtype=torch.bool)
    targets = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [1, 1]]])
    w = oeem_weights(loss, valid, targets, BG)
    assert w[0].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w[0, 0, 0] > w[0, 1, 0] > w[0, 0, 1]
    assert torch.all(w[1] == 1)  # single-class image: unweighted
    logits = torch.randn(2, 3, 2, 2)
    assert torch.isfinite(mlps_loss(logits, targets[:, None], (1.0,), BG, oeem=True))


def test_corrected_pixels_override_every_mask_set_and_weigh_more():
    rgb = np.full((16, 16, 3), 128, np.uint8)
    pseudo = np.zeros((16, 16), np.uint8)
    corrected = np.full((16, 16), 2, np.uint8)
    flag = np.zeros((16, 16), bool)
    flag[:, :5] = True
    s = SegSample("x", lambda: rgb, [lambda: pseudo.copy(), lambda: pseudo.copy()], np.array([1, 0, 1], np.uint8),
                  corrected=lambda: (corrected, flag))
    x, targets, weight, labels = SegDataset([s], CLASSES, 16, corrected_weight=4.0)[0]
    assert targets.shape == (2, 16, 16)
    assert (targets[:, :, :5] == 2).all() and (targets[:, :, 5:] == 0).all()
    assert (weight[:, :5] == 4.0).all() and (weight[:, 5:] == 1.0).all()
    bad = SegSample("y", lambda: rgb, [lambda: np.zeros((8, 16), np.uint8)], np.array([1, 0, 0], np.uint8))
    with pytest.raises(DatasetError, match="mask set 1 is 16x8"):
        SegDataset([bad], CLASSES, 16)[0]


def test_train_segmenter_from_stage_one_run_with_resume(stage_one):
    run = stage_one / "run"
    out = stage_one / "seg"
    events = list(train_segmenter(run, config=tiny(), dataset=stage_one / "patches", out_dir=out))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "epoch" in kinds and "checkpoint" in kinds
    n_train = len(list((stage_one / "patches" / "train").glob("*.png")))
    for name in ("fused", "last", "shallow"):  # the three MLPS pseudo-mask sets
        masks = list((out / "pseudo" / name).glob("*.png"))
        assert len(masks) == n_train
    start = next(e for e in events if e.kind == "start")
    assert "3 mask set(s) weighted [0.6, 0.2, 0.2]" in start.message
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and 0 <= row["val_miou"] <= 1
    model, classes, cfg, meta = load_segmenter(out)
    assert classes.names == CLASSES.names and meta["patch_size"] == 64
    assert model.aux is None and meta["stage_one"] == str(run)
    with pytest.raises(TrainingError, match="already holds"):
        list(train_segmenter(run, config=tiny(), dataset=stage_one / "patches", out_dir=out))
    events = list(train_segmenter(run, config=tiny(epochs=2), dataset=stage_one / "patches", out_dir=out, resume=True))
    assert events[-1].kind == "done"
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # the trained segmenter predicts a folder of held-out images
    from napari_histo_wsss.core.stage2.infer import predict_folder, segmenter_predict_fn

    model, classes, _, _ = load_segmenter(out)
    val_img = stage_one / "patches" / "val" / "img"
    list(predict_folder(val_img, stage_one / "pred", segmenter_predict_fn(model, classes), classes, tile=128, overlap=16))
    for p in val_img.iterdir():
        assert np.asarray(Image.open(stage_one / "pred" / p.name)).shape == np.asarray(Image.open(p)).shape[:2]


def test_cancel_saves_position_and_resume_finishes(stage_one):
    out = stage_one / "seg-cancel"
    pseudo = stage_one / "seg" / "pseudo" / "fused"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1

    events = list(train_segmenter(stage_one / "run", pseudo, tiny(max_steps_per_epoch=3), dataset=stage_one / "patches",
                                  out_dir=out, should_stop=stop))
    assert events[-1].kind == "cancelled" and (out / "checkpoints" / "last.pt").is_file()
    from napari_histo_wsss.core.models import load_checkpoint

    assert load_checkpoint(out / "checkpoints" / "last.pt")["extra"]["batch"] == 1
    events = list(train_segmenter(stage_one / "run", pseudo, tiny(max_steps_per_epoch=3), dataset=stage_one / "patches",
                                  out_dir=out, resume=True))
    assert events[-1].kind == "done"
    assert sum(e.kind == "step" for e in events) == 2  # steps 2 and 3 only


def test_synthesis_switch_trains_with_consistency(stage_one):
    out = stage_one / "seg-synth"
    cfg = tiny(synthesis=("mosaic", "bezier"), synthesis_count=4, filter_steps=3, batch_size=4, max_steps_per_epoch=None)
    events = list(train_segmenter(stage_one / "run", stage_one / "seg" / "pseudo" / "fused", cfg,
                                  dataset=stage_one / "patches", out_dir=out))
    assert events[-1].kind == "done"
    assert any("realness filter kept 4 of 8" in e.message for e in events)
    # half of each batch is synthetic, yet an epoch is as many batches as without synthesis
    from napari_histo_wsss.core.data.datasets import load_dataset

    n_train = len(load_dataset(stage_one / "patches").train)
    assert n_train >= 8
    assert sum(e.kind == "step" and e.epochs > 0 for e in events) == n_train // 4
    model, _, cfg2, _ = load_segmenter(out)
    assert model.aux is not None and cfg2.synthesis == ("mosaic", "bezier")
    # what Resume (panel and CLI) continues: the saved settings, without the records beside them
    assert SegConfig.saved(out) == cfg
    # the same seed gives the same weights, bit for bit (synthesis and its filter included)
    again = stage_one / "seg-synth-again"
    list(train_segmenter(stage_one / "run", stage_one / "seg" / "pseudo" / "fused", cfg,
                         dataset=stage_one / "patches", out_dir=again))
    from napari_histo_wsss.core.models import load_checkpoint

    w1, w2 = (load_checkpoint(o / "checkpoints" / "last.pt")["state_dict"] for o in (out, again))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_damaged_run_config_is_a_clear_error_on_resume(stage_one, tmp_path, capsys):
    from napari_histo_wsss.cli import main as cli_main

    out = tmp_path / "seg"
    out.mkdir()
    (out / "config.json").write_text("{not json")
    with pytest.raises(TrainingError, match="config.json: unreadable run config"):
        SegConfig.saved(out)
    assert cli_main(["train-seg", str(stage_one / "run"), "--out", str(out), "--resume"]) == 2
    assert "unreadable run config" in capsys.readouterr().err


def test_full_supervision_uses_ground_truth_crops(stage_one):
    from napari_histo_wsss.core.data.datasets import load_dataset
    from napari_histo_wsss.core.stage2.train import _source_masks

    spec = load_dataset(stage_one / "patches")
    loaders = _source_masks(spec)
    sample = spec.train[0]
    stem, x, y = sample.name.rsplit("-", 1)[0].rsplit("_", 2)
    gt = read_index_mask(stage_one / "src" / "mask" / f"{stem}.png", CLASSES)
    crop = np.full((64, 64), BG, np.uint8)
    part = gt[int(y):int(y) + 64, int(x):int(x) + 64]
    crop[: part.shape[0], : part.shape[1]] = part
    assert (loaders[0]() == crop).all()
    events = list(train_segmenter(stage_one / "run", None, tiny(supervision="full", max_steps_per_epoch=1),
                                  dataset=spec, out_dir=stage_one / "seg-full"))
    assert events[-1].kind == "done" and "ground truth" in next(e for e in events if e.kind == "start").message


def test_bad_mask_folders_and_runs_are_clear_errors(stage_one, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(stage_one / "seg" / "pseudo" / "fused", masks)
    victim = sorted(masks.glob("*.png"))[0]
    victim.unlink()
    with pytest.raises(DatasetError, match="no mask for 1 of"):
        list(train_segmenter(stage_one / "run", masks, tiny(), dataset=stage_one / "patches", out_dir=tmp_path / "o"))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(victim)
    with pytest.raises(DatasetError, match="mask is 12x10 px"):
        list(train_segmenter(stage_one / "run", masks, tiny(), dataset=stage_one / "patches", out_dir=tmp_path / "o"))
    with pytest.raises(TrainingError, match="not found"):
        list(train_segmenter(tmp_path / "no-run", masks, tiny()))
    # a run records its dataset (dataset.json); one that does not needs the dataset named
    assert (stage_one / "run" / "dataset.json").is_file()
    bare = tmp_path / "bare-run"
    shutil.copytree(stage_one / "run", bare, ignore=shutil.ignore_patterns("dataset.json", "segmenter", "seg*"))
    with pytest.raises(TrainingError, match="does not record its training dataset"):
        list(train_segmenter(bare, masks, tiny(), out_dir=tmp_path / "o"))


def test_project_corrections_override_pseudo_mask(stage_one, cmu_svs, tmp_path):
    """A project: labelled patches read from the slide, the project's pseudo-mask cropped to them,
    the pathologist's corrected pixels overriding it with a higher weight."""
    from napari_histo_wsss.core.data.datasets import load_dataset
    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.stage2.train import _project_samples

    project = Project.create(tmp_path / "p.wsss", CLASSES, patch_size=64, target_mpp=2.0)
    sid = project.add_slide(cmu_svs)
    size0 = 256  # 64 px at 2 um/px on a ~0.5 um/px slide
    project.set_patch_labels(sid, [512, 1024], [1024, 1024], size0, np.array([[1, 1, 0], [0, 1, 0]]))
    pseudo = np.zeros((2967 // 16 + 1, 2220 // 16 + 1), np.uint8)  # tumour everywhere
    corrected = np.full_like(pseudo, 1)  # corrected to stroma ...
    flag = np.zeros(pseudo.shape, bool)
    flag[:, : 1024 // 16 + 8] = True  # ... left of x = 1152
    project.write_mask(sid, "pseudo", pseudo, 16.0)
    project.write_mask(sid, "corrected", corrected, 16.0)
    project.write_mask(sid, "corrected_flag", flag, 16.0)
    spec = load_dataset(tmp_path / "p.wsss")
    samples = sorted(_project_samples(spec), key=lambda s: s.name)
    item = SegDataset(samples, CLASSES, 64, corrected_weight=3.0)
    _, t0, w0, _ = item[0]  # x 1024..1280: left half corrected
    assert (t0[0, :, :30] == 1).all() and (t0[0, :, 34:] == 0).all()
    assert (w0[:, :30] == 3.0).all() and (w0[:, 34:] == 1.0).all()
    _, t1, w1, _ = item[1]  # x 512..768: all corrected
    assert (t1 == 1).all() and (w1 == 3.0).all()
    events = list(train_segmenter(stage_one / "run", None, tiny(max_steps_per_epoch=1), dataset=spec,
                                  out_dir=tmp_path / "seg"))
    assert events[-1].kind == "done"
    assert "project pseudo-mask + corrections" in next(e for e in events if e.kind == "start").message


@pytest.mark.parametrize("phase, big", [("synthesising images", dict(synthesis_count=20000, filter_steps=1)),
                                        ("training the realness filter", dict(synthesis_count=8, filter_steps=5000))])
def test_stop_during_synthesis_ends_within_seconds(stage_one, tmp_path, phase, big):
    """Synthesis and the realness filter report progress with an ETA and honour a stop within
    seconds: with these settings the end of the phase, where a stop used to be seen first, is
    minutes away (ETA 4-15 min on two CPU cores)."""
    import time

    out = tmp_path / "seg"
    asked: dict = {}
    cfg = tiny(supervision="full", synthesis=("mosaic", "bezier"), batch_size=4, **big)
    seen = []
    for ev in train_segmenter(stage_one / "run", None, cfg, dataset=stage_one / "patches", out_dir=out,
                              should_stop=lambda: "t" in asked):
        seen.append(ev)
        if ev.kind == "step" and ev.message.startswith(phase) and ev.step == 5 and not asked:
            asked["t"] = time.perf_counter()
    after_stop = time.perf_counter() - asked["t"]
    assert seen[-1].kind == "cancelled" and f"stopped while {phase}; nothing saved yet" in seen[-1].message
    assert after_stop < 5, f"{after_stop:.1f} s from the stop to the end"
    # the phase's progress: every unit a step event with the phase's size and an ETA
    mine = [e for e in seen if e.kind == "step" and e.message.startswith(phase)]
    assert [e.step for e in mine] == [1, 2, 3, 4, 5] and len({e.steps for e in mine}) == 1
    assert mine[0].steps == (40000 if "images" in phase else 5000) and all(e.eta_s > 0 for e in mine)
    assert "(2 of 5)" in mine[0].message or "(4 of 5)" in mine[0].message
    assert not any(e.kind == "start" for e in seen)  # stopped before training: nothing written
    assert not (out / "checkpoints" / "last.pt").exists() and not (out / "config.json").exists()
    # starting again into the same folder runs to the end
    small = tiny(supervision="full", synthesis=("mosaic", "bezier"), batch_size=4, synthesis_count=4, filter_steps=2)
    events = list(train_segmenter(stage_one / "run", None, small, dataset=stage_one / "patches", out_dir=out))
    assert events[-1].kind == "done"


def test_raw_pseudo_mask_set_is_stage_ones_own_rule(stage_one):
    """The ``raw`` set: stage one's raw logits + the run's calibrated offsets, gated by each patch's
    labels, dense-CRF refined when pydensecrf is there - what `histo-wsss pseudo-masks` writes."""
    from napari_histo_wsss.core.data.datasets import list_images, parse_label_name, read_rgb
    from napari_histo_wsss.core.stage1.cams import logit_maps, raw_argmax_mask
    from napari_histo_wsss.core.stage1.refine import crf_available
    from napari_histo_wsss.core.stage1.train import calibrated_offsets, load_run

    run = stage_one / "run"
    out = stage_one / "seg-raw"
    events = list(train_segmenter(run, config=tiny(pseudo_sets=("raw", "last"), set_weights=(0.8, 0.2)),
                                  dataset=stage_one / "patches", out_dir=out))
    assert events[-1].kind == "done"
    assert "2 mask set(s) weighted [0.8, 0.2]" in next(e for e in events if e.kind == "start").message
    assert sorted(p.name for p in (out / "pseudo").iterdir() if p.is_dir()) == ["last", "raw"]
    model = load_run(run)[0]
    off = calibrated_offsets(run, "best", "prob-raw")
    refine = "crf" if crf_available() else "none"
    images = list_images(stage_one / "patches" / "train")
    assert len(list_images(out / "pseudo" / "raw")) == len(images)
    differs = 0
    for stem, path in list(images.items())[:6]:
        rgb, labels = read_rgb(path), parse_label_name(path)[1]
        expected = raw_argmax_mask(logit_maps(model, rgb), CLASSES, off, rgb=rgb, labels=labels, refine=refine)
        got = read_index_mask(out / "pseudo" / "raw" / f"{stem}.png", CLASSES)
        assert np.mean(got == expected) > 0.99  # batched forward vs one image: float noise at most
        assert set(np.unique(got)) <= set(np.flatnonzero(labels)) | {BG}  # only the patch's classes
    for stem in images:  # a different rule from the CAM sets (on the patches with two classes or more)
        differs += int(not np.array_equal(read_index_mask(out / "pseudo" / "raw" / f"{stem}.png", CLASSES),
                                          read_index_mask(out / "pseudo" / "last" / f"{stem}.png", CLASSES)))
    assert differs > 0
    with pytest.raises(Exception, match="pseudo"):
        SegConfig(pseudo_sets=("nope",)).validate()
