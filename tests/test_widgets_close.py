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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cmu_svs):
    """The shared project: labelled patches on the CMU slide and a classifier of one tiny epoch."""
    return labelled_project_with_classifier(tmp_path_factory.mktemp("close") / "close.wsss", cmu_svs)


def _open(make_napari_viewer, qtbot, project, sid):
    viewer, w = open_panels(make_napari_viewer)
    w["Project"].open_project(project.root)
    w["Project"].show_slide(sid)
    w["Project"].detect_grid()
    qtbot.waitUntil(lambda: w["Project"].session.grid is not None, timeout=WAIT_MS)
    return viewer, w


def test_closing_the_viewer_stops_training_and_cams_keeping_their_work(make_napari_viewer, qtbot, trained):
    project, sid = trained

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


def test_export_cancel_stops_after_the_file_being_written(make_napari_viewer, qtbot, tmp_path, trained, monkeypatch):
    """Cancel during an export in four formats: the file being written is finished (never left
    half-written), no later format is started, and the panel says which files exist."""
    import threading

    from napari_histo_wsss.core.io import export as core_export

    project, sid = trained
    viewer, w = _open(make_napari_viewer, qtbot, project, sid)
    rv = w["Review and correct"]
    rv.runs.setCurrentText(RUN)
    rv.tile.setValue(512)
    rv.device.setCurrentText("cpu")
    rv.compute()
    qtbot.waitUntil(lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running,
                    timeout=WAIT_MS)
    ex = w["Export and metrics"]
    ex.source.setCurrentText("pseudo-mask")
    # the first format waits until Cancel has been pressed (so the test does not race the worker)
    original, writing, cancelled = core_export.export_ome_zarr, threading.Event(), threading.Event()

    def first_format(*args, **kwargs):
        writing.set()
        assert cancelled.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(core_export, "export_ome_zarr", first_format)
    paths = ex.export(["ome-zarr", "tiff", "png", "geojson"], tmp_path / "out")
    qtbot.waitUntil(writing.is_set, timeout=WAIT_MS)
    ex.task.cancel()
    cancelled.set()
    qtbot.waitUntil(lambda: not ex.task.running, timeout=WAIT_MS)
    assert [p.name for p in ex.written] == [paths[0].name]
    assert core_export.open_label_pyramid(paths[0]).read_index(0).shape == rv.edits.data.shape  # whole
    assert not any(p.exists() for p in paths[1:])
    assert "export cancelled" in ex.status.text() and paths[0].name in ex.status.text(), ex.status.text()
