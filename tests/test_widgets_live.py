"""Live labelling in a real viewer: feature cache in the background, live pseudo-mask after each label,
suggestions driven from the keyboard (N, number keys, Enter)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")
from _widget_helpers import WAIT_MS, make_project_with_grid, open_panels, press  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_histo_wsss.cli import main  # noqa: E402
from napari_histo_wsss.widgets._live import LIVE_LAYER, SUGGEST_LAYER  # noqa: E402


def test_live_cams_follow_labels_and_keys_walk_the_suggestions(make_napari_viewer, qtbot, tmp_path, cmu_svs):
    viewer, w = open_panels(make_napari_viewer)
    project = make_project_with_grid(qtbot, w, tmp_path / "p", cmu_svs)
    lab = w["Patch labelling"]
    live, ov = lab.live, lab.overlay
    live.enable_box.setChecked(True)
    # the live layer is made at once, empty, in answer to the tick (not on the GUI thread at the first refit)
    assert LIVE_LAYER in viewer.layers and not viewer.layers[LIVE_LAYER].data.any()
    empty = viewer.layers[LIVE_LAYER]
    qtbot.waitUntil(lambda: live.ready, timeout=WAIT_MS)
    assert any(project.features_dir(project_slide(project)).glob("*.zarr"))  # cached in the project
    assert empty.data.shape == live.features.shape  # placed where the feature map will be
    qtbot.waitUntil(lambda: "no labelled patch yet" in live.status.text(), timeout=WAIT_MS)

    # cold start: a diverse first batch from the keyboard
    live.n_spin.setValue(4)
    batch = live.suggest()
    assert len(batch) == 4 and len(set(batch)) == 4 and live.list.count() == 4
    assert ov.selection().tolist() == [batch[0]]
    grid_layer = ov.layer
    # the ranking as a layer: a numbered ring on each suggested patch, the grid layer still active
    marks = viewer.layers[SUGGEST_LAYER]
    assert len(marks.data) == 4 and list(marks.features["rank"]) == ["1", "2", "3", "4"]
    assert viewer.layers.selection.active.name == grid_layer.name
    # the headless twin suggests the same first batch
    sid = project_slide(project)
    assert main(["suggest", str(project.root), "--n", "4", "--slide", sid, "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(int(ov.grid.x[i]), int(ov.grid.y[i])) for i in batch]
    viewer.layers.selection.active = grid_layer
    press(qtbot, viewer, Qt.Key.Key_1)  # tumour on the first suggestion
    assert ov.labels[batch[0], 0] == 1
    press(qtbot, viewer, Qt.Key.Key_Return)  # confirm: on to the second
    assert ov.selection().tolist() == [batch[1]]
    press(qtbot, viewer, Qt.Key.Key_2)  # stroma on it
    press(qtbot, viewer, Qt.Key.Key_Return)
    assert ov.selection().tolist() == [batch[2]]
    press(qtbot, viewer, Qt.Key.Key_Return)  # no class yet: stays, and says why
    assert ov.selection().tolist() == [batch[2]]
    assert list(viewer.layers[SUGGEST_LAYER].features["rank"]) == ["3", "4"]  # labelled ones are gone

    # the live pseudo-mask follows the labels
    qtbot.waitUntil(lambda: live.head is not None and viewer.layers[LIVE_LAYER] is not None, timeout=WAIT_MS)
    layer = viewer.layers[LIVE_LAYER]
    assert layer is empty  # filled in place, not made again
    values = set(np.unique(layer.data).tolist())
    assert values & {1, 2}, values  # tumour and/or stroma cells
    assert layer.data.shape == live.features.shape
    assert viewer.layers.index(layer) < viewer.layers.index(grid_layer)  # below the grid
    before = layer.data.copy()
    # label everything the top half of the slide as stroma, the bottom as tumour: the map must change
    top = ov.grid.y < np.median(ov.grid.y)
    ov.select(np.flatnonzero(top)[:10])
    ov.toggle_class(1)
    ov.select(np.flatnonzero(~top)[:10])
    ov.toggle_class(0)
    qtbot.waitUntil(lambda: live.head is not None and live.head.n_labels >= 20, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not np.array_equal(viewer.layers[LIVE_LAYER].data, before), timeout=WAIT_MS)
    assert live.last_update_s is not None and live.last_update_s < 5
    # labels were saved to the project as usual
    assert len(project.patch_labels()) >= 20

    # a burst of labels faster than the head refits: the refits queued behind a running one are
    # skipped (only the newest labels are fitted), so the layer catches up instead of lagging
    import threading
    import time as _time

    from napari_histo_wsss.core.stage1.live import LiveHead

    fits, real_fit = [], LiveHead.fit

    def slow_fit(self, x, y):
        fits.append(len(x))
        _time.sleep(0.3)
        return real_fit(self, x, y)

    LiveHead.fit = slow_fit
    try:
        free = [i for i in np.flatnonzero(~np.asarray(ov.labels).any(axis=1))][:6]
        n0 = int(np.asarray(ov.labels).any(axis=1).sum())
        for i in free:
            ov.select([i])
            ov.toggle_class(1)
        qtbot.waitUntil(lambda: live.head is not None and live.head.n_labels == n0 + len(free), timeout=WAIT_MS)
        qtbot.waitUntil(lambda: not any(t.name == "histo-wsss-live-head" for t in threading.enumerate()),
                        timeout=WAIT_MS)
    finally:
        LiveHead.fit = real_fit
    assert fits[-1] == n0 + len(free) and len(fits) < len(free), fits

    # once the project holds a trained stage-one run and the comparison is ticked, Suggest first computes
    # that classifier's view of every patch in the background and then ranks with the disagreement; the
    # headless twin (--run newest) agrees
    from napari_histo_wsss.core.review import list_runs
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

    cfg = TrainConfig(method="cam", epochs=1, steps=10, batch_size=4, weights="imagenet", device="cpu", patch_size=32,
                      synth_share=0.0)
    for _ev in train_classifier(project.root, project.runs_dir / "cls-live", cfg):
        pass
    qtbot.waitUntil(lambda: live.head is not None and live.head.n_labels == len(project.patch_labels()), timeout=WAIT_MS)
    live.n_spin.setValue(5)
    assert not live.compare_box.isChecked()  # off by default: no run is read
    live.suggest_btn.click()
    qtbot.waitUntil(lambda: live.list.count() == 5, timeout=WAIT_MS)
    assert live._trained is None and not any("trained:" in live.list.item(i).text() for i in range(5))
    live.compare_box.setChecked(True)
    live.suggest_btn.click()
    qtbot.waitUntil(lambda: live._trained is not None and live.list.count() == 5, timeout=WAIT_MS)
    assert live._trained[2].shape == (len(ov.grid.x), project.classes.num_classes)
    assert all("trained:" in live.list.item(i).text() for i in range(live.list.count()))
    shown = list(live.queue)
    assert main(["suggest", str(project.root), "--n", "5", "--slide", sid, "--run", "newest", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(int(ov.grid.x[i]), int(ov.grid.y[i])) for i in shown]
    assert all(r["trained"] for r in rows)
    # a newer run: when the batch runs out, N computes that classifier's view first, then the batch
    for _ev in train_classifier(project.root, project.runs_dir / "cls-live2", cfg):
        pass
    live.queue.clear()
    assert live.next() is None  # what N does: the new run's view is computed first ...
    try:  # ... then the batch follows
        qtbot.waitUntil(lambda: live._trained[0].name == "cls-live2" and len(live.queue) == 5, timeout=WAIT_MS)
    except Exception as e:  # noqa: BLE001 - say what the panel was left with
        raise AssertionError(f"run {live._trained[0].name}, queue {live.queue}, status {live.status.text()!r}, "
                             f"runs {[p.name for p in list_runs(project.runs_dir, 'cls-')]}") from e
    assert ov.selection().tolist() == [live.queue[0]]


def project_slide(project) -> str:
    return next(iter(project.slides))


def test_live_labelling_on_a_wsss4luad_patch_folder(make_napari_viewer, qtbot, tmp_path, wsss4luad_dir):
    """A pathologist's patch folder (the WSSS4LUAD images, all sizes): added with 'Add patch folder',
    shown as one contact sheet, labelled from the keyboard along the suggestions, the live pseudo-mask
    following the labels; the headless suggest gives the panel's batch."""
    viewer, w = open_panels(make_napari_viewer)
    proj = w["Project"]
    proj.patch_size.setValue(128)
    proj.target_mpp.setValue(0)  # the PNGs state no pixel size: level 0
    folder = tmp_path / "wsss4luad-val"  # a link: the shared images are read in place
    folder.symlink_to(wsss4luad_dir / "val" / "img", target_is_directory=True)
    project = proj.create_project(tmp_path / "p")
    sid = proj.add_slide_file(folder)
    layer = viewer.layers[-1]
    assert layer.metadata["format"] == "patch folder" and len(layer.metadata["files"]) == 31
    assert layer.ndim == 2 and layer.rgb  # one sheet, not a stack
    proj.detect_grid()
    qtbot.waitUntil(lambda: w["Patch labelling"].overlay is not None, timeout=WAIT_MS)
    lab = w["Patch labelling"]
    live, ov = lab.live, lab.overlay
    assert len(ov.grid) > 100
    live.enable_box.setChecked(True)
    qtbot.waitUntil(lambda: live.ready, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "no labelled patch yet" in live.status.text(), timeout=WAIT_MS)

    live.n_spin.setValue(4)
    batch = live.suggest()
    assert len(batch) == 4
    assert main(["suggest", str(project.root), "--n", "4", "--slide", sid, "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(int(ov.grid.x[i]), int(ov.grid.y[i])) for i in batch]

    # follow three suggestions with keys only: a class key, then Enter
    viewer.layers.selection.active = ov.layer
    for step, key in enumerate((Qt.Key.Key_1, Qt.Key.Key_2, Qt.Key.Key_1)):
        assert ov.selection().tolist() == [batch[step]]
        press(qtbot, viewer, key)
        press(qtbot, viewer, Qt.Key.Key_Return)
    assert ov.selection().tolist() == [batch[3]]
    assert ov.labels[batch[0], 0] == 1 and ov.labels[batch[1], 1] == 1 and ov.labels[batch[2], 0] == 1
    qtbot.waitUntil(lambda: live.head is not None and live.head.n_labels == 3 and LIVE_LAYER in viewer.layers,
                    timeout=WAIT_MS)
    mask = viewer.layers[LIVE_LAYER]
    assert mask.data.shape == live.features.shape
    before = mask.data.copy()
    press(qtbot, viewer, Qt.Key.Key_2)  # a fourth label: the live pseudo-mask changes
    qtbot.waitUntil(lambda: live.head.n_labels == 4, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not np.array_equal(viewer.layers[LIVE_LAYER].data, before), timeout=WAIT_MS)
    # labels went to the project, tied to the sheet's images
    table = project.patch_labels(sid)
    assert len(table) == 4
    with project.open_slide(sid) as sheet:
        boxes = [(r.x, r.y, r.x + r.width, r.y + r.height) for r in sheet.regions]
    assert all(any(a <= x < c and b <= y < d for a, b, c, d in boxes) for x, y in zip(table.x, table.y))
    # the live pseudo-mask of the folder exported as the folder's own masks: one PNG per image
    from PIL import Image

    ex = w["Export and metrics"]
    ex.source.setCurrentText(LIVE_LAYER)
    [out] = ex.export(["png-images"], tmp_path / "export")
    qtbot.waitUntil(lambda: not ex.task.running, timeout=WAIT_MS)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(layer.metadata["files"])
    for f in files[::10]:
        assert Image.open(f).size == Image.open(wsss4luad_dir / "val" / "img" / f.name).size
    live_data = np.asarray(viewer.layers[LIVE_LAYER].data)
    cell = live.features.cell0
    with project.open_slide(sid) as sheet:
        for r in sheet.regions[::6]:  # class index = live value - 1; uncertain and off-tissue cells background
            png = np.asarray(Image.open(out / f"{r.name[:-4]}.png"))
            assert set(np.unique(png).tolist()) <= {0, 1, 2, 3}
            cy, cx = r.y + r.height // 2, r.x + r.width // 2
            v = int(live_data[int(cy // cell), int(cx // cell)])
            assert png[r.height // 2, r.width // 2] == (v - 1 if 1 <= v <= 3 else 3)
