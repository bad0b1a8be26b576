"""Screenshots of each dock widget in use, for the README and docs/gui.md.

Drives the whole GUI flow on the shipped CMU-1-Small-Region slide exactly as a user would (panels
docked by ``histo-wsss gui``, the same widget methods the buttons call) and saves one window
screenshot per step into ``docs/img/``:

    project.png  labelling.png  live_labelling_gui.png  training.png  review.png  review-cams.png  correction.png  segmenter.png
    export.png

The review screenshots show the Review panel's defaults as they are (its "Review view"), and
the CAM layers once the panel's "Show CAM layers" box is ticked.

Patches are labelled by a simple stand-in for a pathologist: among the tissue patches, the
darkest (nuclei-dense) ones become tumor, the palest stroma, and a band in between normal; the
models train for a few epochs only, so the maps show the mechanics, not a finished model.

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots.py     (about 3-5 minutes on 2 cores)
    ... python docs/screenshots.py --no-training      (the shots before training only: about a minute)
    ... python docs/screenshots.py --patch-folder     (live_labelling_folder.png: the WSSS4LUAD patch folder)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "img"


def wait(app, cond, timeout: float = 900.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("step did not finish in time")
        app.processEvents()
        time.sleep(0.01)
    for _ in range(30):  # let napari draw
        app.processEvents()
        time.sleep(0.01)


def dock_of(widget):
    from qtpy.QtWidgets import QDockWidget

    w = widget
    while w is not None and not isinstance(w, QDockWidget):
        w = w.parentWidget()
    return w


def shot(viewer, app, widget, name: str) -> None:
    from qtpy.QtCore import Qt

    dock = dock_of(widget)
    if dock is not None:
        dock.raise_()
        dock.window().resizeDocks([dock], [470], Qt.Orientation.Horizontal)
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)
    OUT.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rgb = Image.fromarray(viewer.screenshot(canvas_only=False)).convert("RGB")
    # 256-colour palette PNG: a tenth of the size of the raw RGBA capture, sharp text kept
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(OUT / name, optimize=True)
    print("saved", OUT / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--no-training", action="store_true",
                    help="only the shots before training: project, labelling and live labelling")
    ap.add_argument("--patch-folder", action="store_true",
                    help="only live_labelling_folder.png: live labelling on the WSSS4LUAD patch folder")
    args = ap.parse_args()
    if args.patch_folder:
        patch_folder_shot()
        return

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_histo_wsss.cli.gui import open_gui
    from napari_histo_wsss.sample_data import sample_slide_path

    slide_path = sample_slide_path()
    with tempfile.TemporaryDirectory() as tmp:
        viewer = napari.Viewer(title="napari-histo-wsss", show=True)
        app = QApplication.instance()
        viewer, w = open_gui(viewer=viewer)
        dock_of(w["Project"]).window().resize(1700, 1050)  # a fixed size for comparable screenshots
        proj, lab, tr, rv, st, ex = (w[k] for k in ("Project", "Patch labelling", "Training", "Review and correct",
                                                    "Segmenter", "Export and metrics"))
        session = proj.session

        # -- project, slide, tissue and grid ------------------------------------------------------
        proj.classes.preset.setCurrentText("wsss4luad")
        proj.patch_size.setValue(64)
        proj.target_mpp.setValue(2.0)
        proj.path_edit.setText(str(Path(tmp) / "CMU-1.wsss"))
        proj.create_project(Path(tmp) / "CMU-1.wsss")
        proj.add_slide_file(slide_path)
        proj.detect_grid()
        wait(app, lambda: lab.overlay is not None)
        viewer.layers.selection.active = viewer.layers["patch grid"]
        shot(viewer, app, proj, "project.png")

        # -- labelling: darkest tissue patches tumor, palest stroma, a middle band normal ----------
        ov = lab.overlay
        grid = ov.grid
        with session.project.open_slide(session.slide_id) as slide:
            brightness = np.array([grid.read_patch(slide, i).mean() for i in range(len(grid))])
        order = np.argsort(brightness)
        n = len(order)
        picks = {0: order[: n // 6], 1: order[-n // 6:], 2: order[n // 2 - n // 12: n // 2 + n // 12]}
        for cls, idx in picks.items():
            ov.select(idx)
            ov.toggle_class(cls)
        ov.select(order[n // 6: n // 6 + 4])  # a live selection, as while labelling
        shot(viewer, app, lab, "labelling.png")
        ov.select(np.array([], dtype=np.int64))

        # -- live labelling: live pseudo-mask from the labels above, the next suggestions numbered ---
        live = lab.live
        live.enable_box.setChecked(True)
        wait(app, lambda: live.ready and live.head is not None)
        live.n_spin.setValue(8)
        live.suggest()
        viewer.reset_view()  # the whole slide: suggest() centred the view on the first suggestion
        viewer.layers.selection.active = viewer.layers["patch grid"]
        shot(viewer, app, lab, "live_labelling_gui.png")
        live.enable_box.setChecked(False)
        if args.no_training:
            viewer.close()
            return

        # -- training ------------------------------------------------------------------------------
        tr.method.setCurrentText("segmix")
        tr.epochs.setValue(args.epochs)
        tr.batch_size.setValue(16)
        tr.device.setCurrentText("cpu")
        tr.start()
        wait(app, lambda: tr.task.last_event is not None and getattr(tr.task.last_event, "epoch", 0) >= 2)
        shot(viewer, app, tr, "training.png")  # mid-run: progress, ETA and the live plot
        wait(app, lambda: not tr.task.running)

        # -- review: CAMs and the pseudo-mask --------------------------------------------------------
        rv._refresh_runs()
        rv.device.setCurrentText("cpu")
        rv.compute()
        wait(app, lambda: not rv.task.running and not rv.pseudo_task.running and not rv.save_task.running)
        shot(viewer, app, rv, "review.png")  # the review view as the panel leaves it, nothing adjusted
        rv.show_cams.setChecked(True)  # the panel's "Show CAM layers" box
        shot(viewer, app, rv, "review-cams.png")
        rv.show_cams.setChecked(False)

        # -- correction: paint a region with "normal", mark the upper half reviewed ---------------
        pm = viewer.layers["pseudo-mask"]
        rv.paint_class.setCurrentText("normal")
        h, wd = pm.data.shape
        pm.brush_size = 40
        for k in range(12):
            pm.paint((int(h * 0.45) + 6 * k, int(wd * 0.4) + 4 * k), pm.selected_label)
        rv.mark_reviewed((0, 0, h // 2, wd))
        pm.mode = "paint"
        wait(app, lambda: not rv.save_task.running and not rv._dirty, 60)
        shot(viewer, app, rv, "correction.png")

        # -- segmenter: train on the corrected pseudo-masks, predict the slide -----------------------
        st._refresh_data()
        st.epochs.setValue(2)
        st.batch_size.setValue(8)
        st.device.setCurrentText("cpu")
        st.synthesis.setChecked(True)
        st.start()
        wait(app, lambda: not st.task.running)
        st.pred_tile.setValue(256)
        st.predict()
        wait(app, lambda: not st.pred_task.running)
        pm.visible = False
        viewer.layers["reviewed"].visible = False
        viewer.layers.selection.active = viewer.layers["prediction"]
        shot(viewer, app, st, "segmenter.png")

        # -- export and metrics: the prediction scored against the corrected pseudo-mask -------------
        ex.source.setCurrentText("prediction")
        ex.folder.setText(str(Path(tmp) / "export"))
        ex.format_boxes["png"].setChecked(True)
        ex.export()
        wait(app, lambda: not ex.task.running)
        ex.gt.setCurrentText("pseudo-mask")
        ex.score()
        shot(viewer, app, ex, "export.png")
        viewer.close()


def patch_folder_shot() -> None:
    """live_labelling_folder.png: the shared WSSS4LUAD validation images (all sizes) added as one
    patch folder, twelve suggested patches labelled by a stand-in pathologist (every class covering
    at least 5 % of the patch in the image's ground-truth mask), the live pseudo-mask and the next
    suggestions."""
    import os

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_histo_wsss.cli.gui import open_gui

    data = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    folder = data / "wsss4luad-subset" / "val" / "img"
    with tempfile.TemporaryDirectory() as tmp:
        viewer = napari.Viewer(title="napari-histo-wsss", show=True)
        app = QApplication.instance()
        viewer, w = open_gui(viewer=viewer)
        dock_of(w["Project"]).window().resize(1700, 1050)
        proj, lab = w["Project"], w["Patch labelling"]
        proj.classes.preset.setCurrentText("wsss4luad")
        proj.patch_size.setValue(128)
        proj.target_mpp.setValue(0)  # the PNGs state no pixel size
        proj.create_project(Path(tmp) / "wsss4luad.wsss")
        sid = proj.add_slide_file(folder)
        proj.detect_grid()
        wait(app, lambda: lab.overlay is not None)
        ov, live = lab.overlay, lab.live
        live.enable_box.setChecked(True)
        wait(app, lambda: live.ready)
        with proj.session.project.open_slide(sid) as sheet:
            regions = list(sheet.regions)
        live.n_spin.setValue(12)
        for i in live.suggest():
            x, y, s = int(ov.grid.x[i]), int(ov.grid.y[i]), ov.grid.size0
            r = next(r for r in regions if r.x <= x < r.x + r.width and r.y <= y < r.y + r.height)
            m = np.asarray(Image.open(folder.parent / "mask" / r.name))[y - r.y:y - r.y + s, x - r.x:x - r.x + s]
            ov.select(np.array([i]))
            for c in range(3):
                if (m == c).mean() >= 0.05:
                    ov.toggle_class(c)
        wait(app, lambda: live.head is not None and live.head.n_labels == 12)
        live.n_spin.setValue(8)
        live.suggest()
        viewer.reset_view()
        viewer.layers.selection.active = viewer.layers["patch grid"]
        shot(viewer, app, lab, "live_labelling_folder.png")
        viewer.close()


if __name__ == "__main__":
    main()
