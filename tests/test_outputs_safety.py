"""No command destroys an input or an existing output (issue 12, "Nothing lost").

Every writing subcommand refuses an OUT that is (or holds, or lies inside) its input even with
``--overwrite``, refuses an existing OUT without ``--overwrite``, replaces one only once the new
output is complete, reports an unwritable destination as one line (exit 2, no traceback) and
creates files with the user's umask. Tiny generated images and untrained models keep it fast.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _generated import segmenter_run, tissue_image
from PIL import Image

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.io import atomic
from napari_histo_wsss.core.io import export as export_mod
from napari_histo_wsss.core.io.atomic import write_text
from napari_histo_wsss.core.io.export import export_ome_zarr, open_label_pyramid
from napari_histo_wsss.core.models import CAMClassifier, save_model
from napari_histo_wsss.core.stage1.cams import save_pseudo_mask
from napari_histo_wsss.core.stage1.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BUNDLED_SLIDE = REPO / "src" / "napari_histo_wsss" / "data" / "CMU-1-Small-Region.svs"
CLASSES = get_preset("wsss4luad")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def one_line_error(capsys, command: str) -> str:
    """The error line of a failed command: exactly one, last, and no traceback (progress bars
    of work that had started may come before it)."""
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("histo-wsss")]
    assert len(ours) == 1 and err[-1] == ours[0] and ours[0].startswith(f"histo-wsss {command}: error:"), err
    assert not any("Traceback" in line for line in err), err
    return ours[0]


@pytest.fixture(scope="module")
def stuff(tmp_path_factory) -> dict[str, Path]:
    """Two small H&E-like images with ground-truth masks, a tiny image slide, an untrained
    segmenter run and an untrained stage-one classifier run."""
    root = tmp_path_factory.mktemp("safety")
    imgs, gt = root / "imgs", root / "gt"
    imgs.mkdir()
    gt.mkdir()
    for i in range(2):
        Image.fromarray(tissue_image(64, 48, seed=i)).save(imgs / f"im{i}.png")
        mask = np.full((48, 64), CLASSES.background_index, np.uint8)
        mask[10:30, 10:40] = i % CLASSES.num_classes
        save_pseudo_mask(gt / f"im{i}.png", mask, CLASSES)
    slide = root / "slide.png"
    Image.fromarray(tissue_image(200, 150, seed=5)).save(slide)
    seg = segmenter_run(root / "seg")
    cls_run = root / "cls"
    torch.manual_seed(0)
    model = CAMClassifier(CLASSES.num_classes, "efficientnet-lite0", "none", 32)
    save_model(cls_run / "checkpoints" / "best.pt", model, {"classes": CLASSES})
    (cls_run / "config.json").write_text(json.dumps(TrainConfig(weights="none", output_stride=32, cam_mode="last").to_dict()))
    (cls_run / "classes.json").write_text(json.dumps(CLASSES.to_dict()))
    return {"imgs": imgs, "gt": gt, "slide": slide, "seg": seg, "cls": cls_run}


def full_disk(block):
    """Stands in for ``core.io.export.index_to_stored``: the disk fills while chunks are written."""
    raise OSError(errno.ENOSPC, "No space left on device")


def _predict(stuff, src, out, *extra) -> int:
    return main(["predict", str(stuff["seg"]), str(src), str(out), "--device", "cpu", "--tile", "96", "--overlap", "16",
                 *map(str, extra)])


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_predict_into_its_input_folder_is_refused(stuff, tmp_path, capsys, flags):
    x = tmp_path / "x"
    shutil.copytree(stuff["imgs"], x)
    before = tree(x)
    assert _predict(stuff, x, x, *flags) == 2
    assert "input" in one_line_error(capsys, "predict")
    assert tree(x) == before  # the H&E images are still the H&E images
    # nor inside it, nor around it
    assert _predict(stuff, x, x / "pred", *flags) == 2 and not (x / "pred").exists()
    assert _predict(stuff, x, tmp_path, "--overwrite") == 2
    assert tree(x) == before


def test_predict_into_an_existing_folder_needs_overwrite_and_then_replaces_it(stuff, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"an earlier result")
    assert _predict(stuff, stuff["imgs"], out) == 2
    assert "pass --overwrite" in one_line_error(capsys, "predict")
    assert tree(out) == {"old.png": hashlib.sha1(b"an earlier result").hexdigest()}
    assert _predict(stuff, stuff["imgs"], out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png"]  # replaced as a whole
    assert hidden_leftovers(tmp_path) == []
    # an empty folder made beforehand is fine without --overwrite; the run folder never is OUT
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict(stuff, stuff["imgs"], empty) == 0 and len(list(empty.glob("*.png"))) == 2
    assert _predict(stuff, stuff["imgs"], stuff["seg"], "--overwrite") == 2
    assert (stuff["seg"] / "checkpoints" / "best.pt").is_file()


def test_failing_folder_overwrite_keeps_the_old_output(stuff, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(stuff["imgs"], src)
    out = tmp_path / "out"
    assert _predict(stuff, src, out) == 0
    shutil.copy(stuff["gt"] / "im0.png", out / "im0.png")  # an old result unlike what a rerun gives
    (out / "notes.txt").write_text("kept with the old result")
    before = tree(out)
    (src / "im1.png").write_bytes((src / "im1.png").read_bytes()[:60])  # truncated: fails mid-way
    assert _predict(stuff, src, out, "--overwrite") == 2
    capsys.readouterr()
    assert tree(out) == before and hidden_leftovers(tmp_path) == []


def test_predict_slide_into_existing_zarr_and_a_failed_overwrite(stuff, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.ome.zarr"
    assert _predict(stuff, stuff["slide"], out, "--no-tissue") == 0
    before = open_label_pyramid(out).read_index()
    files = tree(out)
    assert _predict(stuff, stuff["slide"], out, "--no-tissue") == 2
    assert "pass --overwrite" in one_line_error(capsys, "predict")
    assert _predict(stuff, stuff["slide"], stuff["slide"], "--overwrite") == 2  # never the slide itself
    capsys.readouterr()

    monkeypatch.setattr(export_mod, "index_to_stored", full_disk)
    assert _predict(stuff, stuff["slide"], out, "--no-tissue", "--overwrite") == 2
    assert "disk is full" in one_line_error(capsys, "predict")
    assert tree(out) == files and hidden_leftovers(tmp_path) == []
    pyr = open_label_pyramid(out)  # still complete, still the same labels
    assert pyr.complete and np.array_equal(pyr.read_index(), before)
    monkeypatch.undo()
    assert _predict(stuff, stuff["slide"], out, "--no-tissue", "--overwrite") == 0
    assert open_label_pyramid(out).complete and hidden_leftovers(tmp_path) == []


def test_a_stopped_overwrite_keeps_the_old_output(stuff, tmp_path):
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.stage2.infer import predict_folder, predict_slide

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.randn(x.shape[0], CLASSES.num_classes + 1, *x.shape[-2:]), dim=1)

    out = tmp_path / "p.ome.zarr"
    assert _predict(stuff, stuff["slide"], out, "--no-tissue") == 0
    files = tree(out)
    with open_slide(stuff["slide"]) as slide:
        kw = dict(tile=96, overlap=16, batch_size=1, classes=CLASSES, tissue=False, overwrite=True)
        events = list(predict_slide(slide, noise, out, should_stop=iter([False, True]).__next__, **kw))
        assert events[-1].kind == "cancelled" and "is kept" in events[-1].message
        gen = predict_slide(slide, noise, out, **kw)
        assert next(gen).kind == "start"
        gen.close()  # closed at once (a GUI worker cancelled before the first tile)
    assert tree(out) == files and open_label_pyramid(out).complete and hidden_leftovers(tmp_path) == []
    # a stopped folder prediction publishes nothing: no half-filled folder to be scored later
    events = list(predict_folder(stuff["imgs"], tmp_path / "pred", noise, CLASSES, tile=96, overlap=16,
                                 should_stop=iter([False, True]).__next__))
    assert events[-1].kind == "cancelled" and not (tmp_path / "pred").exists()
    assert hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# pseudo-masks
# ---------------------------------------------------------------------------------------------
def test_pseudo_masks_into_the_ground_truth_folder_is_refused(stuff, tmp_path, capsys):
    gt = tmp_path / "gt"
    shutil.copytree(stuff["gt"], gt)
    before = tree(gt)
    base = ["pseudo-masks", str(stuff["cls"]), str(stuff["imgs"]), str(gt), "--device", "cpu"]
    assert main(base) == 2
    assert "pass --overwrite" in one_line_error(capsys, "pseudo-masks")
    assert main(base + ["--labels", str(gt), "--overwrite"]) == 2  # the labels' folder: never, even with --overwrite
    assert "input" in one_line_error(capsys, "pseudo-masks")
    assert main(["pseudo-masks", str(stuff["cls"]), str(gt), str(gt), "--overwrite", "--device", "cpu"]) == 2
    capsys.readouterr()
    assert tree(gt) == before
    # a new folder works, with the CAMs inside it
    out = tmp_path / "pm"
    assert main(["pseudo-masks", str(stuff["cls"]), str(stuff["imgs"]), str(out), "--labels", str(gt), "--cams",
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png"]
    assert sorted(p.name for p in (out / "cams").iterdir()) == ["im0.npy", "im1.npy"]
    assert hidden_leftovers(tmp_path) == [] and tree(gt) == before


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def _labels() -> np.ndarray:
    lab = np.full((300, 260), CLASSES.background_index, np.uint8)
    lab[20:200, 30:120] = 0
    lab[150:280, 100:250] = 1
    lab[40:90, 160:230] = 2
    return lab


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_ome_zarr_onto_itself_is_refused_and_the_source_stays(tmp_path, capsys, flags):
    y = tmp_path / "y.ome.zarr"
    export_ome_zarr(_labels(), y, CLASSES)
    files = tree(y)
    assert main(["export", str(y), str(y), *flags]) == 2
    assert "input" in one_line_error(capsys, "export")
    assert tree(y) == files
    pyr = open_label_pyramid(y)
    assert pyr.complete and np.array_equal(pyr.read_index(), _labels())


def test_failing_ome_zarr_overwrite_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    y = tmp_path / "y.ome.zarr"
    export_ome_zarr(_labels(), y, CLASSES)
    files = tree(y)
    good = _labels()
    good[:10] = 1
    save_pseudo_mask(tmp_path / "good.png", good, CLASSES)
    monkeypatch.setattr(export_mod, "index_to_stored", full_disk)
    assert main(["export", str(tmp_path / "good.png"), str(y), "--overwrite"]) == 2
    assert "disk is full" in one_line_error(capsys, "export")
    assert tree(y) == files and np.array_equal(open_label_pyramid(y).read_index(), _labels())
    assert hidden_leftovers(tmp_path) == []
    monkeypatch.undo()  # with room on the disk the replacement goes through, complete
    assert main(["export", str(tmp_path / "good.png"), str(y), "--overwrite"]) == 0
    assert np.array_equal(open_label_pyramid(y).read_index(), good) and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".geojson", ".png", ".tif", ".csv"])
def test_export_onto_an_existing_file_needs_overwrite(tmp_path, capsys, suffix):
    if suffix == ".csv":
        from napari_histo_wsss.core.data.project import Project

        Project.create(tmp_path / "p.wsss", CLASSES)
        src = tmp_path / "p.wsss"
    else:
        src = tmp_path / "mask.png"
        save_pseudo_mask(src, _labels(), CLASSES)
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"precious")
    assert main(["export", str(src), str(out)]) == 2
    assert "pass --overwrite" in one_line_error(capsys, "export")
    assert out.read_bytes() == b"precious"
    assert main(["export", str(src), str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"precious" and out.stat().st_size > 0
    assert hidden_leftovers(tmp_path) == []
    if suffix != ".csv":  # and never onto the mask it reads
        before = src.read_bytes()
        assert main(["export", str(src), str(src), "--overwrite", "--format", suffix[1:].replace("tif", "tiff")]) == 2
        assert "input" in one_line_error(capsys, "export") and src.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# overview, make-patches
# ---------------------------------------------------------------------------------------------
def test_overview_onto_its_input_is_refused(stuff, tmp_path, capsys):
    z = tmp_path / "z.png"
    shutil.copy(stuff["slide"], z)
    before = z.read_bytes()
    for flags in ([], ["--overwrite"]):
        assert main(["overview", str(z), str(z), *flags]) == 2
        assert "input" in one_line_error(capsys, "overview")
    link = tmp_path / "link.png"
    link.symlink_to(z)
    assert main(["overview", str(z), str(link), "--overwrite"]) == 2  # through a symlink too
    capsys.readouterr()
    assert z.read_bytes() == before and Image.open(z).size == (200, 150)


def test_overview_onto_an_existing_png_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"old overview")
    args = ["overview", str(BUNDLED_SLIDE), str(out), "--max-size", "256"]
    assert main(args) == 2 and out.read_bytes() == b"old overview"
    assert "pass --overwrite" in one_line_error(capsys, "overview")
    assert main(args + ["--overwrite"]) == 0
    assert max(Image.open(out).size) == 256


def test_make_patches_refuses_out_inside_its_inputs(stuff, tmp_path, capsys):
    imgs, gt = tmp_path / "imgs", tmp_path / "gt"
    shutil.copytree(stuff["imgs"], imgs)
    shutil.copytree(stuff["gt"], gt)
    before = (tree(imgs), tree(gt))
    for out in (imgs / "patches", gt / "patches", imgs):
        assert main(["make-patches", str(imgs), str(gt), str(out), "--patch-size", "32"]) == 2
        one_line_error(capsys, "make-patches")
    assert (tree(imgs), tree(gt)) == before and hidden_leftovers(imgs) == []


# ---------------------------------------------------------------------------------------------
# unwritable destinations: one line, exit 2, in every command
# ---------------------------------------------------------------------------------------------
def test_a_file_in_the_way_is_one_line_in_every_command(stuff, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    mask = tmp_path / "mask.png"
    save_pseudo_mask(mask, _labels(), CLASSES)
    commands = {
        "predict": ["predict", str(stuff["seg"]), str(stuff["imgs"]), str(blocker / "out"), "--device", "cpu"],
        "pseudo-masks": ["pseudo-masks", str(stuff["cls"]), str(stuff["imgs"]), str(blocker / "pm"), "--device", "cpu"],
        "export": ["export", str(mask), str(blocker / "x.geojson")],
        "overview": ["overview", str(stuff["slide"]), str(blocker / "o.png")],
        "make-patches": ["make-patches", str(stuff["imgs"]), str(stuff["gt"]), str(blocker / "p"), "--patch-size", "32"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert "is a file, not a folder" in one_line_error(capsys, name), name
    assert blocker.read_text() == "a file where a folder is expected"
    with pytest.raises(HistoWSSSError, match="is a file, not a folder"):
        write_text(blocker / "sub" / "a.txt", "x")
    with pytest.raises(HistoWSSSError, match="is a file, not a folder"):
        atomic.ensure_dir(blocker / "sub")


def test_an_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """Tests run as root (permissions do not stop root), so the refusal of the file system is
    injected where the temporary file is created."""
    mask = tmp_path / "mask.png"
    save_pseudo_mask(mask, _labels(), CLASSES)
    real_mkstemp = tempfile.mkstemp

    def refused(*args, **kwargs):
        if Path(kwargs.get("dir", "")).resolve() == (tmp_path / "ro").resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(HistoWSSSError, match="Read-only file system"):
        write_text(tmp_path / "ro" / "a.txt", "x")
    with pytest.raises(HistoWSSSError, match=r"ro: the folder is not writable: Read-only file system"):
        atomic.ensure_dir(tmp_path / "ro")
    assert main(["export", str(mask), str(tmp_path / "ro" / "x.tif")]) == 2
    assert "Read-only file system" in one_line_error(capsys, "export")
    assert list((tmp_path / "ro").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the umask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_bits,dir_bits", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_follow_the_umask(stuff, tmp_path, umask, file_bits, dir_bits):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == file_bits
        mask = tmp_path / "mask.png"
        save_pseudo_mask(mask, _labels(), CLASSES)
        assert main(["export", str(mask), str(tmp_path / "x.geojson")]) == 0
        assert main(["export", str(mask), str(tmp_path / "x.ome.zarr")]) == 0
        assert _predict(stuff, stuff["imgs"], tmp_path / "pred") == 0
        assert _predict(stuff, stuff["imgs"], tmp_path / "pred", "--overwrite") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.geojson").stat().st_mode) == file_bits
    assert stat.S_IMODE((tmp_path / "pred").stat().st_mode) == dir_bits
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "pred").iterdir()} == {file_bits}
    zarr_files = [p for p in (tmp_path / "x.ome.zarr").rglob("*") if p.is_file()]
    assert zarr_files and {stat.S_IMODE(p.stat().st_mode) for p in zarr_files} == {file_bits}


# ---------------------------------------------------------------------------------------------
# the helpers themselves
# ---------------------------------------------------------------------------------------------
def test_check_output_rules(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(b"a")
    for out in (data / "img", data / "img" / "sub", data, tmp_path / "link"):
        if out.name == "link":
            out.symlink_to(data / "img")
        with pytest.raises(HistoWSSSError, match="input"):
            atomic.check_output(out, inputs=[data / "img"], overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    assert atomic.check_output(run / "pred", protect=[run]) == run / "pred"  # inside a protected folder: fine
    with pytest.raises(HistoWSSSError, match="would replace"):
        atomic.check_output(run, protect=[run], overwrite=True)
    with pytest.raises(HistoWSSSError, match="contains"):
        atomic.check_output(tmp_path, protect=[run], overwrite=True)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(HistoWSSSError, match="is a file, not a folder"):
        atomic.check_output(tmp_path / "f.png", overwrite=True, folder=True)
    with pytest.raises(HistoWSSSError, match="is a folder"):
        atomic.check_output(data, overwrite=True, folder=False)


def test_replace_dir_swaps_on_success_and_keeps_the_old_on_failure(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.replace_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert tree(final) == {"old.txt": hashlib.sha1(b"old").hexdigest()} and hidden_leftovers(tmp_path) == []
    with atomic.replace_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # the old output stays readable until the end
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and hidden_leftovers(tmp_path) == []


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert atomic.current_umask() == 0o027 and atomic.file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # still what the test set
    finally:
        os.umask(old)


def test_the_current_folder_is_never_replaced(stuff, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "script.sh").write_text("echo mine")
    monkeypatch.chdir(work)
    assert _predict(stuff, stuff["imgs"], ".", "--overwrite") == 2
    assert "would replace" in one_line_error(capsys, "predict")
    assert _predict(stuff, stuff["imgs"], tmp_path, "--overwrite") == 2
    capsys.readouterr()
    assert Path.cwd() == work and (work / "script.sh").read_text() == "echo mine"


# ---------------------------------------------------------------------------------------------
# names the file system cannot hold; plain options out of range
# ---------------------------------------------------------------------------------------------
LONG = "n" * 300  # longer than NAME_MAX (255 bytes)


def test_a_name_too_long_is_one_line_in_every_writing_command(stuff, tmp_path, capsys, monkeypatch):
    """ENAMETOOLONG used to escape as a traceback from the first stat of the destination."""
    mask = tmp_path / "mask.png"
    save_pseudo_mask(mask, _labels(), CLASSES)
    monkeypatch.chdir(tmp_path)
    commands = {
        "predict": ["predict", str(stuff["seg"]), str(stuff["imgs"]), LONG, "--device", "cpu"],
        "pseudo-masks": ["pseudo-masks", str(stuff["cls"]), str(stuff["imgs"]), LONG, "--device", "cpu"],
        "export": ["export", str(mask), LONG + ".geojson"],
        "overview": ["overview", str(stuff["slide"]), f"{LONG}/o.png"],
        "make-patches": ["make-patches", str(stuff["imgs"]), str(stuff["gt"]), LONG, "--patch-size", "32"],
    }
    before = tree(tmp_path)
    for name, argv in commands.items():
        assert main(argv) == 2, name
        line = one_line_error(capsys, name)
        assert "is too long (3" in line and "bytes; the file system allows 255)" in line and LONG in line, line
    assert tree(tmp_path) == before


def test_check_names_and_the_writers_refuse_overlong_names_and_paths(tmp_path):
    with pytest.raises(HistoWSSSError, match=r"the name 'nnnnnnnnnnnn\.\.\.nnnnnnnn' is too long \(300 bytes"):
        atomic.check_names(tmp_path / LONG / "a.txt")
    with pytest.raises(HistoWSSSError, match="is too long"):
        write_text(tmp_path / LONG, "x")
    with pytest.raises(HistoWSSSError, match="is too long"):
        atomic.ensure_dir(tmp_path / LONG)
    deep = tmp_path.joinpath(*["d" * 200] * 25)  # every name fine, the path over PATH_MAX (4096)
    with pytest.raises(HistoWSSSError, match=r"the path is too long \(\d+ bytes; the file system allows 4095\)"):
        atomic.check_output(deep)
    assert atomic.check_names(tmp_path / ("n" * 255)) == tmp_path / ("n" * 255)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,value,says", [
    ("--downsample", "0", "must be > 0"), ("--downsample", "nan", "must be a finite number"),
    ("--max-side", "0", "must be >= 1"), ("--min-area", "nan", "must be a finite number"),
    ("--min-area", "-1", "must be >= 0"), ("--tolerance", "inf", "must be a finite number"),
])
def test_export_options_out_of_range_are_refused_before_any_work(tmp_path, capsys, option, value, says):
    mask = tmp_path / "mask.png"
    save_pseudo_mask(mask, _labels(), CLASSES)
    with pytest.raises(SystemExit) as e:  # argparse's one line: these used to write a GeoJSON, exit 0
        main(["export", str(mask), str(tmp_path / "out.geojson"), option, value])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith(("usage:", " "))]
    assert err == [f"histo-wsss export: error: argument {option}: {says}, got '{value}'"], err
    assert not (tmp_path / "out.geojson").exists()


def test_cli_commands_that_write_into_a_project_warn_when_it_is_open_elsewhere(tmp_path, capsys):
    """The GUI warned about a second window; the CLI said nothing."""
    import subprocess

    from test_project_concurrency import _WINDOW, _run

    from napari_histo_wsss.core.data.project import Project

    Image.fromarray(tissue_image(320, 240, 0)).save(tmp_path / "s.png")
    p = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=64, target_mpp=None)
    p.add_slide(tmp_path / "s.png")
    argv = ["cams", str(p.root), "--slide", "nope"]  # opens the project, then refuses the slide id
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"histo-wsss cams: error: {p.manifest_path}: unknown slide id 'nope'; the project has s"]
    proc = _run(_WINDOW, str(p.root), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()[-3000:]
        assert main(argv) == 2
    finally:
        proc.stdin.close()
        proc.wait(30)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("histo-wsss cams: error:"), err
    assert err[0].startswith(f"histo-wsss: warning: project {p.root} is open in another window (pid {proc.pid} on host")
