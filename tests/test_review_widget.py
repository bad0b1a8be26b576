"""The Review panel and ``histo-wsss cams`` are one engine: on the same project (real CMU slide, a
classifier trained one tiny epoch) the command writes exactly the CAM and pseudo-mask layers the
panel computed, and leaves the pathologist's painted correction alone.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_review_widget.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
from _review_project import RUN, labelled_project_with_classifier  # noqa: E402
from _widget_helpers import WAIT_MS, open_panels  # noqa: E402

from napari_histo_wsss.cli import main  # noqa: E402
from napari_histo_wsss.core.data.project import Project  # noqa: E402
from napari_histo_wsss.core.review import (  # noqa: E402
    COMPUTED_MASKS,
    MASK_CAM_PRESENCE,
    MASK_CORRECTED,
    MASK_CORRECTED_FLAG,
    MASK_PSEUDO,
    MASK_REVIEWED,
)


def _read(root, sid, names) -> dict:
    p = Project.open(root)
    return {n: p.read_mask(sid, n) for n in names}


def test_cams_command_equals_the_review_panel(make_napari_viewer, qtbot, tmp_path, cmu_svs, capsys, monkeypatch):
    # one torch thread for both (the GUI's policy leaves a core to the viewer, the command does not:
    # another thread count sums the CAMs in another order, a few 1e-4 apart)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _cams_command_equals_the_review_panel(make_napari_viewer, qtbot, tmp_path, cmu_svs, capsys)
    finally:
        torch.set_num_threads(threads)


def _cams_command_equals_the_review_panel(make_napari_viewer, qtbot, tmp_path, cmu_svs, capsys):
    project, sid = labelled_project_with_classifier(tmp_path / "case.wsss", cmu_svs)
    # the run as one with validation masks records it: pseudo-masks' prob-area floor and offsets
    # (the tiny run has none), which the panel takes from the job and the command uses
    run = project.runs_dir / RUN
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["min_area"] = 0.05
        row["raw_offsets"] = {"raw": [0.0, 0.5, 0.0], "prob-raw": [0.0, 0.0, 0.0], "prob-area": [0.0, 0.0, 0.0]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    viewer, w = open_panels(make_napari_viewer)
    w["Project"].open_project(project.root)
    w["Project"].show_slide(sid)
    w["Project"].detect_grid()
    qtbot.waitUntil(lambda: w["Project"].session.grid is not None, timeout=WAIT_MS)

    rv = w["Review and correct"]
    assert rv.runs.currentText() == RUN
    rv.tile.setValue(128)
    rv.mode.setCurrentText("last")
    rv.device.setCurrentText("cpu")
    plan = rv.compute()
    qtbot.waitUntil(lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running,
                    timeout=WAIT_MS)
    assert "ready" in rv.status.text(), rv.status.text()
    assert len(plan.tiles) > 1
    np.testing.assert_allclose(rv.canvas.presence, [0.05, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(Project.open(project.root).read_mask(sid, MASK_CAM_PRESENCE)[0], [[0.05, 0.0, 0.5, 0.0]])
    panel = _read(project.root, sid, COMPUTED_MASKS)
    pm = viewer.layers["pseudo-mask"]
    bg = project.classes.background_index
    np.testing.assert_array_equal(np.minimum(pm.data - 1, bg), panel[MASK_PSEUDO][0])  # shown = saved (uncertain: background)
    # a correction painted and saved in the panel
    r, c = plan.shape[0] // 2, plan.shape[1] // 2
    k = (int(rv.edits.auto[r, c]) + 1) % project.classes.num_classes
    pm.paint((r, c), k + 1)
    rv.mark_reviewed((0, 0, 10, 10))
    rv.save()
    work = _read(project.root, sid, (MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED))
    assert work[MASK_CORRECTED_FLAG][0][r, c]

    # the command refuses to replace the layers, then with --overwrite writes the same ones
    args = ["cams", str(project.root), "--slide", sid, "--tile", "128", "--mode", "last", "--device", "cpu"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    cli = _read(project.root, sid, COMPUTED_MASKS + (MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED))
    for name in COMPUTED_MASKS:
        (a, ads), (b, bds) = panel[name], cli[name]
        assert a.dtype == b.dtype and ads == bds
        np.testing.assert_array_equal(a, b)  # NaN tiles of cam_probs compare equal too
    for name, (arr, ds) in work.items():
        np.testing.assert_array_equal(cli[name][0], arr)
        assert cli[name][1] == ds

    # the panel loads the command's layers with the correction on top
    rv.load()
    pm = viewer.layers["pseudo-mask"]
    assert pm.data[r, c] == k + 1 and rv.edits.flag()[r, c] and rv.edits.reviewed[:10, :10].all()
    np.testing.assert_array_equal(np.minimum(rv.edits.auto, bg), cli[MASK_PSEUDO][0])

    # recomputing in the panel keeps the correction too (saved again at the end), in the same
    # layers (refilled in place: removing and re-adding napari layers held the GUI thread 2 s)
    layers_before = list(viewer.layers)
    rv.compute()
    assert list(viewer.layers) == layers_before and np.shares_memory(viewer.layers["pseudo-mask"].data, rv.edits.data)
    assert "corrected pixels kept" in rv.status.text(), rv.status.text()
    qtbot.waitUntil(lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running,
                    timeout=WAIT_MS)
    again = _read(project.root, sid, COMPUTED_MASKS + (MASK_CORRECTED, MASK_CORRECTED_FLAG))
    for name in COMPUTED_MASKS:
        np.testing.assert_array_equal(again[name][0], panel[name][0])
    np.testing.assert_array_equal(again[MASK_CORRECTED_FLAG][0], work[MASK_CORRECTED_FLAG][0])
    np.testing.assert_array_equal(again[MASK_CORRECTED][0], work[MASK_CORRECTED][0])
    assert viewer.layers["pseudo-mask"].data[r, c] == k + 1

    # a second window opening the project shows the saved layers again (the review as it was left)
    viewer2, w2 = open_panels(make_napari_viewer)
    w2["Project"].open_project(project.root)
    w2["Project"].show_slide(sid)
    rv2 = w2["Review and correct"]
    qtbot.waitUntil(lambda: rv2.edits is not None and "pseudo-mask" in viewer2.layers, timeout=WAIT_MS)
    assert "restored the saved CAMs" in rv2.status.text(), rv2.status.text()
    np.testing.assert_allclose(rv2.canvas.presence, [0.05, 0.0, 0.5, 0.0])
    assert viewer2.layers["pseudo-mask"].data[r, c] == k + 1 and rv2.edits.flag()[r, c]
    np.testing.assert_array_equal(rv2.edits.reviewed, rv.edits.reviewed)

    # "Refine borders": the mask is made again without the dense CRF (no new CAMs), the
    # correction kept; back on crf it is the saved refined mask again
    from napari_histo_wsss.core.review import pseudo_from_canvas
    from napari_histo_wsss.core.stage1.refine import crf_available

    if not crf_available():
        return
    assert rv.refine.currentText() == "crf" and rv.canvas.refine == "crf"
    refined = np.minimum(rv.edits.auto, bg).copy()
    rv.refine.setCurrentText("none")
    qtbot.waitUntil(lambda: not rv.pseudo_task.running and rv.canvas.refine == "none", timeout=WAIT_MS)
    plain = pseudo_from_canvas(rv.canvas, project.classes, rv.cam_threshold, rv.gating_threshold, rv.white_level,
                               refined=False)
    np.testing.assert_array_equal(np.minimum(rv.edits.auto, bg), plain)
    assert (plain != refined).any() and viewer.layers["pseudo-mask"].data[r, c] == k + 1
    rv.refine.setCurrentText("crf")
    qtbot.waitUntil(lambda: not rv.pseudo_task.running and rv.canvas.refine == "crf", timeout=WAIT_MS)
    np.testing.assert_array_equal(np.minimum(rv.edits.auto, bg), refined)
