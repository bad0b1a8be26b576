"""Closing the viewer while a job runs stops the job and keeps its work (issue 14: "closing the
viewer in 2 s or less" - the time is measured by bench/bench_gui_stall.py, not asserted here).

A real viewer with the six panels, on the real CMU slide: a training run closed after its first
step leaves a resumable checkpoint; a CAM computation closed after its first tile leaves the tiles
done so far in the project; in both the worker thread has ended when ``viewer.close()`` returns.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets_close.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
from _review_project import RUN, labelled_project_with_classifier  # noqa: E402
from _widget_helpers import WAIT_MS, open_panels, tiny_training_form  # noqa: E402

from napari_histo_wsss.core.data.project import Project  # noqa: E402
from napari_histo_wsss.core.models.checkpoint import load_checkpoint  # noqa: E402
from napari_histo_wsss.core.review import MASK_CAM, CamTile  # noqa: E402


def _open(make_napari_viewer, qtbot, project, sid):
    viewer, w = open_panels(make_napari_viewer)
    w["Project"].open_project(project.root)
    w["Project"].show_slide(sid)
    w["Project"].detect_grid()
    qtbot.waitUntil(lambda: w["Project"].session.grid is not None, timeout=WAIT_MS)
    return viewer, w


def test_closing_the_viewer_stops_training_and_cams_keeping_their_work(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    project, sid = labelled_project_with_classifier(tmp_path / "close.wsss", cmu_svs)

    # -- training: 40 epochs asked, the viewer closed after the first optimizer step ----------------
    viewer, w = _open(make_napari_viewer, qtbot, project, sid)
    tr = w["Training"]
    tiny_training_form(tr, epochs=40)
    run_dir = tr.start()
    task = tr.task
    qtbot.waitUntil(lambda: getattr(task.last_event, "kind", "") == "step", timeout=WAIT_MS)
    viewer.close()
    assert task.wait(0), "the training thread still runs after the viewer closed"
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["extra"]["epoch"] < 40  # stopped early, resumable

    # -- CAMs: small tiles, the viewer closed once the first tile is drawn ---------------------------
    viewer, w = _open(make_napari_viewer, qtbot, project, sid)
    rv = w["Review and correct"]
    rv.runs.setCurrentText(RUN)  # the finished run (the one above was stopped before its first epoch ended)
    rv.tile.setValue(64)
    rv.mode.setCurrentText("last")
    rv.device.setCurrentText("cpu")
    plan = rv.compute()
    assert len(plan.tiles) > 4
    task = rv.task
    qtbot.waitUntil(lambda: isinstance(task.last_event, CamTile), timeout=WAIT_MS)
    viewer.close()
    assert task.wait(0), "the CAM thread still runs after the viewer closed"
    cams, _ = Project.open(project.root).read_mask(sid, MASK_CAM)
    done = np.isfinite(cams).all(axis=0) & (cams != 0).any(axis=0)
    assert done.any() and not done.all()  # the tiles done so far are kept, the rest were not computed
