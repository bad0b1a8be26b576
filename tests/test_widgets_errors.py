"""Bad input in the GUI ends as a clear sentence in the panel, never a traceback or lost labels.

Buttons are clicked with qtbot (their slots are the ones users trigger); pytest-qt fails a test
on any exception escaping a Qt slot, so "no traceback" is checked on every click.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets_errors.py -q
"""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
from _widget_helpers import (  # noqa: E402
    WAIT_MS,
    click,
    label_some_patches,
    open_panels,
    press,
    tiny_training_form,
    world_of_patch,
)
from qtpy.QtCore import Qt  # noqa: E402

from napari_histo_wsss.core.data.project import Project  # noqa: E402


def push(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def test_bad_input_gives_messages_not_tracebacks(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    viewer, w = open_panels(make_napari_viewer)
    proj, lab, tr, rv, ex = (w[k] for k in ("Project", "Patch labelling", "Training", "Review and correct",
                                            "Export and metrics"))
    # no project
    push(qtbot, tr.start_btn)
    assert "no project open" in tr.status.text()
    push(qtbot, rv.compute_btn)
    assert "no project open" in rv.status.text()
    push(qtbot, ex.export_btn)
    assert "no project open" in ex.status.text()
    push(qtbot, proj.create_btn)  # no folder typed
    assert "project folder" in proj.status.text()
    # a project but no slide
    proj.path_edit.setText(str(tmp_path / "p.wsss"))
    push(qtbot, proj.create_btn)
    assert (tmp_path / "p.wsss" / "project.json").is_file()
    push(qtbot, proj.grid_btn)
    assert "no slide open" in proj.status.text()
    push(qtbot, rv.compute_btn)
    assert "no slide open" in rv.status.text()
    push(qtbot, lab.show_btn)
    assert "no slide open" in lab.status.text()
    # opening a folder that is not a project names it
    proj.path_edit.setText(str(tmp_path))
    push(qtbot, proj.open_btn)
    assert "not a napari-histo-wsss project" in proj.status.text() and str(tmp_path) in proj.status.text()
    proj.path_edit.setText(str(tmp_path / "p.wsss"))
    push(qtbot, proj.open_btn)

    # slide and grid, but no labels
    proj.add_slide_file(cmu_svs)
    proj.detect_grid()
    qtbot.waitUntil(lambda: lab.overlay is not None, timeout=WAIT_MS)
    push(qtbot, tr.start_btn)
    assert "no labelled patches yet" in tr.status.text()
    # one class only
    ov = lab.overlay
    session, grid = lab.session, ov.grid
    click(ov.layer, world_of_patch(session, grid, 0))
    press(qtbot, viewer, Qt.Key.Key_1)
    push(qtbot, tr.start_btn)
    assert "only one class (tumor)" in tr.status.text()
    # a key without a class and a key without selection
    press(qtbot, viewer, Qt.Key.Key_9)
    assert "there is no class 9" in lab.status.text()
    press(qtbot, viewer, Qt.Key.Key_Escape)
    press(qtbot, viewer, Qt.Key.Key_2)
    assert "select patches first" in lab.status.text()

    # read-only project: the edit stays in memory, is reported, and is saved once writable again
    project = session.project
    project.read_only = True
    click(ov.layer, world_of_patch(session, grid, 1))
    press(qtbot, viewer, Qt.Key.Key_2)
    assert "NOT saved yet" in lab.status.text() and "read-only" in lab.status.text()
    assert lab.unsaved_count == 1 and ov.labels[1, 1] == 1
    project.read_only = False
    push(qtbot, lab.save_btn)
    assert lab.unsaved_count == 0 and "all labels saved" in lab.status.text()
    on_disk = Project.open(project.root).patch_labels()
    assert on_disk.labels.sum(axis=0).tolist() == [1, 1, 0]

    # the grid layer deleted while in use: labels kept, message, the grid comes back
    viewer.layers.remove("patch grid")
    assert "deleted" in lab.status.text() and "labels are kept" in lab.status.text()
    push(qtbot, lab.clear_btn)
    assert "not shown" in lab.status.text()
    push(qtbot, lab.show_btn)
    assert "patch grid" in viewer.layers and lab.overlay.labels.sum() == 2

    # too few labelled patches for the trainer: its error ends in the panel, not as a traceback
    tiny_training_form(tr)
    push(qtbot, tr.start_btn)
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert "Classifier training failed" in tr.status.text() and "too few" in tr.status.text()
    # Start pressed twice (with enough labels now): one run, one clear message
    label_some_patches(qtbot, viewer, w)
    runs_before = len(list(project.runs_dir.iterdir()))
    push(qtbot, tr.start_btn)
    assert tr.task.running
    push(qtbot, tr.start_btn)
    assert "already running" in tr.status.text()
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert len(list(project.runs_dir.iterdir())) == runs_before + 1
    assert "finished" in tr.status.text()

    # the pseudo-mask layer deleted while correcting: message, corrections kept, layer restored
    rv.tile.setValue(512)
    rv.mode.setCurrentText("last")
    rv.device.setCurrentText("cpu")
    push(qtbot, rv.compute_btn)
    push(qtbot, rv.compute_btn)
    assert "already being computed" in rv.status.text()
    qtbot.waitUntil(lambda: not rv.task.running, timeout=WAIT_MS)
    pm = viewer.layers["pseudo-mask"]
    r, c = (s // 2 for s in pm.data.shape)
    pm.paint((r, c), 1)
    viewer.layers.remove("pseudo-mask")
    assert "deleted" in rv.status.text() and "kept" in rv.status.text()
    push(qtbot, rv.undo_btn)
    assert "not shown" in rv.status.text()
    push(qtbot, rv.show_btn)
    assert viewer.layers["pseudo-mask"].data[r, c] == 1
    qtbot.waitUntil(lambda: not rv.save_task.running, timeout=10_000)
    flag, _ = Project.open(project.root).read_mask(session.slide_id, "corrected_flag")
    assert flag.any() or rv.edits.auto[r, c] == 0  # the correction reached the disk on deletion

    # metrics against the layer itself and without a ground-truth file
    ex.source.setCurrentText("pseudo-mask")
    ex.gt.setCurrentText("pseudo-mask")
    push(qtbot, ex.score_btn)
    assert "choose another layer or a file" in ex.status.text()
    ex.gt.setCurrentText("mask file...")
    push(qtbot, ex.score_btn)
    assert "choose a ground-truth mask file" in ex.status.text()
    push(qtbot, ex.export_btn)  # no folder
    assert "output folder" in ex.status.text()


def _project_panel_with_grid(make_napari_viewer, qtbot, tmp_path, slide, patch_size: int, mpp: float):
    """The Project panel of a real viewer: a new project with these patch settings, the slide
    added through the plugin's reader and its grid laid."""
    _viewer, w = open_panels(make_napari_viewer)
    proj = w["Project"]
    proj.patch_size.setValue(patch_size)
    proj.target_mpp.setValue(mpp)
    proj.create_project(tmp_path / "case.wsss")
    proj.add_slide_file(slide)
    proj.detect_grid()
    qtbot.waitUntil(lambda: proj.session.grid is not None, timeout=WAIT_MS)
    return proj


def test_resolution_the_slide_cannot_honour_is_said(make_napari_viewer, qtbot, tmp_path, wsss4luad_dir):
    """A slide without a pixel size (a TIFF of a real H&E image, no resolution tags) in a project
    whose Resolution is 1 µm/px: the grid is laid at level 0 and the panel says that Resolution was
    ignored, instead of going silent."""
    import numpy as np
    import tifffile
    from PIL import Image

    slide = tmp_path / "no-pixel-size.tif"
    tifffile.imwrite(slide, np.asarray(Image.open(wsss4luad_dir / "val" / "img" / "02.png").convert("RGB")),
                     photometric="rgb")
    proj = _project_panel_with_grid(make_napari_viewer, qtbot, tmp_path, slide, 64, 1.0)
    text = proj.status.text()
    assert "does not state its pixel size" in text and "ignored" in text and "level 0" in text, text
    assert proj.session.grid.size0 == 64


def test_a_grid_with_few_patches_says_so_and_offers_a_finer_one(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    """The panel's default grid (224-px patches at 1 um/px) gives the bundled slide 10 patches: the
    panel warns and names a patch size that gives enough; applying it lays that many."""
    proj = _project_panel_with_grid(make_napari_viewer, qtbot, tmp_path, cmu_svs, 224, 1.0)
    text = proj.status.text()
    assert f"{len(proj.session.grid)} tissue patches" in text and "-px patches would give" in text, text
    size, n = text.split("; ")[-1].split("-px patches would give ")
    proj.patch_size.setValue(int(size))
    proj.apply_settings()
    qtbot.waitUntil(lambda: proj.session.grid is not None, timeout=WAIT_MS)
    assert len(proj.session.grid) == int(n.split(":")[0]) and "would give" not in proj.status.text()


def test_a_project_whose_slide_file_moved_says_so_in_one_line(make_napari_viewer, qtbot, tmp_path, wsss4luad_dir):
    """Reopening a project whose slide file was moved away: the panel opens the project and says
    which file is missing, in its status line, without a traceback; the project is untouched."""
    import numpy as np
    import tifffile
    from PIL import Image

    from napari_histo_wsss.core.data.project import Project

    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, np.asarray(Image.open(wsss4luad_dir / "val" / "img" / "02.png").convert("RGB")),
                     photometric="rgb")
    project = Project.create(tmp_path / "case.wsss", "wsss4luad", patch_size=64, target_mpp=None)
    sid = project.add_slide(slide)
    manifest = project.manifest_path.read_bytes()
    slide.rename(tmp_path / "moved.tif")
    _viewer, w = open_panels(make_napari_viewer)
    proj = w["Project"]
    proj.open_project(project.root)
    text = proj.status.text()
    assert f"slide {sid} not shown" in text and str(slide) in text and "missing (moved or deleted?)" in text, text
    assert "Traceback" not in text and "\n" not in text
    assert proj.session.project is not None and proj.session.slide is None
    assert project.manifest_path.read_bytes() == manifest
