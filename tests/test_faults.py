"""Fault tests (docs/reliability.md): kill -9 in the middle of writes, corrupt inputs, fuzzed
dataset file names, NaN/Inf images. Each case ends in a consistent state or a clear error of
the project's own types naming the file, never a half-written result or a stray exception."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _generated import segmenter_run, tissue_image
from fault_child import labels_for
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import (
    MaskedDataset,
    WeakLabelDataset,
    load_dataset,
    parse_label_name,
    read_rgb,
    to_tensor,
)
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import DatasetError, SlideError
from napari_histo_wsss.core.io.atomic import remove_temporaries
from napari_histo_wsss.core.io.export import ExportError, open_label_pyramid
from napari_histo_wsss.core.models import load_model
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.stage2.batch import PredictSettings, SlideJob, predict_one

CHILD = Path(__file__).with_name("fault_child.py")
CLASSES = get_preset("wsss4luad")


# ---------------------------------------------------------------------------------------------
# kill -9 during writes
# ---------------------------------------------------------------------------------------------
def _kill_during(mode: str, folder: Path, acks: int, rng: random.Random, timeout: float = 120.0) -> list[str]:
    """Start the child writer, wait for ``acks`` acknowledged writes, let it run into the next
    write for a random moment, SIGKILL it. Returns every acknowledged line, the last one being
    the last write the child finished before it was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(CHILD), mode, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            if line.startswith("ack"):
                lines.append(line.strip())
            if len(lines) >= acks:
                break
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # acks the child printed after the ones read above are still in the pipe: count them too,
        # so the last line is the last write that finished before the kill
        lines += [line.strip() for line in proc.stdout if line.startswith("ack")]
    finally:
        watchdog.cancel()
    assert len(lines) >= acks, f"{mode} child stopped early:\n{proc.stderr.read()[-4000:]}"
    assert proc.returncode == -signal.SIGKILL
    return lines


def test_kill_during_project_saves_leaves_a_consistent_project(tmp_path):
    rng = random.Random(0)
    Image.fromarray(tissue_image(640, 480, 5)).save(tmp_path / "slide.png")
    for round_ in range(2):  # the second round reopens the killed project and keeps writing
        acked = int(_kill_during("project", tmp_path, 8 + 4 * round_, rng)[-1].split()[1]) + 1
        proj = Project.open(tmp_path / "project")
        (sid,) = proj.slides
        table = proj.patch_labels()
        n = len(table)
        assert n in (acked, acked + 1), (n, acked)  # nothing lost but the write in flight
        np.testing.assert_array_equal(table.x, np.arange(n) * 64)
        np.testing.assert_array_equal(table.labels, [labels_for(j, CLASSES.num_classes) for j in range(n)])
        mask, ds = proj.read_mask(sid, "pseudo")
        c1 = CLASSES.num_classes + 1
        assert ds == 8.0 and mask.shape == (96, 128) and np.unique(mask).size == 1
        assert int(mask[0, 0]) in ((n - 1) % c1, (n - 2) % c1)  # the mask of the last or previous step
        assert proj.mask_names(sid) == ["pseudo"]
        leftovers = [p.name for p in (tmp_path / "project").rglob(".*") if p.name != ".lock"]  # the lock file stays
        assert leftovers == [], leftovers  # temporaries of the killed write are cleaned on open


def test_kill_during_checkpoint_writing_keeps_the_previous_checkpoint(tmp_path):
    acked = int(_kill_during("checkpoint", tmp_path, 4, random.Random(1))[-1].split()[1])
    model, meta = load_model(tmp_path / "checkpoints" / "last.pt")
    assert meta["step"] in (acked, acked + 1)
    assert torch.all(model.head.weight == float(meta["step"]))  # weights and meta from the same save
    # A killed save can leave its hidden temporary behind; nothing reads it as a checkpoint.
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "last.pt" in names and all(n == "last.pt" or n.startswith(".last.pt.") for n in names)
    # a run starting (or resuming) in that folder removes such temporaries, and only them
    (tmp_path / "checkpoints" / ".last.pt.abc123.pt").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoints" / "notes.tmp").write_text("not ours")
    removed = remove_temporaries(tmp_path / "checkpoints", ["last.pt", "best.pt"])
    assert ".last.pt.abc123.pt" in [p.name for p in removed]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "notes.tmp"]
    assert load_model(tmp_path / "checkpoints" / "last.pt")[1]["step"] == meta["step"]


def test_kill_during_zarr_prediction_leaves_it_marked_incomplete_and_a_rerun_completes_it(tmp_path):
    Image.fromarray(tissue_image(900, 700, 6)).save(tmp_path / "slide.png")
    segmenter_run(tmp_path / "run")
    lines = _kill_during("predict", tmp_path, 4, random.Random(2))
    assert not any(line.endswith("done") for line in lines)
    out = tmp_path / "out" / "slide.ome.zarr"
    with pytest.raises(ExportError, match="incomplete output"):
        open_label_pyramid(out)
    assert open_label_pyramid(out, require_complete=False).meta["complete"] is False

    settings = PredictSettings(tile=96, overlap=16, batch_size=2, downsample=1.0, device="cpu", torch_threads=1)
    job = SlideJob(tmp_path / "slide.png", out)
    res = predict_one(tmp_path / "run", job, settings)
    assert res.status == "done" and res.tiles > 0
    pyr = open_label_pyramid(out)
    assert pyr.complete and pyr.read_index(0).shape == (700, 900)
    assert predict_one(tmp_path / "run", job, settings).status == "skipped"


# ---------------------------------------------------------------------------------------------
# corrupt inputs
# ---------------------------------------------------------------------------------------------
def _read_everything(path: Path) -> None:
    """Open a slide and decode every pixel of level 0 (blocks of 1024 px) and a thumbnail."""
    with open_slide(path) as slide:
        w, h = slide.dimensions
        for y in range(0, h, 1024):
            for x in range(0, w, 1024):
                slide.read_region((x, y), 0, (min(1024, w - x), min(1024, h - y)))
        slide.thumbnail(256)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.9])
@pytest.mark.parametrize("fixture", ["cmu_svs", "cmu_pyramid"])
def test_truncated_slides_raise_slide_errors_naming_the_file(fixture, fraction, request, tmp_path):
    source: Path = request.getfixturevalue(fixture)
    broken = tmp_path / f"broken{''.join(source.suffixes)}"
    data = source.read_bytes()
    broken.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError) as err:
        _read_everything(broken)
    assert str(broken) in str(err.value)


def test_zero_byte_png_in_slides_and_datasets(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty.png: file is empty"):
        open_slide(empty)
    with pytest.raises(DatasetError, match="empty.png: cannot read image"):
        read_rgb(empty)
    train = tmp_path / "ds" / "1.training"
    train.mkdir(parents=True)
    Image.fromarray(tissue_image(64, 64, 1)).save(train / "ok-[1, 0, 0].png")
    (train / "zero-[0, 1, 0].png").write_bytes(b"")
    try:
        spec = load_dataset(tmp_path / "ds")
    except DatasetError as e:
        assert "zero-[0, 1, 0].png" in str(e)
        return
    ds = WeakLabelDataset(spec.train, size=64)
    bad = [i for i, s in enumerate(spec.train) if s.name.startswith("zero")]
    with pytest.raises(DatasetError, match=r"zero-\[0, 1, 0\]\.png"):
        ds[bad[0]]


def _mask_dataset(root: Path, masks: dict[str, Image.Image]) -> Path:
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    for name, mask in masks.items():
        Image.fromarray(tissue_image(*mask.size, 2)).save(root / "img" / f"{name}.png")
        mask.save(root / "mask" / f"{name}.png")
    return root


def test_wrong_mode_masks(tmp_path):
    colours = np.array([c.color for c in CLASSES.classes], dtype=np.uint8)
    idx = np.arange(48 * 32).reshape(48, 32) % CLASSES.num_classes
    rgba_ok = np.concatenate([colours[idx], np.full((48, 32, 1), 255, np.uint8)], axis=2)
    rgba_bad = rgba_ok.copy()
    rgba_bad[0, 0, :3] = (1, 2, 3)
    good = {"rgba_class_colours": Image.fromarray(rgba_ok, "RGBA"),
            "sixteen_bit_ok": Image.fromarray(idx.astype(np.uint16))}
    bad = {"rgba_unknown_colour": (Image.fromarray(rgba_bad, "RGBA"), r"colour \(1, 2, 3\) is not a class colour"),
           "sixteen_bit_300": (Image.fromarray(np.full((48, 32), 300, np.uint16)), "not class indices"),
           "grey_index_9": (Image.fromarray(np.full((48, 32), 9, np.uint8), "L"), r"index\(es\) \[9\] outside"),
           "two_channel_la": (Image.fromarray(np.dstack([idx, idx]).astype(np.uint8), "LA"), None)}
    spec = load_dataset(_mask_dataset(tmp_path / "ds", {**good, **{k: v[0] for k, v in bad.items()}}), CLASSES)
    samples = {s.name: s for s in spec.val}
    for name in good:
        np.testing.assert_array_equal(samples[name].mask(), idx)
    np.testing.assert_array_equal(samples["two_channel_la"].mask(), idx)  # the alpha is not a class
    data = MaskedDataset([samples[n] for n in bad if bad[n][1]], size=32)
    for i, (name, (_, message)) in enumerate((n, v) for n, v in bad.items() if v[1]):
        with pytest.raises(DatasetError, match=message) as err:
            samples[name].mask()
        assert f"{name}.png" in str(err.value)
        with pytest.raises(DatasetError, match=f"{name}.png"):
            data[i]


_ODD = list("[]()[] ,,-_.01 abc") + ["é", "中", "😀", "\t", "\u00a0", "\u2003", "\u200b", "［", "］", "١", "½", "%", "'", '"', "#"]


def _fuzz_names(rng: random.Random, n: int) -> list[str]:
    names = set()
    while len(names) < n:
        stem = "".join(rng.choice(_ODD) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.5:  # a valid or nearly valid label group after the odd stem
            sep = rng.choice([", ", ",", " ", "", "  ", ",\u00a0", " ,"])
            body = sep.join(rng.choice("01") for _ in range(rng.choice([3, 3, 2, 4])))
            if rng.random() < 0.3:  # a stray character inside the group
                at = rng.randint(0, len(body))
                body = body[:at] + rng.choice(_ODD) + body[at:]
            stem += rng.choice(["-", "", " "]) + "[" + body + "]"
        name = f"{stem}.png"
        if not name.startswith(".") and len(name.encode()) < 200:
            names.add(name)
    return sorted(names)


def test_fuzzed_dataset_file_names_parse_or_raise_dataset_errors_naming_the_file(tmp_path):
    rng = random.Random(1234)
    names = _fuzz_names(rng, 400)
    parsed = 0
    for name in names:
        try:
            style, labels = parse_label_name(tmp_path / name)
        except DatasetError as e:
            assert name in str(e)
            continue
        parsed += 1
        assert style in ("wsss4luad", "luad-histoseg", "bcss-wsss")
        assert labels.dtype == np.uint8 and labels.size >= 1 and set(labels.tolist()) <= {0, 1}
    assert 0 < parsed < len(names)  # the fuzz reaches both outcomes

    img = tissue_image(32, 32, 3)
    valid = [n for n in names if _parses_to(n, CLASSES.num_classes)]
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(12):  # whole training folders of fuzzed names through load_dataset
        train = tmp_path / f"ds{trial}" / "1.training"
        train.mkdir(parents=True)
        chosen = rng.sample(valid if trial % 2 else names, 8)
        for name in chosen:
            Image.fromarray(img).save(train / name, format="PNG")
        try:
            spec = load_dataset(train.parent, CLASSES)
        except DatasetError as e:
            assert any(name in str(e) for name in chosen) or str(train.parent) in str(e), str(e)
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        assert sorted(s.path.name for s in spec.train) == sorted(chosen)
        for s in spec.train:
            assert s.labels.shape == (CLASSES.num_classes,)
    assert outcomes["loaded"] and outcomes["refused"], outcomes


def _parses_to(name: str, num_classes: int) -> bool:
    try:
        return parse_label_name(name)[1].size == num_classes
    except DatasetError:
        return False


def test_nan_and_inf_images_never_reach_a_model_as_non_finite_input(tmp_path):
    a = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    a[5:10, 5:10] = np.nan
    a[20:30, 20:30] = np.inf
    a[0, 0] = -np.inf
    rgb_float = tmp_path / "float_rgb.tif"
    tifffile.imwrite(rgb_float, a, photometric="rgb")
    with pytest.raises(SlideError, match="float_rgb.tif: TIFF pixel type float32 is not supported"):
        open_slide(rgb_float)
    with pytest.raises(DatasetError, match="float_rgb.tif"):
        read_rgb(rgb_float)
    with pytest.raises(ValueError, match="expects a uint8"):
        to_tensor(a)
    t = to_tensor(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert torch.isfinite(t).all()
    # A float RGB patch in a training folder stops training input with the file's name.
    train = tmp_path / "ds" / "1.training"
    train.mkdir(parents=True)
    shutil.copy(rgb_float, train / "nan-[1, 0, 0].tif")
    Image.fromarray(tissue_image(64, 64, 1)).save(train / "ok-[0, 1, 0].png")
    spec = load_dataset(tmp_path / "ds")
    ds = WeakLabelDataset(spec.train, size=64)
    i = [s.name for s in spec.train].index("nan-[1, 0, 0]")
    with pytest.raises(DatasetError, match=r"nan-\[1, 0, 0\]\.tif"):
        ds[i]


def test_float_greyscale_image_is_refused_not_silently_clipped(tmp_path):
    a = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    a[5:10, 5:10] = np.nan
    grey_float = tmp_path / "float_grey.tif"
    tifffile.imwrite(grey_float, a)
    with pytest.raises(SlideError):
        open_slide(grey_float)  # the slide reader refuses float TIFFs
    with pytest.raises(DatasetError, match="float_grey.tif"):
        read_rgb(grey_float)  # and so does the patch reader, instead of clipping to uint8
