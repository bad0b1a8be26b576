"""The Segmenter panel on the real CMU slide: stage two trained in the background on the project's
corrected pseudo-masks, then the slide predicted and shown as a multiscale Labels layer with the
class colours, exported from the Export panel and read back.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets_stage2.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
from _widget_helpers import MPP, PATCH, WAIT_MS, open_panels  # noqa: E402
from qtpy.QtWidgets import QPushButton  # noqa: E402

from napari_histo_wsss.core.data.project import Project  # noqa: E402
from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier  # noqa: E402


def labelled_project_with_classifier(tmp_path, cmu_svs) -> tuple[Project, str]:
    """A project on the CMU slide with patches labelled by tissue rows (top half stroma, bottom
    half tumor) and a classifier trained one tiny epoch (headless: the GUI path is in test_widgets)."""
    project = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=PATCH, target_mpp=MPP)
    sid = project.add_slide(cmu_svs)
    grid = project.grid(sid)
    top = grid.y < np.median(grid.y)
    for idx, lab in ((np.flatnonzero(top)[:8], [0, 1, 0]), (np.flatnonzero(~top)[:8], [1, 0, 0])):
        project.set_patch_labels(sid, grid.x[idx], grid.y[idx], grid.size0, np.array(lab))
    cfg = TrainConfig(method="cam", epochs=1, batch_size=4, weights="imagenet", device="cpu", patch_size=PATCH)
    for _ev in train_classifier(project.root, project.runs_dir / "cls-cam-test", cfg):
        pass
    return project, sid


def test_segmenter_train_predict_export(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    project, sid = labelled_project_with_classifier(tmp_path, cmu_svs)
    viewer, w = open_panels(make_napari_viewer)
    w["Project"].open_project(project.root)
    w["Project"].show_slide(sid)
    w["Project"].detect_grid()
    qtbot.waitUntil(lambda: w["Project"].session.grid is not None, timeout=WAIT_MS)
    st = w["Segmenter"]
    # no pseudo-masks yet: a clear message
    st.start_btn.click()
    assert "no pseudo-mask" in st.status.text()

    # pseudo-masks with a correction (Review panel)
    rv = w["Review and correct"]
    rv.tile.setValue(512)
    rv.mode.setCurrentText("last")
    rv.device.setCurrentText("cpu")
    rv.compute()
    qtbot.waitUntil(lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running,
                    timeout=WAIT_MS)
    pm = viewer.layers["pseudo-mask"]
    pm.paint((pm.data.shape[0] // 2, pm.data.shape[1] // 2), 1)
    rv.save()

    # stage two in the background, from the classifier run chosen in the panel
    assert st.source.currentText() == "cls-cam-test"
    assert "pseudo-masks" in st.data_label.text() and sid in st.data_label.text()
    assert not hasattr(st, "method")  # the segmenter has no method setting (its form is SegConfig's)
    st.epochs.setValue(1)
    st.batch_size.setValue(4)
    st.weights.setCurrentText("imagenet")
    st.device.setCurrentText("cpu")
    run_dir = st.start()
    assert run_dir.name.startswith("seg-")
    assert "(" + st.config().backbone in st.status.text(), st.status.text()  # no empty method in "(..., cpu)"
    qtbot.waitUntil(lambda: not st.task.running, timeout=WAIT_MS)
    assert "finished" in st.status.text() and "Predict slide" in st.status.text(), st.status.text()
    assert "CAMs" not in st.status.text()
    cancels = [b.text() for b in st.findChildren(QPushButton) if "Cancel" in b.text()]
    assert sorted(cancels) == ["Cancel prediction", "Cancel training"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert st.plot.point_count("loss") >= 1
    assert st.runs.currentText() == run_dir.name
    assert not st.synthesis.isChecked() and st.config().synthesis == ()

    # the same with HisynSeg synthesis from the project's single-label patches (stroma rows, tumour rows)
    st.synthesis.setChecked(True)
    synth_dir = st.start()
    qtbot.waitUntil(lambda: not st.task.running, timeout=WAIT_MS)
    assert "finished" in st.status.text(), st.status.text()
    from napari_histo_wsss.core.stage2.train import load_segmenter

    seg, _, synth_cfg, _ = load_segmenter(synth_dir)
    assert synth_cfg.synthesis == ("mosaic", "bezier") and seg.aux is not None
    st.synthesis.setChecked(False)
    st.runs.setCurrentIndex(st.runs.findText(run_dir.name))

    # predict the slide: a multiscale Labels layer with the class colours over the slide
    st.pred_tile.setValue(128)
    st.pred_overlap.setValue(16)
    out = st.predict()
    st.predict_btn.click()
    assert "already running" in st.status.text()
    qtbot.waitUntil(lambda: not st.pred_task.running, timeout=WAIT_MS)
    layer = viewer.layers["prediction"]
    classes = project.classes
    for i, c in enumerate(classes.classes):
        np.testing.assert_allclose(layer.colormap.map(np.array([i + 1]))[0][:3], np.array(c.color) / 255, atol=1e-6)
    levels = layer.data if layer.multiscale else [layer.data]
    w0, h0 = w["Project"].session.slide.dimensions
    ext = layer.extent.world
    np.testing.assert_allclose(ext[1] - ext[0], np.array([h0, w0]) * w["Project"].session.scale0, rtol=0.02)
    values = set(np.unique(np.asarray(levels[-1])).tolist())
    assert values <= set(range(1, classes.background_index + 2)) and classes.background_index + 1 in values

    # export the prediction (OME-Zarr + GeoJSON) from the Export panel and read it back
    from napari_histo_wsss.core.io.export import open_label_pyramid, rasterize_geojson

    ex = w["Export and metrics"]
    ex.source.setCurrentText("prediction")
    paths = ex.export(["ome-zarr", "geojson"], tmp_path / "export")
    qtbot.waitUntil(lambda: not ex.task.running, timeout=WAIT_MS)
    truth = open_label_pyramid(out).read_index(0)
    np.testing.assert_array_equal(open_label_pyramid(paths[0]).read_index(0), truth)
    ds, origin = w["Project"].session.layer_geometry(layer)
    back = rasterize_geojson(paths[1], truth.shape, classes, downsample=ds, origin=origin, fill=classes.background_index)
    assert (back == truth).mean() > 0.98  # outlines simplified by core.io.export.GEOJSON_TOLERANCE (< 0.5 px)
