"""Shared steps of the GUI tests (tests/test_widgets*.py): dock the panels as ``histo-wsss gui``
does, create a project on a real slide, simulate mouse and keys the way napari delivers them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.utils._test_utils import read_only_mouse_event
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks
from qtpy.QtCore import Qt

from napari_histo_wsss.cli.gui import PANELS, open_gui
from napari_histo_wsss.core.data.project import Project

WAIT_MS = 90_000
# Small working resolution so that training and CAMs stay tiny: 32-px patches at 4 um/px
# (256 level-0 pixels of the 0.499 um/px CMU slide per patch, about 80 tissue patches).
PATCH = 32
MPP = 4.0


def open_panels(make_napari_viewer, preset: str = "wsss4luad"):
    """A real viewer with all six panels docked through npe2; project form preset for tiny runs."""
    viewer = make_napari_viewer()
    viewer, w = open_gui(viewer=viewer)
    assert list(w) == PANELS
    proj = w["Project"]
    proj.classes.preset.setCurrentText(preset)
    proj.patch_size.setValue(PATCH)
    proj.target_mpp.setValue(MPP)
    proj.min_tissue.setValue(0.5)
    return viewer, w


def make_project_with_grid(qtbot, w, root: Path, slide: Path) -> Project:
    """Create a project, add the slide through the plugin's reader, detect tissue and the grid."""
    proj = w["Project"]
    project = proj.create_project(root)
    proj.add_slide_file(slide)
    proj.detect_grid()
    qtbot.waitUntil(lambda: proj.session.grid is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: w["Patch labelling"].overlay is not None, timeout=WAIT_MS)
    return project


def world_of_patch(session, grid, i: int, fx: float = 0.5, fy: float = 0.5) -> tuple[float, float]:
    """World position (napari row, col) of a point inside patch i (fractions of the patch)."""
    x0 = grid.x[i] + fx * grid.size0
    y0 = grid.y[i] + fy * grid.size0
    return tuple(session.translate0 + session.scale0 * (np.array([y0, x0]) - 0.5))


def click(layer, position, modifiers=()) -> None:
    """A left click as napari's canvas delivers it to the layer's mouse callbacks."""
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=position, button=1, modifiers=list(modifiers)))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=position, button=1, modifiers=list(modifiers)))


def drag(layer, start, end) -> None:
    """A left-button drag from ``start`` to ``end`` (world positions)."""
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=start, button=1))
    mid = tuple((np.asarray(start) + np.asarray(end)) / 2)
    for p in (mid, end):
        mouse_move_callbacks(layer, read_only_mouse_event(type="mouse_move", position=p, button=1, is_dragging=True))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=end, button=1))


def press(qtbot, viewer, key, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    """A real key press on the napari canvas (napari's keymap sends it to the active layer)."""
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier)


def label_some_patches(qtbot, viewer, w) -> tuple[np.ndarray, np.ndarray]:
    """Click the most tissue-filled patch -> key 1 (tumor); drag over the bottom rows -> key 2
    (stroma). Returns (clicked index, dragged indices)."""
    ov = w["Patch labelling"].overlay
    grid, session = ov.grid, w["Patch labelling"].session
    layer = ov.layer
    assert viewer.layers.selection.active.name == "patch grid"
    first = int(np.argsort(grid.tissue_fraction, kind="stable")[::-1][0])
    click(layer, world_of_patch(session, grid, first))
    assert ov.selection().tolist() == [first]
    press(qtbot, viewer, Qt.Key.Key_1)
    rows = np.argsort(grid.y, kind="stable")[-6:]
    a, b = int(rows.min()), int(rows.max())
    drag(layer, world_of_patch(session, grid, a, 0.1, 0.1), world_of_patch(session, grid, b, 0.9, 0.9))
    box = ov.selection()
    assert box.size >= 2 and first not in box
    press(qtbot, viewer, Qt.Key.Key_2)
    return np.array([first]), box


def tiny_training_form(tr, epochs: int = 1) -> None:
    """Training form set for a run of a few seconds on CPU."""
    tr.method.setCurrentText("cam")
    tr.epochs.setValue(epochs)
    tr.steps.setValue(tr.steps.minimum())  # no step budget: one pass over the patches per epoch
    tr.batch_size.setValue(4)
    tr.weights.setCurrentText("imagenet")
    tr.device.setCurrentText("cpu")
