"""A WSSS4LUAD-style labelled patch folder (real images cut by make-patches, labels in the file
names) is imported in the Patch labelling panel and trained on from the Training panel.
Run: xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest tests/test_widgets_import.py -q
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
from _widget_helpers import WAIT_MS, open_panels, tiny_training_form  # noqa: E402


def test_import_labelled_patch_folder_and_train_on_it(make_napari_viewer, qtbot, tmp_path, wsss4luad_dir):
    """Real WSSS4LUAD images cut into a patch folder with labels in the names (make-patches), then
    imported in the Patch labelling panel and used as the Training panel's data source."""
    from napari_histo_wsss.core.data.datasets import make_patches, parse_label_name

    src = tmp_path / "src"
    for sub in ("img", "mask"):
        (src / sub).mkdir(parents=True)
        for p in sorted((wsss4luad_dir / "val" / sub).glob("*.png"))[:3]:
            shutil.copy(p, src / sub / p.name)
    make_patches(src / "img", src / "mask", tmp_path / "patches", "wsss4luad", patch_size=128, stride=128)
    viewer, w = open_panels(make_napari_viewer)
    lab, tr = w["Patch labelling"], w["Training"]
    w["Project"].create_project(tmp_path / "p.wsss")
    spec = lab.import_folder(tmp_path / "patches")
    names = sorted((tmp_path / "patches" / "train").glob("*.png"))
    assert len(spec.train) == len(names) > 4
    expected = np.sum([parse_label_name(p)[1] for p in names], axis=0)
    assert f"{len(names)} patches" in lab.import_label.text()
    assert all(f"{n} {int(c)}" in lab.import_label.text() for n, c in zip(spec.classes.names, expected))
    tr.source.setCurrentText("imported patch folder")
    assert str(tmp_path / "patches") in tr.data_label.text()
    tiny_training_form(tr)
    tr.batch_size.setValue(8)
    run_dir = tr.start()
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert "finished" in tr.status.text(), tr.status.text()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["patch_size"] in (None, 128) and (run_dir / "checkpoints" / "last.pt").is_file()


def test_panels_opened_from_the_plugins_menu_dock_as_tabs(make_napari_viewer, qtbot):
    """Each panel opened on its own (as the Plugins menu does, no tabify) joins the others' tabs."""
    from qtpy.QtWidgets import QDockWidget

    viewer = make_napari_viewer(show=True)
    docks = [viewer.window.add_plugin_dock_widget("napari-histo-wsss", name)[0]
             for name in ("Project", "Patch labelling", "Review and correct")]
    qtbot.waitUntil(lambda: all(d.isVisible() for d in docks), timeout=5000)
    main = docks[0].parentWidget()
    qtbot.waitUntil(lambda: len(main.tabifiedDockWidgets(docks[0])) == 2, timeout=5000)
    assert all(isinstance(d, QDockWidget) for d in docks)
    assert set(main.tabifiedDockWidgets(docks[0])) == set(docks[1:])
    # tab names are whole, not cut to "Pr..."
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QTabBar

    bars = [b for b in main.findChildren(QTabBar) if b.parentWidget() is main and b.count() == 3]
    qtbot.waitUntil(lambda: bars and all(b.elideMode() == Qt.TextElideMode.ElideNone for b in bars), timeout=5000)


def test_training_panel_warns_of_a_class_with_no_labelled_patch(make_napari_viewer, qtbot, tmp_path, wsss4luad_dir):
    """Two tumour/stroma images (no normal tissue): the run's note that nothing is labelled normal
    reaches the pathologist as a warning (amber status line and a napari notification), not as a
    passing progress text."""
    from napari_histo_wsss.core.data.datasets import make_patches, parse_label_name

    src = tmp_path / "src"
    for sub in ("img", "mask"):
        (src / sub).mkdir(parents=True)
        for name in ("00.png", "01.png"):
            shutil.copy(wsss4luad_dir / "val" / sub / name, src / sub / name)
    make_patches(src / "img", src / "mask", tmp_path / "patches", "wsss4luad", patch_size=128, stride=64)
    labels = np.array([parse_label_name(p)[1] for p in (tmp_path / "patches" / "train").glob("*.png")])
    assert labels[:, 2].sum() == 0 and labels[:, :2].sum(axis=0).all()  # normal never, the others present
    viewer, w = open_panels(make_napari_viewer)
    lab, tr = w["Patch labelling"], w["Training"]
    w["Project"].create_project(tmp_path / "p.wsss")
    lab.import_folder(tmp_path / "patches")
    tr.source.setCurrentText("imported patch folder")
    tiny_training_form(tr)
    shown = []
    warn = tr.warn
    tr.warn = lambda message, notify=True: (warn(message, notify), shown.append((message, tr.status.styleSheet())))
    tr.start()
    qtbot.waitUntil(lambda: bool(shown) or not tr.task.running, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not tr.task.running, timeout=WAIT_MS)
    assert any("no training patch is labelled normal" in m and "color" in style for m, style in shown), shown
    assert "finished" in tr.status.text(), tr.status.text()
