"""Training in the GUI is cancelled and resumed through the real background worker (checkpoint
kept, metrics continue), and ``histo-wsss gui PROJECT`` opens a project with its slide.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets_resume.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
from _widget_helpers import WAIT_MS, label_some_patches, make_project_with_grid, open_panels, tiny_training_form  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_histo_wsss.cli import main  # noqa: E402
from napari_histo_wsss.cli.gui import open_gui  # noqa: E402
from napari_histo_wsss.core.data.project import Project  # noqa: E402


def push(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def test_cancel_and_resume_training(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    viewer, w = open_panels(make_napari_viewer)
    project = make_project_with_grid(qtbot, w, tmp_path / "case.wsss", cmu_svs)
    label_some_patches(qtbot, viewer, w)
    tr = w["Training"]
    tiny_training_form(tr, epochs=3)

    def cancel_on_first_step(ev):
        if getattr(ev, "kind", "") == "step" and not tr.task.cancel_requested:
            push(qtbot, tr.cancel_btn)

    tr.task.event.connect(cancel_on_first_step)
    run_dir = tr.start()
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    tr.task.event.disconnect(cancel_on_first_step)
    assert "cancelled" in tr.status.text() and "Resume" in tr.status.text()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    assert len(rows) < 3
    assert tr.runs.currentText() == run_dir.name
    push(qtbot, tr.resume_btn)
    assert tr.task.running
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert "finished" in tr.status.text(), tr.status.text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert tr.plot.point_count("loss") >= 1
    assert len([p for p in project.runs_dir.iterdir() if p.name.startswith("cls-")]) == 1


def test_gui_command_opens_a_project(make_napari_viewer, qtbot, tmp_path, cmu_svs, capsys):
    project = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=32, target_mpp=4.0)
    sid = project.add_slide(cmu_svs)
    grid = project.grid(sid)
    project.set_patch_labels(sid, grid.x[:5], grid.y[:5], grid.size0, np.array([0, 1, 0]))
    viewer, w = open_gui(project.root, viewer=make_napari_viewer())
    session = w["Project"].session
    assert session.project.root == project.root and session.slide_id == sid
    # reopened where it stood: the slide, its patch grid and the labels made before
    qtbot.waitUntil(lambda: session.grid is not None and w["Patch labelling"].overlay is not None, timeout=WAIT_MS)
    assert "patch grid" in viewer.layers and "tissue" in viewer.layers
    assert w["Patch labelling"].progress_label.text().startswith("5 of ")
    # the project stores resolved paths; the data folder may be reached through a symlink
    assert Path(viewer.layers[0].metadata["path"]).resolve() == Path(cmu_svs).resolve()
    assert main(["gui", str(tmp_path / "missing.svs")]) == 2
    assert "no such slide file or project folder" in capsys.readouterr().err
    assert np.allclose(session.scale0, viewer.layers[0].scale[-2:])
