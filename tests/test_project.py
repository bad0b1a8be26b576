"""Project folder: round trip, damaged/unknown files, kill -9 during saves, read-only folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from napari_histo_wsss.core.data.classes import ClassTable, get_preset
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import ClassTableError, ProjectError


@pytest.fixture()
def project(tmp_path, cmu_svs) -> tuple[Project, str]:
    p = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=128, target_mpp=2.0, min_tissue=0.25)
    return p, p.add_slide(cmu_svs)


def _dot_files(root: Path) -> list[Path]:
    """Hidden leftovers (temporaries); the project's lock file is not one."""
    return [p for p in root.rglob(".*") if p != root / ".lock"]


# -- round trip ------------------------------------------------------------------------------------
def test_create_and_reopen_restore_everything(tmp_path, cmu_svs, cmu_pyramid):
    classes = ClassTable.custom(["tumour", "stroma", "necrosis", "lymphocytes"], white_background=False)
    root = tmp_path / "case.wsss"
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    p = Project.create(root, classes, patch_size=224, target_mpp=1.0, min_tissue=0.5)
    svs_id = p.add_slide(cmu_svs)
    tif_id = p.add_slide(cmu_pyramid)
    assert p.add_slide(cmu_svs) == svs_id  # same file, same id
    assert svs_id != tif_id and set(p.slides) == {svs_id, tif_id}

    p.set_patch_labels(svs_id, [0, 448, 896], [0, 0, 448], 448, np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]), who="dr a")
    p.set_patch_labels(tif_id, 100, 200, 448, [0, 1, 0, 0], who="dr   b")
    p.set_patch_labels(svs_id, 448, 0, 448, [0, 1, 0, 1], who="dr c")  # upsert keeps the position
    p.remove_patch_labels(svs_id, 896, 448, 448)
    p.remove_patch_labels(svs_id, 5, 5, 448)  # absent: ignored
    tissue = np.zeros((93, 70), bool)
    tissue[10:80, 5:60] = True
    cam = np.random.default_rng(0).random((4, 40, 30)).astype(np.float16)
    pseudo = np.random.default_rng(1).integers(0, 5, (120, 90)).astype(np.uint8)
    p.write_mask(svs_id, "tissue", tissue, 32.0)
    p.write_mask(svs_id, "cam", cam, 74.0)
    p.write_mask(svs_id, "pseudo", pseudo, 24.5)
    p.write_mask(svs_id, "pseudo", pseudo[::-1].copy(), 24.5)  # replaced, not duplicated
    after = datetime.now(timezone.utc) + timedelta(seconds=2)

    q = Project.open(root)
    assert q.classes == classes and q.classes.white_background is False
    assert q.settings == {"patch_size": 224, "target_mpp": 1.0, "min_tissue": 0.5}
    assert q.slides == p.slides
    rec = q.slides[svs_id]
    assert (rec.width, rec.height, rec.format) == (2220, 2967, "aperio")
    assert rec.mpp == pytest.approx(0.499) and Path(rec.path) == Path(cmu_svs).resolve()
    assert q.slide_path(tif_id) == Path(cmu_pyramid).resolve()

    t = q.patch_labels()
    assert list(t.slide_id) == [svs_id, svs_id, tif_id]
    assert t.x.tolist() == [0, 448, 100] and t.y.tolist() == [0, 0, 200] and t.size0.tolist() == [448] * 3
    assert t.labels.dtype == np.uint8
    assert t.labels.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0]]
    assert list(t.who) == ["dr a", "dr c", "dr b"]
    for stamp in t.updated:
        assert before <= datetime.fromisoformat(stamp) <= after
    one = q.patch_labels(tif_id)
    assert len(one) == 1 and one.labels.tolist() == [[0, 1, 0, 0]]
    assert len(q.patch_labels("nothing-here")) == 0 and q.patch_labels("nothing-here").labels.shape == (0, 4)

    assert q.mask_names(svs_id) == ["cam", "pseudo", "tissue"] and q.mask_names(tif_id) == []
    got, ds = q.read_mask(svs_id, "tissue")
    assert got.dtype == bool and np.array_equal(got, tissue) and ds == 32.0
    got, ds = q.read_mask(svs_id, "cam")
    assert got.dtype == np.float16 and np.array_equal(got, cam) and ds == 74.0
    got, ds = q.read_mask(svs_id, "pseudo")
    assert np.array_equal(got, pseudo[::-1]) and ds == 24.5
    assert q.read_mask(tif_id, "pseudo") is None
    assert q.runs_dir == root.resolve() / "runs" and q.runs_dir.is_dir()
    assert _dot_files(root) == []


def test_open_accepts_the_manifest_path_and_presets_by_name(project):
    p, sid = project
    q = Project.open(p.manifest_path)
    assert q.root == p.root and q.classes == get_preset("wsss4luad") and list(q.slides) == [sid]


def test_label_validation(project):
    p, sid = project
    with pytest.raises(ClassTableError, match="3"):
        p.set_patch_labels(sid, 0, 0, 256, [1, 0])
    with pytest.raises(ClassTableError, match="0/1"):
        p.set_patch_labels(sid, 0, 0, 256, [1, 2, 0])
    with pytest.raises(ClassTableError, match="shape"):
        p.set_patch_labels(sid, [0, 256], [0, 0], 256, np.ones((3, 3), np.uint8))
    with pytest.raises(ProjectError, match="unknown slide id 'nope'"):
        p.set_patch_labels("nope", 0, 0, 256, [1, 0, 0])
    assert len(Project.open(p.root).patch_labels()) == 0  # nothing half-applied


def test_concurrent_label_saves_from_threads(project):
    p, sid = project
    def worker(k: int) -> None:
        for i in range(15):
            p.set_patch_labels(sid, 1000 * k + i, 0, 256, [k % 2, 1, 0])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = Project.open(p.root).patch_labels()
    assert sorted(t.x.tolist()) == sorted(1000 * k + i for k in range(4) for i in range(15))
    assert t.labels[:, 0].tolist() == [(x // 1000) % 2 for x in t.x.tolist()]


def test_create_refuses_existing_or_non_empty_folders(tmp_path):
    Project.create(tmp_path / "a", "wsss4luad")
    with pytest.raises(ProjectError, match="already holds a project"):
        Project.create(tmp_path / "a", "wsss4luad")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(ProjectError, match="not empty"):
        Project.create(tmp_path / "b", "wsss4luad")
    with pytest.raises(ProjectError, match="patch_size"):
        Project.create(tmp_path / "c", "wsss4luad", patch_size=2)
    assert not (tmp_path / "c").exists()


# -- damaged and unknown files ----------------------------------------------------------------------
def test_missing_project(tmp_path):
    with pytest.raises(ProjectError, match="not a napari-histo-wsss project"):
        Project.open(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m[: len(m) // 2], "not valid JSON"),
        (lambda m: "", "not valid JSON"),
        (lambda m: "[1, 2]", "not a JSON object"),
        (lambda m: m.replace('"schema_version": 1', '"schema_version": 99'), "newer napari-histo-wsss .schema 99 > 1"),
        (lambda m: m.replace('"schema_version": 1', '"schema_version": "one"'), "schema_version 'one'"),
        (lambda m: m.replace('"settings"', '"settingz"'), "'settings'"),
        (lambda m: m.replace('"patch_size": 128', '"patch_size": "big"'), "bad or missing setting"),
        (lambda m: m.replace('"color": [\n          0,', '"color": [\n          999,'), "damaged class table"),
    ],
)
def test_damaged_or_newer_manifest_names_the_file(project, damage, message):
    p, _ = project
    text = p.manifest_path.read_text()
    damaged = damage(text)
    assert damaged != text
    p.manifest_path.write_text(damaged)
    with pytest.raises(ProjectError, match=message) as e:
        Project.open(p.root)
    assert str(p.manifest_path) in str(e.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.replace("tumor,stroma", "stroma,tumor"), "another order"),
        (lambda t: t.replace("normal,updated", "necrosis,updated"), r"unknown class column\(s\) \['necrosis'\]"),
        (lambda t: t + "case,1,2\n", "line 3: damaged row"),
        (lambda t: t + "other-slide,0,0,256,1,0,0,now,\n", "slide id 'other-slide' is not in project.json"),
        (lambda t: t + "{sid},0,0,256,1,7,0,now,\n", "labels 0/1"),
        (lambda t: t + "{sid},zero,0,256,1,0,0,now,\n", "line 3: damaged row"),
        (lambda t: "garbage\n", "header"),
    ],
)
def test_damaged_label_file_names_the_file(project, damage, message):
    p, sid = project
    p.set_patch_labels(sid, 0, 0, 256, [1, 0, 1])
    p.labels_path.write_text(damage(p.labels_path.read_text()).replace("{sid}", sid))
    with pytest.raises(ProjectError, match=message) as e:
        Project.open(p.root)
    assert str(p.labels_path) in str(e.value)


def test_missing_label_file(project):
    p, _ = project
    p.labels_path.unlink()
    with pytest.raises(ProjectError, match="labels.csv: the patch label file is missing"):
        Project.open(p.root)


def test_masks_from_another_class_table_or_incomplete_are_refused(tmp_path, project, cmu_svs):
    p, sid = project
    p.write_mask(sid, "pseudo", np.zeros((8, 8), np.uint8), 4.0)
    other = Project.create(tmp_path / "other", "luad-histoseg")
    assert other.add_slide(cmu_svs) == sid
    shutil.copytree(p.root / "masks" / sid, other.root / "masks" / sid)
    with pytest.raises(ProjectError, match="different class table"):
        other.read_mask(sid, "pseudo")
    meta = p.root / "masks" / sid / "pseudo" / "zarr.json"
    meta.write_text(meta.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(ProjectError, match="not completely written") as e:
        p.read_mask(sid, "pseudo")
    assert str(p.root / "masks" / sid / "pseudo") in str(e.value)
    with pytest.raises(ProjectError, match="mask name"):
        p.write_mask(sid, "../escape", np.zeros((4, 4), np.uint8), 1.0)


def test_open_repairs_a_mask_swap_cut_short(project):
    """A kill between the two renames of write_mask leaves only the hidden previous version."""
    p, sid = project
    old = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4
    p.write_mask(sid, "pseudo", old, 8.0)
    folder = p.root / "masks" / sid
    os.rename(folder / "pseudo", folder / ".pseudo.old-0123abcd")
    (folder / ".pseudo.tmp-89abcdef").mkdir()  # a new version whose write never finished
    (folder / ".pseudo.tmp-89abcdef" / "zarr.json").write_text("{")
    (p.root / ".labels.csv.x1y2.tmp").write_text("half")
    q = Project.open(p.root)
    got, ds = q.read_mask(sid, "pseudo")
    assert np.array_equal(got, old) and ds == 8.0
    assert _dot_files(q.root) == []


# -- kill -9 in the middle of saving ---------------------------------------------------------------
_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from napari_histo_wsss.core.data.project import Project

    p = Project.open(sys.argv[1])
    sid = next(iter(p.slides))
    i = len(p.patch_labels())
    while True:
        p.set_patch_labels(sid, 100 * i, 0, 256, [i % 2, (i // 2) % 2, 1], who=f"w{i}")
        p.update_settings(patch_size=100 + i)
        p.write_mask(sid, "cam", np.full((3, 200, 150), i, np.float16), 8.0)
        print(i, flush=True)
        i += 1
    """
)


def test_kill_during_saves_leaves_old_or_new_state(project, tmp_path):
    p, sid = project
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = np.random.default_rng(7)
    last_ack = -1
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(p.root)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # the child is saving in a loop from now on
        assert first.strip().isdigit(), f"saver did not start: {first!r}"
        time.sleep(float(rng.uniform(0.02, 0.4)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acks = [int(v) for v in (first + out).split()]
        last_ack = max(acks)

        q = Project.open(p.root)  # also removes the temporaries of the killed save
        t = q.patch_labels()
        n = len(t)
        # every acknowledged save survived; at most the step in flight is missing or complete
        assert n - 1 in (last_ack, last_ack + 1), (round_, n, last_ack)
        assert t.x.tolist() == [100 * i for i in range(n)]
        assert t.labels.tolist() == [[i % 2, (i // 2) % 2, 1] for i in range(n)]
        assert list(t.who) == [f"w{i}" for i in range(n)]
        settings_step = q.settings["patch_size"] - 100
        cam, _ = q.read_mask(sid, "cam")
        assert np.unique(cam).size == 1, "a mask mixes two saves"
        mask_step = int(cam.flat[0])
        # saves run labels -> settings -> mask: the reopened state is a prefix of that order
        assert mask_step <= settings_step <= n - 1 and n - 1 - mask_step <= 1, (n - 1, settings_step, mask_step)
        assert _dot_files(q.root) == []
    assert last_ack >= 4  # the rounds really saved (and were killed) many times


# -- read-only folders ---------------------------------------------------------------------------
_READ_ONLY_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from napari_histo_wsss.core.errors import ProjectError
    from napari_histo_wsss.core.data.project import Project

    root = sys.argv[1]
    out = {}
    p = Project.open(root)
    sid = next(iter(p.slides))
    out["read_only"] = p.read_only
    out["labels"] = p.patch_labels().labels.tolist()
    out["mask"] = p.read_mask(sid, "pseudo")[0].tolist()
    for name, call in [
        ("labels_error", lambda: p.set_patch_labels(sid, 0, 0, 256, [0, 0, 1])),
        ("mask_error", lambda: p.write_mask(sid, "pseudo", np.zeros((2, 2), np.uint8), 1.0)),
        ("settings_error", lambda: p.update_settings(min_tissue=0.9)),
        ("create_error", lambda: Project.create(root + "/inner", "wsss4luad")),
    ]:
        try:
            call()
            out[name] = None
        except ProjectError as e:
            out[name] = str(e)
    print(json.dumps(out))
    """
)


def _run_on_read_only_folder(folder: Path, script: Path) -> dict:
    """Run ``script folder`` with ``folder`` read-only: by permissions for a normal user; root
    ignores permissions, so there a private read-only bind mount is used instead."""
    cmd = [sys.executable, str(script), str(folder)]
    if os.geteuid() != 0:
        for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
                d.chmod(0o755)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare(1): cannot make a read-only folder")
        shell = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        res = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", str(folder), *cmd], capture_output=True, text=True)
        if res.returncode != 0 and "mount" in res.stderr:
            pytest.skip(f"running as root and a read-only bind mount is not allowed here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_read_only_folder_opens_for_reading_and_refuses_changes(project, tmp_path):
    p, sid = project
    p.set_patch_labels(sid, 0, 0, 256, [1, 1, 0])
    p.write_mask(sid, "pseudo", np.eye(3, dtype=np.uint8), 4.0)
    script = tmp_path / "check.py"
    script.write_text(_READ_ONLY_CHECK)
    out = _run_on_read_only_folder(p.root, script)
    assert out["read_only"] is True
    assert out["labels"] == [[1, 1, 0]] and out["mask"] == np.eye(3).tolist()
    for key in ("labels_error", "mask_error", "settings_error"):
        assert out[key] is not None and "read-only" in out[key] and str(p.root) in out[key], out
    assert out["create_error"] is not None and str(p.root / "inner") in out["create_error"], out
    q = Project.open(p.root)  # untouched
    assert q.patch_labels().labels.tolist() == [[1, 1, 0]] and q.settings["min_tissue"] == 0.25


# -- tissue and patch grid with the project's settings ---------------------------------------------
def test_grid_uses_the_project_settings_and_caches(project):
    from napari_histo_wsss.core.slides.grid import make_grid
    from napari_histo_wsss.core.slides.tissue import detect_tissue

    p, sid = project  # patch_size 128 at 2 um/px, min_tissue 0.25; the slide is 0.499 um/px
    grid = p.grid(sid)
    assert grid is p.grid(sid)  # cached
    with p.open_slide(sid) as slide:
        want = make_grid(slide, detect_tissue(slide), patch_size=128, target_mpp=2.0, min_tissue=0.25)
    assert grid.patch_size == 128 and grid.size0 == want.size0 == round(128 * 2.0 / 0.499)
    assert np.array_equal(grid.x, want.x) and np.array_equal(grid.y, want.y)
    assert len(grid) > 0 and (grid.tissue_fraction >= 0.25).all()
    assert p.mask_names(sid) == ["tissue"]  # tissue detected once and stored

    q = Project.open(p.root)
    stored, ds = q.read_mask(sid, "tissue")
    assert stored.dtype == bool and 0.05 < stored.mean() < 0.95
    assert np.array_equal(q.grid(sid).x, grid.x)  # the stored tissue mask gives the same grid
    q.update_settings(patch_size=64, min_tissue=0.9)
    finer = q.grid(sid)
    assert finer.size0 == round(64 * 2.0 / 0.499) and (finer.tissue_fraction >= 0.9).all()
    assert Project.open(p.root).settings["patch_size"] == 64
    with pytest.raises(ProjectError, match="unknown setting"):
        q.update_settings(colour="blue")
