"""CAM-threshold slider -> pseudo-mask pixels on screen, redraw included (target: under 150 ms).

The Review panel of a real napari viewer (run it under Xvfb) shows a synthetic slide CAM canvas of
the size a 7000 x 3936 px slide view gets (the canvas's longer side is capped at 4096 px, so
4096 x 2304), 3 classes, smooth random CAMs, tissue on 80 % of it. Each measured move sets the
CAM-threshold slider to a new value and stops the clock once the panel has applied the new mask
to the layer (:func:`core.review.pseudo_updates` in the panel's worker: cached per-slide scores,
one comparison per pixel) *and* napari has rendered the canvas (``viewer.screenshot``, which
draws the scene and reads it back, so the figure is an upper bound of "pixels on screen"). Each
move is checked to change the rendered pixels. After the first whole mask the panel keeps the
tissue pixels sorted by score (:class:`core.review.ThresholdIndex`), so a threshold move changes
only the pixels between the old and the new threshold. The gating slider (new slide-level gating:
the per-slide scores are recomputed, then the whole mask) and the first draw are timed the same
way, for scale. "mask in the layer" stops the clock once the layer holds the new values and was
told to refresh; "on screen" once napari has also drawn it (under Xvfb napari draws with
software OpenGL, on the same shared CPUs).

    xvfb-run -a -s "-screen 0 1600x1200x24" python bench/bench_threshold.py [--width 7000 --height 3936] [--moves 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _canvas(shape: tuple[int, int], num_classes: int, tile: int):
    from napari_histo_wsss.core.review import CamCanvas

    rng = np.random.default_rng(0)
    h, w = shape
    tissue = np.ones(shape, bool)
    tissue[:, : w // 5] = False  # a strip of glass
    canvas = CamCanvas.empty(num_classes, shape, tile, downsample=4.0, tissue=tissue)
    coarse = rng.random((num_classes, h // 64 + 1, w // 64 + 1)).astype(np.float32)
    canvas.cams[:] = np.kron(coarse, np.ones((64, 64), np.float32))[:, :h, :w] * tissue
    canvas.weight[:] = 1.0
    canvas.probs[:] = rng.random(canvas.probs.shape).astype(np.float32)
    canvas.rgb[:] = np.array([200, 150, 190], np.uint8)  # H&E-like pink, no white glass
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=7000, help="slide view width (px)")
    ap.add_argument("--height", type=int, default=3936, help="slide view height (px)")
    ap.add_argument("--max-side", type=int, default=4096, help="the Review canvas's longer side at most")
    ap.add_argument("--moves", type=int, default=7)
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_histo_wsss.cli.gui import open_gui
    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.review import Corrections, uncertain_index
    from napari_histo_wsss.sample_data import sample_slide_path

    scale = min(1.0, args.max_side / max(args.width, args.height))
    shape = (int(round(args.height * scale)), int(round(args.width * scale)))
    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "bench.wsss", "wsss4luad", patch_size=64, target_mpp=2.0)
        project.add_slide(sample_slide_path())
        viewer, w = open_gui(project.root, viewer=napari.Viewer(show=True))
        rv = w["Review and correct"]
        classes = project.classes
        rv.white.setValue(255)  # the synthetic canvas has no glass to find: keep the white rule cheap and inert
        canvas = _canvas(shape, classes.num_classes, 512)
        rv._clear()
        rv.canvas = canvas
        rv.edits = Corrections(np.full(shape, uncertain_index(classes), np.uint8), classes.num_classes)
        rv.show_layers()
        viewer.reset_view()

        def idle() -> None:
            while rv.pseudo_task.running or rv._redraw_timer.isActive():
                app.processEvents()
                time.sleep(0.001)
            app.processEvents()

        def move(slider, value: int) -> tuple[float, float, np.ndarray]:
            idle()  # the previous move's follow-up work (the index after a whole mask) is done
            rv.redraw_seconds = None
            t0 = time.perf_counter()
            slider.setValue(value)  # as a drag does: the panel's own slot and debounce timer
            while rv.redraw_seconds is None:  # until the new mask is in the layer
                app.processEvents()
                time.sleep(0.001)
            applied = time.perf_counter() - t0
            shot = viewer.screenshot(canvas_only=True, flash=False)  # draws the scene and reads it back
            return applied, time.perf_counter() - t0, shot

        _a, first, last = move(rv.cam_thr, 25)  # first draw: per-slide scores, then the threshold index
        rows = []
        for name, slider, values in (("CAM threshold", rv.cam_thr, [30 + 5 * i for i in range(args.moves)]),
                                     ("gating", rv.gating, [40 + 5 * i for i in range(args.moves)])):
            applied, times, unchanged = [], [], 0
            for v in values:
                a, t, shot = move(slider, v)
                applied.append(a)
                times.append(t)
                unchanged += int(np.array_equal(shot, last))
                last = shot
            rows.append((name, statistics.median(applied), statistics.median(times), max(times), unchanged))
        idle()
        rv._dirty = False
        viewer.close()
    load = os.getloadavg()[0]
    print(f"slide view {args.width} x {args.height} px -> Review canvas {shape[1]} x {shape[0]} px, "
          f"{classes.num_classes} classes, napari {napari.__version__}, {os.cpu_count()} CPUs, load average "
          f"{load:.1f}; first draw {first * 1e3:.0f} ms\n")
    print("| slider move | mask in the layer, median ms | on screen, median ms | on screen, max ms | "
          "/ 150 ms target | moves that left the picture unchanged |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, applied, med, worst, unchanged in rows:
        print(f"| {name} | {applied * 1e3:.0f} | {med * 1e3:.0f} | {worst * 1e3:.0f} | {med / 0.15:.2f} | "
              f"{unchanged} of {args.moves} |")


if __name__ == "__main__":
    main()
