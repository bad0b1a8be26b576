"""The one training skeleton both stages share (core/engine.py, issue 11): a stop during
validation ends the run as ``cancelled`` in both stages, records no epoch without its score and
redoes the validation on resume (giving what the uninterrupted run gives); stage two loads its
batches in DataLoader workers (``num_workers``), the same run for any number of them; one
warm-up cap for both stages; the project's pseudo-mask crops pad with background, not class 0;
one best -> last checkpoint resolver for every loader (also many-slide prediction).

Tiny runs: the generated 48-px patches of test_train.py for stage one, the 64-px WSSS4LUAD
patches of test_train_seg.py (fully supervised: no CAM pass) for stage two.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_train import make_dataset, tiny  # the generated dataset and tiny settings of stage one
from test_train_seg import stage_one  # noqa: F401 - the tiny real stage-one run (module fixture)
from test_training_safety import rows, seg_tiny

from napari_histo_wsss.core.engine import lr_at, warmup_for
from napari_histo_wsss.core.errors import TrainingError
from napari_histo_wsss.core.models import load_checkpoint
from napari_histo_wsss.core.runs import checkpoint_file
from napari_histo_wsss.core.stage1.train import train_classifier
from napari_histo_wsss.core.stage2.train import SegDataset, train_segmenter

TIMING = {"data_s", "compute_s", "val_s", "patches_per_s", "seconds"}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("engine") / "ds")


def stop_after(n: int):
    """A ``should_stop`` that says stop from its ``n + 1``-th call on."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return stop


def untimed(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


def same_weights(a, b) -> bool:
    wa, wb = (load_checkpoint(p / "checkpoints" / "last.pt")["state_dict"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# a stop during validation, both stages
# ---------------------------------------------------------------------------------------------
def test_stage_one_stopped_during_validation_is_cancelled_and_validated_on_resume(data, tmp_path):
    cfg = tiny(method="cam", epochs=1)  # two steps: should_stop is asked twice, then per validation image
    whole = tmp_path / "whole"
    list(train_classifier(data, whole, cfg))
    run = tmp_path / "run"
    events = list(train_classifier(data, run, cfg, should_stop=stop_after(2)))
    assert sum(e.kind == "step" for e in events) == 2
    assert events[-1].kind == "cancelled" and "during validation of epoch 1" in events[-1].message
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints" / "best.pt").exists()
    extra = load_checkpoint(run / "checkpoints" / "last.pt")["extra"]
    assert (extra["epoch"], extra["batch"]) == (0, 2)
    resumed = list(train_classifier(data, run, cfg, resume=True))
    assert resumed[-1].kind == "done" and not any(e.kind == "step" for e in resumed)
    assert untimed(run) == untimed(whole) and rows(run)[0]["val_miou"] is not None
    assert same_weights(run, whole)


def test_stage_two_stopped_during_validation_is_cancelled_and_validated_on_resume(stage_one, tmp_path):  # noqa: F811
    run, patches = stage_one / "run", stage_one / "patches"
    cfg = seg_tiny(epochs=1)  # two steps: should_stop is asked twice, then per validation image
    whole = tmp_path / "whole"
    list(train_segmenter(run, config=cfg, dataset=patches, out_dir=whole))
    out = tmp_path / "seg"
    events = list(train_segmenter(run, config=cfg, dataset=patches, out_dir=out, should_stop=stop_after(2)))
    assert sum(e.kind == "step" for e in events) == 2
    # was: the epoch recorded with no score (val_miou None) and the run "done"
    assert events[-1].kind == "cancelled" and "during validation of epoch 1" in events[-1].message
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints" / "best.pt").exists()
    extra = load_checkpoint(out / "checkpoints" / "last.pt")["extra"]
    assert (extra["epoch"], extra["batch"]) == (0, 2)
    # the resume check is stage one's: the settings that differ, saved and now
    with pytest.raises(TrainingError, match=r"cannot resume with different settings \(lr: saved 0.0003 vs now 0.001\)"):
        list(train_segmenter(run, config=seg_tiny(epochs=1, lr=1e-3), dataset=patches, out_dir=out, resume=True))
    resumed = list(train_segmenter(run, config=cfg, dataset=patches, out_dir=out, resume=True))
    assert resumed[-1].kind == "done" and not any(e.kind == "step" for e in resumed)
    (row,) = untimed(out)
    assert row == untimed(whole)[0] and row["val_miou"] is not None
    assert same_weights(out, whole)


# ---------------------------------------------------------------------------------------------
# stage two: DataLoader workers
# ---------------------------------------------------------------------------------------------
def test_stage_two_loads_batches_in_worker_processes_alike_for_any_number(stage_one, tmp_path, monkeypatch):  # noqa: F811
    run, patches = stage_one / "run", stage_one / "patches"
    seen = tmp_path / "seen"
    seen.mkdir()
    real_getitem = SegDataset.__getitem__

    def getitem(self, i):  # records which process made the item (workers are forked: they see this patch)
        info = torch.utils.data.get_worker_info()
        (seen / f"{os.getpid()}-{info.id if info is not None else 'main'}").touch()
        return real_getitem(self, i)

    monkeypatch.setattr(SegDataset, "__getitem__", getitem)
    cfg = seg_tiny(epochs=1, max_steps_per_epoch=2, batch_size=2, augment=True)
    events = list(train_segmenter(run, config=dict_replace(cfg, num_workers=2), dataset=patches, out_dir=tmp_path / "w2"))
    assert events[-1].kind == "done"
    made_by = {p.name.split("-")[1] for p in seen.iterdir()}
    assert made_by == {"0", "1"}, made_by  # both workers, never the training process
    assert len({p.name.split("-")[0] for p in seen.iterdir()} - {str(os.getpid())}) == 2
    list(train_segmenter(run, config=dict_replace(cfg, num_workers=1), dataset=patches, out_dir=tmp_path / "w1"))
    assert untimed(tmp_path / "w1") == untimed(tmp_path / "w2")
    assert same_weights(tmp_path / "w1", tmp_path / "w2")  # augmentation seeded per item, not per worker


def dict_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------
# one warm-up rule
# ---------------------------------------------------------------------------------------------
def test_warmup_is_capped_at_a_quarter_of_the_run_in_both_stages(data, stage_one, tmp_path):  # noqa: F811
    assert warmup_for(20, 2) == 0 and warmup_for(20, 100) == 20 and warmup_for(20, 40) == 10
    # two steps with warmup_steps 20: no warm-up, so the second step runs at the cosine rate
    expected = lr_at(1, 2, warmup_for(20, 2))
    assert expected == pytest.approx(0.5)
    cfg1 = tiny(method="cam", epochs=1, warmup_steps=20)
    list(train_classifier(data, tmp_path / "s1", cfg1))
    assert rows(tmp_path / "s1")[0]["lr"] == pytest.approx(cfg1.lr * expected)
    cfg2 = seg_tiny(epochs=1, warmup_steps=20)
    list(train_segmenter(stage_one / "run", config=cfg2, dataset=stage_one / "patches", out_dir=tmp_path / "s2"))
    assert rows(tmp_path / "s2")[0]["lr"] == pytest.approx(cfg2.lr * expected)  # was cfg.lr * 2 / 21


# ---------------------------------------------------------------------------------------------
# project crops, checkpoint resolver
# ---------------------------------------------------------------------------------------------
def test_project_crops_reaching_past_the_masks_are_padded_with_background(cmu_svs, tmp_path):
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.data.datasets import load_dataset
    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.stage2.train import _project_samples

    classes = get_preset("wsss4luad")
    bg = classes.background_index
    project = Project.create(tmp_path / "p.wsss", classes, patch_size=64, target_mpp=2.0)
    sid = project.add_slide(cmu_svs)
    project.set_patch_labels(sid, [1024], [1024], 256, np.array([[0, 1, 1]]))  # x, y 1024..1280
    width = 1152 // 16  # the masks end at x = 1152: the patch's right half lies past them
    project.write_mask(sid, "pseudo", np.full((200, width), 1, np.uint8), 16.0)  # stroma
    project.write_mask(sid, "corrected", np.full((200, width), 2, np.uint8), 16.0)  # corrected to normal ...
    project.write_mask(sid, "corrected_flag", np.ones((200, width), bool), 16.0)  # ... wherever there is a mask
    # (grid patches wholly inside the corrected area join the set with exact labels; this one does not)
    (sample,) = [s for s in _project_samples(load_dataset(tmp_path / "p.wsss")) if s.name == f"{sid}_1024_1024_256"]
    _, targets, weight, _ = SegDataset([sample], classes, 64, corrected_weight=3.0)[0]
    assert (targets[0, :, :32] == 2).all() and (weight[:, :32] == 3.0).all()
    assert (targets[0, :, 32:] == bg).all() and (weight[:, 32:] == 1.0).all()  # was class 0 (tumour)


def test_one_checkpoint_resolver_for_every_loader(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    assert checkpoint_file(run, "best") == run / "checkpoints" / "last.pt"  # no validated epoch yet
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    assert checkpoint_file(run, "best") == run / "checkpoints" / "best.pt"
    assert checkpoint_file(run, "last") == run / "checkpoints" / "last.pt"
    assert checkpoint_file(run, str(tmp_path / "x.pt")) == tmp_path / "x.pt"
    assert checkpoint_file(run, "best", subrun="segmenter") == run / "checkpoints" / "best.pt"
    (run / "segmenter" / "checkpoints").mkdir(parents=True)  # a stage-one run holding its segmenter run
    assert checkpoint_file(run, "best", subrun="segmenter") == run / "segmenter" / "checkpoints" / "last.pt"


def test_many_slide_prediction_from_a_stage_one_run_uses_its_segmenter(tmp_path):
    from _generated import segmenter_run, write_slides

    from napari_histo_wsss.core.io.export import open_label_pyramid
    from napari_histo_wsss.core.stage2.batch import PredictSettings, predict_many

    run = tmp_path / "run"  # a stage-one run (its own checkpoints) holding its segmenter run
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"the classifier")
    (run / "config.json").write_text(json.dumps({"method": "cam"}))
    seg = segmenter_run(run / "segmenter")
    slides = write_slides(tmp_path / "slides")
    settings = PredictSettings(tile=128, overlap=16, batch_size=4, device="cpu", torch_threads=1)
    (res,) = predict_many(run, [slides["c"]], tmp_path / "out", settings, workers=1, processes=False, retries=0)
    assert res.status == "done", res.error
    # the output records the model that made it: the segmenter's checkpoint (was the classifier's)
    assert open_label_pyramid(res.out).meta["model"] == str((seg / "checkpoints" / "best.pt").resolve())
