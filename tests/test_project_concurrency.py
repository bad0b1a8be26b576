"""Several writers on one project folder, and project files that try to reach outside it.

Two real processes save into one project at the same time (labels merge, nothing is lost); an
opening process never deletes another writer's in-flight temporary; a second window is detected
(stale session files are not); slide ids, mask names and run names cannot lead outside the folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _generated import tissue_image
from PIL import Image

from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import ProjectError

N = 30  # labels each writer saves (plus removals, a slide and a setting)


@pytest.fixture()
def project(tmp_path) -> tuple[Project, str]:
    for k, name in enumerate(["base.png", "extra0.png", "extra1.png"]):
        Image.fromarray(tissue_image(320, 240, k)).save(tmp_path / name)
    p = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=64, target_mpp=None)
    return p, p.add_slide(tmp_path / "base.png")


def _run(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], text=True, **kw)


# -- two processes saving at once ------------------------------------------------------------------
_WRITER = """
    import sys, time
    from pathlib import Path
    from napari_histo_wsss.core.data.project import Project

    root, k, n, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    p = Project.open(root)
    sid = next(iter(p.slides))
    Path(root, f"ready-{k}").touch()
    while not Path(root, "go").exists():  # both writers start together
        time.sleep(0.002)
    for i in range(n):
        p.set_patch_labels(sid, 100_000 * k + 64 * i, 0, 64, [1, k, i % 2], who=f"writer {k}")
        if i % 5 == 4:  # a removal of one of its own earlier rows
            p.remove_patch_labels(sid, 100_000 * k + 64 * (i - 2), 0, 64)
        if i == n // 2:  # manifest changes merge too
            p.add_slide(extra)
            p.update_settings(**({"patch_size": 96} if k == 0 else {"min_tissue": 0.3}))
    print("done", flush=True)
"""


def test_two_processes_saving_into_one_project_lose_nothing(project, tmp_path):
    p, sid = project
    procs = [_run(_WRITER, str(p.root), str(k), str(N), str(tmp_path / f"extra{k}.png"),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    deadline = time.monotonic() + 60
    while not all((p.root / f"ready-{k}").exists() for k in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (p.root / "go").touch()
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.strip() == "done", err[-3000:]
    q = Project.open(p.root)
    t = q.patch_labels(sid)
    removed = {100_000 * k + 64 * (i - 2) for k in range(2) for i in range(N) if i % 5 == 4}
    want = {100_000 * k + 64 * i for k in range(2) for i in range(N)} - removed
    assert sorted(t.x.tolist()) == sorted(want)  # every save of both writers is on disk
    assert len(t) == 2 * N - len(removed)
    for x, lab, who in zip(t.x.tolist(), t.labels.tolist(), t.who.tolist()):
        k, i = divmod(x, 100_000)
        assert lab == [1, k, (i // 64) % 2] and who == f"writer {k}"
    assert sorted(q.slides) == ["base", "extra0", "extra1"]
    assert q.settings["patch_size"] == 96 and q.settings["min_tissue"] == 0.3
    # the first process's object caught up with both writers at its next save
    p.set_patch_labels(sid, 5000, 0, 64, [0, 0, 1])
    assert len(p.patch_labels()) == len(t) + 1 and set(p.slides) == set(q.slides)


# -- an opening process and another writer's in-flight temporary -----------------------------------
_PAUSED_WRITER = """
    import sys
    from napari_histo_wsss.core.data import project as core_project
    from napari_histo_wsss.core.io.atomic import atomic_path

    def paused_write_text(path, text):  # core.io.atomic's write, stopped while its temporary exists
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            print(tmp, flush=True)
            sys.stdin.readline()

    core_project.write_text = paused_write_text
    p = core_project.Project.open(sys.argv[1])
    p.set_patch_labels(next(iter(p.slides)), 640, 0, 64, [1, 1, 0], who="slow writer")
    print("saved", flush=True)
"""


def test_open_never_deletes_another_writers_temporary(project):
    p, sid = project
    p.set_patch_labels(sid, 0, 0, 64, [1, 0, 0])
    proc = _run(_PAUSED_WRITER, str(p.root), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.name.startswith(".labels.csv.") and tmp.is_file(), proc.stderr.read()[-3000:]
        opened: list = []
        opener = threading.Thread(target=lambda: opened.append(Project.open(p.root)))
        opener.start()
        opener.join(0.5)
        assert tmp.is_file(), "Project.open deleted the temporary of a save in progress"
        assert opener.is_alive()  # it waits for the save to finish
        proc.stdin.write("go\n")
        proc.stdin.flush()
        opener.join(30)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "saved", err[-3000:]
    assert not tmp.exists()  # renamed into place
    (q,) = opened
    assert sorted(q.patch_labels().x.tolist()) == [0, 640]  # the opener read the finished save
    assert sorted(Project.open(p.root).patch_labels().x.tolist()) == [0, 640]


# -- a second window -------------------------------------------------------------------------------
_WINDOW = """
    import sys
    from napari_histo_wsss.core.data.project import Project

    p = Project.open(sys.argv[1], session=True)
    print("open", flush=True)
    sys.stdin.readline()
"""


def test_a_second_window_is_detected_and_a_stale_one_is_not(project, tmp_path):
    p, sid = project
    assert Project.open(p.root).open_elsewhere is None
    leftover = p.root / ".labels.csv.killed.tmp"  # a temporary of some writer killed long ago
    proc = _run(_WINDOW, str(p.root), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()[-3000:]
        leftover.write_text("half")
        q = Project.open(p.root)
        other = q.open_elsewhere
        assert other is not None and other.pid == proc.pid, other
        message = other.message(q.root)
        assert f"project {q.root} is open in another window (pid {proc.pid} on host " in message
        assert q.other_session() == other
        # while another window is open, open leaves temporaries alone (a writer outside the lock?)
        assert leftover.exists()
        q.set_patch_labels(sid, 0, 0, 64, [0, 1, 0])  # saves still work (and merge)
    finally:
        proc.kill()  # the window dies without unregistering: its lock is released, its pid gone
        proc.wait(30)
    assert len(list(p.root.glob(".session-*"))) == 1  # a stale session file
    r = Project.open(p.root)
    assert r.open_elsewhere is None and list(p.root.glob(".session-*")) == []
    assert not leftover.exists()  # no other window: leftovers of killed writers are removed

    # a session file nobody holds is stale even if its pid exists (pid 1) or it names another host
    for pid, host in ((1, "elsewhere"), (os.getpid() + 10_000_000, socket.gethostname()), (1, socket.gethostname())):
        (p.root / ".session-1-deadbeef").write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
        assert Project.open(p.root).open_elsewhere is None
        assert not (p.root / ".session-1-deadbeef").exists()
    # this process's own window does not count as another one
    mine = Project.open(p.root, session=True)
    assert len(list(p.root.glob(".session-*"))) == 1 and Project.open(p.root).open_elsewhere is None
    mine.end_session()
    assert list(p.root.glob(".session-*")) == []


@pytest.mark.gui
def test_project_panel_warns_when_the_project_is_open_elsewhere(make_napari_viewer, qtbot, project, monkeypatch):
    from napari_histo_wsss.cli.gui import open_gui
    from napari_histo_wsss.widgets import project as project_panel

    p, _ = project
    warnings: list[str] = []
    monkeypatch.setattr(project_panel, "show_warning", warnings.append)
    _viewer, w = open_gui(viewer=make_napari_viewer())
    panel = w["Project"]
    panel.open_project(p.root)  # nobody else: no warning
    assert warnings == [] and "Warning" not in panel.status.text()
    assert len(list(p.root.glob(".session-*"))) == 1  # the panel registered its window
    proc = _run(_WINDOW, str(p.root), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()[-3000:]
        panel.open_project(p.root)
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "open in another window" in warnings[0]
    assert f"pid {proc.pid}" in panel.status.text()
    # reopening ended the first registration of this window: one session file of ours remains
    assert len([f for f in p.root.glob(".session-*") if f.name.startswith(f".session-{os.getpid()}-")]) == 1


# -- nothing a project file says reaches outside the project ---------------------------------------
@pytest.mark.parametrize("bad_id", ["../../evil", "/ABSOLUTE", "a/b", "..", ".hidden", "ok\n", "a\\..\\b"])
def test_unsafe_slide_id_in_project_json_is_refused(project, tmp_path, bad_id):
    p, sid = project
    p.set_patch_labels(sid, 0, 0, 64, [1, 0, 0])
    bad = str(tmp_path / "outside" / "evil") if bad_id == "/ABSOLUTE" else bad_id
    manifest = json.loads(p.manifest_path.read_text())
    manifest["slides"][bad] = manifest["slides"][sid]  # e.g. a hand-edited or hostile project.json
    p.manifest_path.write_text(json.dumps(manifest))
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    with pytest.raises(ProjectError) as e:
        Project.open(p.root)
    message = str(e.value)
    assert message.startswith(f"{p.manifest_path}: slide id {bad!r} is not allowed")
    assert "\n" not in message  # one line (the id is shown escaped)
    # a process that opened the project before the edit refuses it at its next save
    with pytest.raises(ProjectError, match="is not allowed"):
        p.set_patch_labels(sid, 64, 0, 64, [1, 0, 0])
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize("name", ["a/b", "../escape", "/tmp/x", "..", ".tmp", ""])
def test_unsafe_mask_and_run_names_are_refused(project, tmp_path, name):
    p, sid = project
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    for call in (lambda: p.write_mask(sid, name, np.ones((4, 4), np.uint8), 1.0),
                 lambda: p.read_mask(sid, name), lambda: p.run_dir(name)):
        with pytest.raises(ProjectError, match=r"(mask|run) name .* is not allowed") as e:
            call()
        assert "\n" not in str(e.value)
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before
    assert p.run_dir("cls-segmix-20250101-000000") == p.root / "runs" / "cls-segmix-20250101-000000"


def test_symlinks_inside_the_project_do_not_lead_outside(project, tmp_path):
    p, sid = project
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".pseudo.tmp-0123abcd").mkdir()  # looks like a mask temporary
    (outside / "keep.txt").write_text("precious")
    (p.root / "masks" / sid).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ProjectError, match="outside the project folder"):
        p.write_mask(sid, "tissue", np.ones((4, 4), bool), 8.0)
    with pytest.raises(ProjectError, match="outside the project folder"):
        p.read_mask(sid, "tissue")
    Project.open(p.root)  # its clean-up does not follow the link
    assert sorted(f.name for f in outside.iterdir()) == [".pseudo.tmp-0123abcd", "keep.txt"]


def test_a_run_name_is_a_direct_child_of_runs_even_when_runs_links_elsewhere(project, tmp_path):
    p, _ = project
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (p.root / "runs").rmdir()
    (p.root / "runs").symlink_to(scratch, target_is_directory=True)  # checkpoints on a bigger disk
    assert p.run_dir("cls-cam-1").resolve() == scratch / "cls-cam-1"
    (scratch / "cls-planted").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ProjectError, match="outside the project folder"):
        p.run_dir("cls-planted")
