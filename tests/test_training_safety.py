"""Nothing lost or mixed up in either training stage (issue 12): resume only a run that exists,
on the dataset it was trained on; an honest train loss after a resume; destinations checked
before any training; a full disk while checkpointing is one line naming the checkpoint to
resume from; foreign checkpoints named as such, never with torch's advice to load them with
``weights_only=False``; a segmenter run finds its stage-one run from any folder; a patch that
cannot be read in a loader worker is one line naming it.

Tiny runs: the generated 48-px patches of test_train.py for stage one, the 64-px WSSS4LUAD
patches of test_train_seg.py (fully supervised, so no CAM pass) for stage two.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from test_train import make_dataset, tiny  # the generated dataset and tiny settings of stage one
from test_train_seg import stage_one  # noqa: F401 - the tiny real stage-one run (module fixture)

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.datasets import load_dataset
from napari_histo_wsss.core.errors import DatasetError, HistoWSSSError, TrainingError
from napari_histo_wsss.core.models import load_checkpoint
from napari_histo_wsss.core.models.backbones import read_state_dict
from napari_histo_wsss.core.stage1.train import train_classifier
from napari_histo_wsss.core.stage2.train import SegConfig, load_segmenter, train_segmenter


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safety") / "ds")


def seg_tiny(**kw) -> SegConfig:
    """Stage two on the ground truth of the make-patches dataset: no pseudo-mask pass needed."""
    base = dict(epochs=1, batch_size=2, max_steps_per_epoch=2, val_max_images=1, warmup_steps=0, seed=0,
                supervision="full", weights="none", device="cpu")
    base.update(kw)
    return SegConfig(**base)


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def fill_disk_at_nth_last_save(monkeypatch, n: int) -> None:
    """The n-th write of a ``last.pt`` goes to ``/dev/full``, where every write fails with ENOSPC
    as on a full disk: the temporary file of that write is a link to it (torch's real writer)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real = tempfile.mkstemp
    seen = {"last": 0}

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        fd, path = real(suffix=suffix, prefix=prefix, dir=dir, text=text)
        if str(prefix).startswith(".last.pt."):
            seen["last"] += 1
            if seen["last"] == n:
                os.unlink(path)
                os.symlink("/dev/full", path)  # fd stays on the unlinked file, /dev/full is never chmodded
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ---------------------------------------------------------------------------------------------
# resume: only a run, only on its dataset, with an honest train loss
# ---------------------------------------------------------------------------------------------
def test_resume_of_a_folder_without_a_run_is_an_error(data, tmp_path, capsys):
    typo = tmp_path / "runn"
    with pytest.raises(TrainingError, match=r"runn: no training run to resume there \(the folder does not exist\)"):
        list(train_classifier(data, typo, tiny(method="cam", epochs=1), resume=True))
    assert not typo.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="holds no config.json"):
        list(train_classifier(data, tmp_path / "empty", tiny(method="cam", epochs=1), resume=True))
    assert main(["train-cls", str(data), str(typo), "--resume", "--weights", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"histo-wsss train-cls: error: {typo}: no training run to resume there (the folder does not "
                           "exist); check the folder name, or start a new training run without resuming")
    assert not typo.exists()


def test_resume_on_another_dataset_is_refused(data, tmp_path):
    run = tmp_path / "run"
    list(train_classifier(data, run, tiny(method="cam", epochs=1)))
    record = json.loads((run / "dataset.json").read_text())
    metrics = (run / "metrics.jsonl").read_bytes()

    other = make_dataset(tmp_path / "other", n_train=12, seed=5)
    with pytest.raises(TrainingError) as e:
        list(train_classifier(other, run, tiny(method="cam", epochs=2), resume=True))
    text = one_line(e.value)
    assert text.startswith(f"{run}: cannot resume on a different dataset")
    assert "other training patches (12, the run has 24)" in text and f"trained on {data.resolve()}" in text
    assert record["fingerprint"]["train"] == 24

    relabelled = load_dataset(data)
    relabelled.train[0] = dataclasses.replace(relabelled.train[0], labels=np.array([1, 1, 1], np.uint8))
    with pytest.raises(TrainingError, match="the run's 24 training patches with other labels"):
        list(train_classifier(relabelled, run, tiny(method="cam", epochs=2), resume=True))
    assert json.loads((run / "dataset.json").read_text()) == record
    assert (run / "metrics.jsonl").read_bytes() == metrics

    # the same patches in another folder (moved) are the same dataset
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    events = list(train_classifier(moved, run, tiny(method="cam", epochs=2), resume=True))
    assert events[-1].kind == "done" and [r["epoch"] for r in rows(run)] == [1, 2]

    # a run made before fingerprints: accepted with a warning, and recorded from now on
    (run / "dataset.json").write_text(json.dumps({"path": str(moved), "layout": "wsss4luad"}))
    events = list(train_classifier(moved, run, tiny(method="cam", epochs=3), resume=True))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("does not record which patches it was trained on" in m for m in logs), logs
    assert json.loads((run / "dataset.json").read_text())["fingerprint"] == record["fingerprint"]


def test_train_loss_after_a_resume_at_an_epoch_end_is_that_epochs_own(data, tmp_path):
    cfg = tiny(method="cam", epochs=2)
    list(train_classifier(data, tmp_path / "whole", cfg))
    run = tmp_path / "halves"
    gen = train_classifier(data, run, cfg)
    for ev in gen:
        if ev.kind == "checkpoint":  # end of epoch 1, checkpoint written: stop here
            break
    gen.close()
    events = list(train_classifier(data, run, cfg, resume=True))
    steps = [e.loss for e in events if e.kind == "step"]
    assert len(steps) == 2
    whole, halves = rows(tmp_path / "whole"), rows(run)
    assert halves[1]["train_loss"] == pytest.approx(np.mean(steps), rel=1e-9)
    assert halves[1]["train_loss"] == pytest.approx(whole[1]["train_loss"], rel=1e-9)
    assert halves[0]["train_loss"] == pytest.approx(whole[0]["train_loss"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# destinations before training, full disk while checkpointing
# ---------------------------------------------------------------------------------------------
def test_unwritable_checkpoint_folder_fails_before_training(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint folder belongs")
    events = []
    with pytest.raises(HistoWSSSError) as e:
        for ev in train_classifier(data, run, tiny(method="cam", epochs=1)):
            events.append(ev)
    assert not events, [ev.kind for ev in events]  # nothing trained before the check
    assert "checkpoints is a file, not a folder" in one_line(e.value)
    assert str(run / "checkpoints") in str(e.value)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny(method="cam", epochs=2)
    fill_disk_at_nth_last_save(monkeypatch, 2)  # epoch 1 saves; epoch 2's last.pt meets a full disk
    with pytest.raises(TrainingError) as e:
        list(train_classifier(data, run, cfg))
    text = one_line(e.value)
    last = run / "checkpoints" / "last.pt"
    assert str(last) in text and "disk is full" in text
    assert f"previous checkpoint {last} (epoch 1)" in text and "resume" in text
    monkeypatch.undo()
    assert load_checkpoint(last)["extra"]["epoch"] == 1  # whole, and the previous one
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    events = list(train_classifier(data, run, cfg, resume=True))
    assert events[-1].kind == "done" and [r["epoch"] for r in rows(run)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# foreign checkpoints
# ---------------------------------------------------------------------------------------------
def test_foreign_checkpoints_are_named_and_never_suggest_weights_only_false(data, tmp_path):
    with_numpy = tmp_path / "numpy.pt"
    torch.save({"epoch": np.int64(3), "weights": np.zeros(3)}, with_numpy)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bare)
    for path in (with_numpy, module, bare):
        with pytest.raises(HistoWSSSError) as e:
            load_checkpoint(path)
        text = one_line(e.value)
        assert f"{path} is not a napari-histo-wsss checkpoint" in text and "weights_only" not in text
        assert "damaged" not in text
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bare.read_bytes()[:200])
    with pytest.raises(HistoWSSSError) as e:
        load_checkpoint(truncated)
    assert "damaged or truncated" in one_line(e.value) and "weights_only" not in str(e.value)
    # a weights file (--weights PATH) gets the same treatment
    with pytest.raises(HistoWSSSError) as e:
        read_state_dict(module)
    assert "torch.nn.modules.linear.Linear" in one_line(e.value) and "weights_only" not in str(e.value)

    # resuming a run whose last.pt is not ours
    run = tmp_path / "run"
    list(train_classifier(data, run, tiny(method="cam", epochs=1)))
    shutil.copy(with_numpy, run / "checkpoints" / "last.pt")
    with pytest.raises(HistoWSSSError) as e:
        list(train_classifier(data, run, tiny(method="cam", epochs=2), resume=True))
    assert "last.pt is not a napari-histo-wsss checkpoint" in one_line(e.value)
    assert "weights_only" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# loader workers
# ---------------------------------------------------------------------------------------------
def test_unreadable_patch_in_a_loader_worker_is_one_line(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", n_val=0)
    for p in (ds / "train").glob("*.png"):  # the header stays readable (sizes), the pixels do not
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DatasetError) as e:
        list(train_classifier(ds, tmp_path / "run", tiny(method="cam", epochs=1, num_workers=1)))
    text = one_line(e.value)
    assert text.startswith(str(ds / "train")) and ".png: cannot read image" in text
    assert main(["train-cls", str(ds), str(tmp_path / "run2"), "--weights", "none", "--device", "cpu", "--epochs", "1",
                 "--batch-size", "4", "--max-steps-per-epoch", "1", "--num-workers", "1"]) == 2
    err = capsys.readouterr().err  # (tqdm's progress bar writes there too)
    assert "Traceback" not in err and "DataLoader worker" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(f"histo-wsss train-cls: error: {ds / 'train'}")
    assert ".png: cannot read image" in lines[0]


def test_io_error_of_a_patch_reader_names_the_patch(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_val=0)
    spec = load_dataset(ds)

    def broken() -> np.ndarray:
        raise OSError(errno.EIO, "Input/output error")

    spec.train = [dataclasses.replace(s, reader=broken) for s in spec.train]  # a slide reader failing
    with pytest.raises(DatasetError) as e:
        list(train_classifier(spec, tmp_path / "run", tiny(method="cam", epochs=1)))
    text = one_line(e.value)
    assert text.startswith(str(ds / "train")) and text.endswith(".png: cannot read the training patch: "
                                                                  "[Errno 5] Input/output error")


# ---------------------------------------------------------------------------------------------
# stage two: the same
# ---------------------------------------------------------------------------------------------
def test_segmenter_resume_needs_a_run_and_its_dataset(stage_one, tmp_path):  # noqa: F811
    run, patches = stage_one / "run", stage_one / "patches"
    typo = tmp_path / "sgementer"
    with pytest.raises(TrainingError, match="sgementer: no segmenter run to resume there"):
        list(train_segmenter(run, config=seg_tiny(), dataset=patches, out_dir=typo, resume=True))
    assert not typo.exists()

    out = tmp_path / "seg"
    list(train_segmenter(run, config=seg_tiny(), dataset=patches, out_dir=out))
    assert json.loads((out / "dataset.json").read_text())["fingerprint"]["train"] == len(load_dataset(patches).train)
    fewer = tmp_path / "fewer"
    shutil.copytree(patches, fewer)
    sorted((fewer / "train").glob("*.png"))[0].unlink()
    events = []
    with pytest.raises(TrainingError) as e:
        for ev in train_segmenter(run, config=seg_tiny(epochs=2), dataset=fewer, out_dir=out, resume=True):
            events.append(ev)
    assert one_line(e.value).startswith(f"{out}: cannot resume on a different dataset")
    assert not events and len(rows(out)) == 1

    (out / "dataset.json").unlink()  # a segmenter run made before fingerprints
    events = list(train_segmenter(run, config=seg_tiny(epochs=2), dataset=patches, out_dir=out, resume=True))
    assert any("does not record which patches" in e.message for e in events if e.kind == "log")
    assert "fingerprint" in json.loads((out / "dataset.json").read_text())


def test_segmenter_train_loss_after_a_resume_inside_an_epoch(stage_one, tmp_path):  # noqa: F811
    out = tmp_path / "seg"
    cfg = seg_tiny(max_steps_per_epoch=3)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    first = list(train_segmenter(stage_one / "run", config=cfg, dataset=stage_one / "patches", out_dir=out,
                                 should_stop=stop))
    assert first[-1].kind == "cancelled"
    second = list(train_segmenter(stage_one / "run", config=cfg, dataset=stage_one / "patches", out_dir=out,
                                  resume=True))
    losses = [e.loss for e in first + second if e.kind == "step"]
    assert len(losses) == 3
    assert rows(out)[0]["train_loss"] == pytest.approx(np.mean(losses), rel=1e-9)


def test_segmenter_checks_its_folders_first_and_survives_a_full_disk(stage_one, tmp_path, monkeypatch):  # noqa: F811
    run, patches = stage_one / "run", stage_one / "patches"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoints").write_text("")
    events = []
    with pytest.raises(HistoWSSSError) as e:
        for ev in train_segmenter(run, config=seg_tiny(), dataset=patches, out_dir=bad):
            events.append(ev)
    assert "checkpoints is a file, not a folder" in one_line(e.value) and not events

    out = tmp_path / "seg"
    fill_disk_at_nth_last_save(monkeypatch, 2)
    with pytest.raises(TrainingError) as e:
        list(train_segmenter(run, config=seg_tiny(epochs=2), dataset=patches, out_dir=out))
    text = one_line(e.value)
    assert "disk is full" in text and f"previous checkpoint {out / 'checkpoints' / 'last.pt'} (epoch 1)" in text
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["extra"]["epoch"] == 1


def test_segmenter_run_finds_its_stage_one_run_from_another_folder(stage_one, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys):
    monkeypatch.chdir(stage_one)
    list(train_segmenter("run", config=seg_tiny(), dataset="patches", out_dir=tmp_path / "seg"))
    saved = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert saved["stage_one"] == str((stage_one / "run").resolve())
    assert saved["dataset"] == str((stage_one / "patches").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    images = stage_one / "patches" / "val" / "img"
    assert main(["predict", str(tmp_path / "seg"), str(images), str(tmp_path / "pred"), "--gate", "--device", "cpu",
                 "--tile", "128", "--overlap", "16"]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(list(images.glob("*.png")))

    # a segmenter run saved by an older version recorded the stage-one run as typed (relative)
    seg = stage_one / "run" / "segmenter-old"
    shutil.copytree(tmp_path / "seg", seg)
    for name in ("best.pt", "last.pt"):
        ck = torch.load(seg / "checkpoints" / name, weights_only=True)
        ck["meta"]["stage_one"] = "run"
        torch.save(ck, seg / "checkpoints" / name)
    _model, _classes, _cfg, meta = load_segmenter(seg)
    assert meta["stage_one"] == str((stage_one / "run").resolve())
    shutil.rmtree(seg)


# ---------------------------------------------------------------------------------------------
# a run folder is never its own input
# ---------------------------------------------------------------------------------------------
def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_segmenter_run_never_replaces_its_stage_one_run_or_its_dataset(stage_one, tmp_path, capsys):  # noqa: F811
    """``train-seg RUN --out RUN`` used to overwrite the stage-one run's best.pt, config.json and
    metrics.jsonl (exit 0), and ``--out DATASET`` wrote a run into the patches."""
    run, patches = tmp_path / "run", tmp_path / "patches"
    shutil.copytree(stage_one / "run", run, ignore=shutil.ignore_patterns("last.pt"))
    shutil.copytree(stage_one / "patches", patches)
    before = (_tree(run), _tree(patches))
    opts = ["--epochs", "1", "--batch-size", "2", "--max-steps-per-epoch", "1", "--weights", "none", "--device", "cpu"]
    cases = {run: "would replace the input", run / "checkpoints" / "seg": "lies inside the input",
             tmp_path: "contains the input", patches: "would replace the input",
             patches / "seg": "lies inside the input"}
    for out, says in cases.items():
        assert main(["train-seg", str(run), "--dataset", str(patches), "--out", str(out), *opts]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"histo-wsss train-seg: error: {out}: the segmenter run folder {says}"), err
    assert (_tree(run), _tree(patches)) == before and not (patches / "seg").exists()
    # the default place, RUN/segmenter, is the one folder inside the stage-one run a segmenter run may use
    events = list(train_segmenter(run, config=seg_tiny(), dataset=patches, out_dir=run / "segmenter"))
    assert events[-1].kind == "done" and (run / "segmenter" / "checkpoints" / "last.pt").is_file()
    assert {k: v for k, v in _tree(run).items() if not k.startswith("segmenter/")} == before[0]


def test_a_classifier_run_inside_its_dataset_is_refused(data, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    before = _tree(ds)
    for run, says in ((ds / "run", "lies inside the input"), (ds, "would replace the input"),
                      (tmp_path, "contains the input")):
        assert main(["train-cls", str(ds), str(run), "--epochs", "1", "--weights", "none", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"histo-wsss train-cls: error: {run}: the training run folder {says}"), err
    assert _tree(ds) == before and not (ds / "run").exists()


def test_a_run_name_too_long_is_one_line_before_any_training(stage_one, data, tmp_path, capsys):  # noqa: F811
    long = tmp_path / ("n" * 300)
    assert main(["train-cls", str(data), str(long), "--epochs", "1", "--weights", "none", "--device", "cpu"]) == 2
    assert main(["train-seg", str(stage_one / "run"), "--dataset", str(stage_one / "patches"), "--out", str(long),
                 "--epochs", "1", "--weights", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[0] for line in err] == ["histo-wsss train-cls", "histo-wsss train-seg"], err
    assert all("is too long (300 bytes" in line and "Traceback" not in line for line in err), err


# ---------------------------------------------------------------------------------------------
# the Segmenter panel: the stage-one run as the core reads it; what a cancelled prediction left
# ---------------------------------------------------------------------------------------------
@pytest.mark.gui
def test_segmenter_panel_reads_the_stage_one_run_as_the_core_does_and_says_what_a_cancel_kept(
        make_napari_viewer, tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from _widget_helpers import open_panels

    from napari_histo_wsss.core.progress import ProgressEvent

    work = tmp_path / "work"
    (work / "run" / "segmenter").mkdir(parents=True)
    (work / "run" / "config.json").write_text(json.dumps({"method": "cam"}))
    (work / "run" / "segmenter" / "config.json").write_text(json.dumps({"stage_one": "run"}))  # an older, relative entry
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _viewer, w = open_panels(make_napari_viewer)
    st = w["Segmenter"]
    assert st._stage_one_run(work / "run" / "segmenter") == (work / "run").resolve()  # was Path("run")

    kept = "stopped after 3 of 9 tiles; the previous /p/s.ome.zarr is kept"
    st.prediction_path = tmp_path / "s.ome.zarr"
    st.pred_task.last_event = ProgressEvent("cancelled", step=3, steps=9, message=kept)
    st._on_pred_finished("cancelled")
    assert st.status.text() == f"prediction cancelled: {kept}; nothing new is shown"  # was "its partial output ..."
