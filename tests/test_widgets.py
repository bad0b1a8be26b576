"""The napari GUI driven as a pathologist would, on the real CMU-1-Small-Region.svs.

Real viewer (make_napari_viewer), the plugin's panels docked through npe2 exactly as
``histo-wsss gui`` does, simulated mouse events on the patch grid, real key presses on the canvas,
a tiny training through the real background worker, CAMs and pseudo-mask layers, a painted
correction found saved and flagged in the project, export read back.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("napari")
from _widget_helpers import (  # noqa: E402
    WAIT_MS,
    label_some_patches,
    make_project_with_grid,
    open_panels,
    press,
    tiny_training_form,
)
from qtpy.QtCore import Qt  # noqa: E402

from napari_histo_wsss.core.data.project import Project  # noqa: E402
from napari_histo_wsss.core.review import outside_canvas, pseudo_from_canvas, uncertain_index  # noqa: E402
from napari_histo_wsss.widgets.review import PSEUDO_OPACITY  # noqa: E402


def wait_redraw(qtbot, rv) -> None:
    """Wait until the sliders' debounce timer fired and the background redraw finished."""
    qtbot.waitUntil(lambda: not rv._redraw_timer.isActive() and not rv.pseudo_task.running, timeout=10_000)


# ---------------------------------------------------------------------------------------------
# the whole flow
# ---------------------------------------------------------------------------------------------
def test_whole_flow_on_real_slide(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    viewer, w = open_panels(make_napari_viewer)
    project = make_project_with_grid(qtbot, w, tmp_path / "case.wsss", cmu_svs)
    session = w["Project"].session
    sid = session.slide_id
    grid = session.grid
    assert len(grid) > 20
    # the grid layer lies over the slide: the tissue layer and the grid overlay are both there
    assert "tissue" in viewer.layers and "patch grid" in viewer.layers

    # -- labelling: click, drag, number keys, undo, autosave ------------------------------------
    first, box = label_some_patches(qtbot, viewer, w)
    lab = w["Patch labelling"]
    table = Project.open(project.root).patch_labels(sid)  # what is on disk
    on_disk = {(int(x), int(y)): tuple(labels) for x, y, labels in zip(table.x, table.y, table.labels)}
    assert on_disk[(int(grid.x[first[0]]), int(grid.y[first[0]]))] == (1, 0, 0)
    for i in box:
        assert on_disk[(int(grid.x[i]), int(grid.y[i]))] == (0, 1, 0)
    assert lab.progress_label.text() == f"{1 + len(box)} of {len(grid)} patches labelled"
    assert [label.text() for label in lab._count_labels] == ["1", str(len(box)), "0"]
    # key 3 on the stroma block, then Ctrl+Z undoes it (and the undo is saved too)
    press(qtbot, viewer, Qt.Key.Key_3)
    assert Project.open(project.root).patch_labels(sid).labels[:, 2].sum() == len(box)
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert Project.open(project.root).patch_labels(sid).labels[:, 2].sum() == 0
    assert lab.unsaved_count == 0

    # -- training through the real worker ------------------------------------------------------
    tr = w["Training"]
    tiny_training_form(tr)
    assert "labelled patches" in tr.data_label.text()
    run_dir = tr.start()
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert tr.plot.point_count("loss") >= 1
    assert "finished" in tr.status.text()
    assert tr.runs.currentText() == run_dir.name

    # -- review: CAM layers and the pseudo-mask ------------------------------------------------
    rv = w["Review and correct"]
    assert rv.runs.currentText() == run_dir.name
    rv.tile.setValue(512)
    rv.mode.setCurrentText("last")
    rv.device.setCurrentText("cpu")
    plan = rv.compute()
    qtbot.waitUntil(lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running,
                    timeout=WAIT_MS)
    assert "ready" in rv.status.text(), rv.status.text()
    classes = project.classes
    # the review view: CAMs hidden (one click away, made only then: adding a napari layer holds
    # the GUI thread), translucent, the class hue, zero off the tissue
    tissue = rv.canvas.tissue
    assert not tissue.all() and tissue.any()
    assert not any(layer.name.startswith("CAM ") for layer in viewer.layers)
    rv.show_cams.setChecked(True)
    for i, c in enumerate(classes.classes):
        layer = viewer.layers[f"CAM {c.name}"]
        assert layer.blending == "translucent" and layer.visible
        assert tuple(layer.contrast_limits) == pytest.approx((0.0, float(rv.canvas.peaks()[i])))
        colors = layer.colormap.colors
        assert colors[0][3] == 0 and colors[-1][3] == 1  # alpha grows with the score
        assert layer.data.shape == plan.shape and layer.data.min() >= 0 and (layer.data[~tissue] == 0).all()
        assert np.shares_memory(layer.data, rv.canvas.cams[i])
    rv.show_cams.setChecked(False)
    assert not any(viewer.layers[f"CAM {c.name}"].visible for c in classes.classes)
    pm = viewer.layers["pseudo-mask"]
    assert pm.data.shape == plan.shape
    for i, c in enumerate(classes.classes):
        np.testing.assert_allclose(pm.colormap.map(np.array([i + 1]))[0][:3], np.array(c.color) / 255, atol=1e-6)
    bg_value, unc_value = classes.background_index + 1, uncertain_index(classes) + 1
    assert pm.colormap.map(np.array([bg_value]))[0][3] == 0  # glass: no veil
    unc = pm.colormap.map(np.array([unc_value]))[0]
    assert unc[3] > 0 and all(np.abs(unc[:3] - np.array(c.color) / 255).max() > 0.2 for c in classes.classes)
    assert list(pm.features["class"])[1:4] == classes.names and pm.features["class"].iloc[-1] == "uncertain"
    values = set(np.unique(pm.data).tolist())
    assert values <= set(range(1, unc_value + 1)) and len(values) >= 2
    # tissue the model gives no class is uncertain, never background; glass (off the tissue
    # mask, or white) is background
    glass = outside_canvas(rv.canvas, rv.white_level)
    assert glass[~tissue].all() and (pm.data[glass] == bg_value).all() and not (pm.data[~glass] == bg_value).any()
    # layer order: slide, CAMs, pseudo-mask on top (the reviewed outline comes with the first
    # mark); the pseudo-mask is the active layer
    names = [layer.name for layer in viewer.layers]
    assert names.index("pseudo-mask") > max(names.index(f"CAM {c.name}") for c in classes.classes)
    assert names[-1] == "pseudo-mask" and "reviewed" not in names
    assert viewer.layers.selection.active is pm or viewer.layers.selection.active.name == "pseudo-mask"
    # the "Review view" button puts a scrambled view back
    pm.opacity, pm.visible = 1.0, False
    viewer.layers.move(viewer.layers.index(pm), 0)
    rv.view_btn.click()
    assert pm.visible and pm.opacity == pytest.approx(PSEUDO_OPACITY) and viewer.layers.selection.active.name == "pseudo-mask"
    assert [layer.name for layer in viewer.layers] == names
    # number keys on the pseudo-mask pick the paint class (not napari's tools); on another layer
    # they say why nothing happened
    mode = pm.mode
    press(qtbot, viewer, Qt.Key.Key_2)
    assert rv.paint_class.currentIndex() == 1 and pm.selected_label == 2 and pm.mode == mode
    assert classes.names[1] in rv.status.text()
    viewer.layers.selection.active = viewer.layers[session.slide_layer_name]
    press(qtbot, viewer, Qt.Key.Key_1)
    assert "number keys" in w["Patch labelling"].status.text() and session.slide_layer_name in w["Patch labelling"].status.text()
    viewer.layers.selection.active = pm
    press(qtbot, viewer, Qt.Key.Key_1)
    assert rv.paint_class.currentIndex() == 0
    # layers sit on the slide: the mask's extent matches the slide's (level-0 size * scale)
    w0, h0 = session.slide.dimensions
    ext = pm.extent.world
    np.testing.assert_allclose(ext[1] - ext[0], np.array([h0, w0]) * session.scale0, rtol=0.02)

    # sliders change the mask live: a higher CAM threshold only adds uncertain tissue, and the
    # shown mask is exactly the core's pseudo-mask for the new settings; full gating keeps one
    # class for the whole slide (gating is decided per slide)
    before = int((pm.data >= bg_value).sum())
    rv.cam_thr.setValue(90)
    wait_redraw(qtbot, rv)
    expect = pseudo_from_canvas(rv.canvas, classes, 0.9, rv.gating_threshold, rv.white_level, uncertain=True) + 1
    np.testing.assert_array_equal(pm.data, expect)
    assert int((pm.data >= bg_value).sum()) > before and (pm.data == unc_value).any()
    rv.gating.setValue(100)
    wait_redraw(qtbot, rv)
    assert len(set(np.unique(pm.data).tolist()) - {bg_value, unc_value}) == 1
    rv.gating.setValue(50)
    rv.cam_thr.setValue(20)
    wait_redraw(qtbot, rv)

    # -- a correction: paint a block with a class the automatic mask does not have there -------
    r, c = plan.shape[0] // 2, plan.shape[1] // 2
    k = (int(rv.edits.auto[r, c]) + 1) % classes.num_classes  # tissue class index to paint
    before_paint = pm.data.copy()
    pm.selected_label = k + 1
    pm.brush_size = 9
    pm.paint((r, c), k + 1)
    changed = pm.data != before_paint
    assert changed[r, c]
    qtbot.waitUntil(lambda: not rv._dirty and not rv.save_task.running, timeout=10_000)  # autosave (background)
    corrected, ds = Project.open(project.root).read_mask(sid, "corrected")
    flag, _ = Project.open(project.root).read_mask(sid, "corrected_flag")
    assert ds == pytest.approx(plan.downsample)
    assert flag[r, c] and corrected[r, c] == k
    assert flag.sum() == changed.sum()
    qtbot.waitUntil(lambda: rv._area_labels[k].text() != "0 µm²", timeout=5000)
    assert rv._area_labels[k].text().endswith("m²") and float(rv._area_labels[k].text().split()[0]) > 0
    assert [lab.text() for i, lab in enumerate(rv._area_labels) if i != k] == ["0 µm²"] * classes.num_classes
    # moving a slider keeps the correction
    rv.cam_thr.setValue(10)
    wait_redraw(qtbot, rv)
    assert pm.data[r, c] == k + 1
    # mark reviewed, then undo the paint stroke: the flag clears
    frac = rv.mark_reviewed((0, 0, plan.shape[0] // 2, plan.shape[1]))
    assert 0 < frac < 1
    assert viewer.layers[-1].name == "reviewed" and viewer.layers["reviewed"].data[0, 0] == 1
    rv.undo()
    assert pm.data[r, c] == rv.edits.auto[r, c] + 1
    rv.save()
    flag, _ = Project.open(project.root).read_mask(sid, "corrected_flag")
    reviewed, _ = Project.open(project.root).read_mask(sid, "reviewed")
    assert flag.sum() == 0 and reviewed[: plan.shape[0] // 2].all() and not reviewed[-1].any()
    # paint again (kept for the export), save, then reload everything from the project
    k = (int(rv.edits.auto[r, c]) + 1) % classes.num_classes
    pm.paint((r, c), k + 1)
    rv.save()
    layers_before = list(viewer.layers)
    rv.load()
    # the same layers show the loaded canvas (layers are refilled in place, never removed and re-added)
    assert list(viewer.layers) == layers_before and viewer.layers["pseudo-mask"] is pm
    assert np.shares_memory(pm.data, rv.edits.data) and viewer.layers["reviewed"].data[0, 0] == 1
    assert pm.data[r, c] == k + 1 and rv.edits.flag()[r, c]

    # -- export in all formats and read back ----------------------------------------------------
    ex = w["Export and metrics"]
    ex.source.setCurrentText("pseudo-mask")
    out = tmp_path / "export"
    paths = ex.export(["ome-zarr", "tiff", "png", "geojson", "csv"], out)
    qtbot.waitUntil(lambda: not ex.task.running, timeout=WAIT_MS)
    assert sorted(p.name for p in ex.written) == sorted(p.name for p in paths)
    expect = rv.edits.corrected()
    from napari_histo_wsss.core.io.export import open_label_pyramid, rasterize_geojson, read_geojson

    png = next(p for p in paths if p.suffix == ".png")
    np.testing.assert_array_equal(np.array(Image.open(png)), expect)
    zarr_path = next(p for p in paths if p.name.endswith(".ome.zarr"))
    np.testing.assert_array_equal(open_label_pyramid(zarr_path).read_index(0), expect)
    gj = next(p for p in paths if p.suffix == ".geojson")
    feats = read_geojson(gj)
    assert {a.name for a in feats} <= set(classes.names)
    assert {a.color for a in feats if a.name == classes.names[k]} == {classes.classes[k].color}
    ds, origin = session.layer_geometry(pm)
    back = rasterize_geojson(feats, expect.shape, classes, downsample=ds, origin=origin, fill=classes.background_index)
    assert (back == expect).mean() > 0.98  # outlines simplified by core.io.export.GEOJSON_TOLERANCE (< 0.5 px)
    csv_text = next(p for p in paths if p.suffix == ".csv").read_text()
    assert csv_text.count("\n") == 1 + len(box) + 1

    # -- metrics panel against the exported PNG as ground truth: perfect score ------------------
    ex.gt.setCurrentText("mask file...")
    ex.gt_file.setText(str(png))
    scores = ex.score()
    assert scores["miou"] == pytest.approx(1.0)
    assert ex.table.rowCount() == classes.num_classes and "mIoU 1.000" in ex.summary.text()


def test_tissue_outline_differs_from_every_class_colour():
    """The tissue outline used to be green, like the tumour or normal classes of some tables."""
    from napari_histo_wsss.core.data.classes import PRESETS
    from napari_histo_wsss.widgets.project import TISSUE_RGBA

    for table in PRESETS.values():
        for c in table.classes:
            assert np.abs(np.array(TISSUE_RGBA[:3]) - np.array(c.color) / 255).max() > 0.3, (table, c.name)
