"""Does the napari event loop keep running while the plugin trains and computes CAMs?

A probe QTimer fires every ``--tick`` ms on the GUI thread and records the gap between firings;
the longest gap is the longest stall a user would feel (a frozen viewer). Measured side by side in
one run on the real CMU-1-Small-Region.svs, with the plugin's panels docked in a real viewer:

* ``idle``: nothing running (the floor of this machine and display);
* ``training (worker)``: the Training panel's Start, i.e. ``core.train.train_classifier`` in the
  panel's background worker, progress bar, live loss plot (what the plugin does);
* ``CAMs (worker)``: the Review panel's Compute CAMs, tiles arriving and drawn progressively;
* ``training (GUI thread)``: the same training generator consumed on the GUI thread between
  ``processEvents`` calls (the naive way a widget could do it), for contrast.

Then the live threshold sliders on synthetic canvases of growing size, whole mask in view or zoomed
in: time from a slider move until the tiles in view are redrawn and until all are, and the longest
event-loop stall meanwhile (``ReviewWidget.recompute_pseudo``: core pseudo-masks tile by tile in a
background worker, tiles in view first, cached white-glass masks, throttled layer refresh).

    xvfb-run -a -s "-screen 0 1600x1200x24" python bench/bench_gui_stall.py
    (results and the exact command: docs/benchmarks/gui.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _probe(tick_ms: int, until: Callable[[], bool], max_s: float) -> dict:
    """Run Qt's event loop until ``until()`` (checked on every tick); return the stall statistics
    of a ``tick_ms`` probe timer (gaps between its firings)."""
    from qtpy.QtCore import QEventLoop, QTimer

    gaps: list[float] = []
    t0 = time.perf_counter()
    last = [t0]
    loop = QEventLoop()

    def on_tick() -> None:
        now = time.perf_counter()
        gaps.append((now - last[0]) * 1000.0)
        last[0] = now
        if until() or now - t0 > max_s:
            loop.quit()

    timer = QTimer()
    timer.setInterval(tick_ms)
    timer.timeout.connect(on_tick)
    timer.start()
    loop.exec()
    timer.stop()
    g = np.array(gaps[1:] or [0.0])
    return {"seconds": time.perf_counter() - t0, "ticks": len(g), "max_ms": float(g.max()),
            "p99_ms": float(np.percentile(g, 99)), "median_ms": float(np.median(g))}


def _labelled_project(root: Path, slide: Path, patch: int, mpp: float, per_class: int):
    from napari_histo_wsss.core.data.project import Project

    project = Project.create(root, "wsss4luad", patch_size=patch, target_mpp=mpp)
    sid = project.add_slide(slide)
    grid = project.grid(sid)
    top = grid.y < np.median(grid.y)
    for idx, lab in ((np.flatnonzero(top)[:per_class], [0, 1, 0]), (np.flatnonzero(~top)[:per_class], [1, 0, 0])):
        project.set_patch_labels(sid, grid.x[idx], grid.y[idx], grid.size0, np.array(lab))
    return project, sid


def _job_rows(args: argparse.Namespace, project, w) -> list[tuple[str, dict]]:
    """Stalls while the Training panel trains, while the Review panel computes CAMs (both in their
    background workers), and while the same training runs on the GUI thread."""
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

    rows = []
    tr = w["Training"]
    tr.method.setCurrentText("segmix")
    tr.epochs.setValue(args.epochs)
    tr.batch_size.setValue(8)
    tr.device.setCurrentText("cpu")
    tr.start()
    rows.append(("training (worker)", _probe(args.tick, lambda: not tr.task.running, 900)))

    rv = w["Review and correct"]
    rv.tile.setValue(256)
    rv.device.setCurrentText("cpu")
    rv._refresh_runs()
    rv.compute()
    rows.append(("CAMs (worker)", _probe(args.tick, lambda: not rv.task.running, 900)))

    cfg = TrainConfig(method="segmix", epochs=args.epochs, batch_size=8, device="cpu", patch_size=args.patch)
    gen = train_classifier(project.root, project.runs_dir / "cls-gui-thread", cfg)
    done = [False]

    def step_on_gui_thread() -> bool:
        try:
            next(gen)  # one training step (or event) runs on the GUI thread
        except StopIteration:
            done[0] = True
        return done[0]

    rows.append(("training (GUI thread)", _probe(args.tick, step_on_gui_thread, 900)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--patch", type=int, default=64, help="patch size (px) of the project")
    ap.add_argument("--mpp", type=float, default=2.0, help="working resolution (um/px)")
    ap.add_argument("--per-class", type=int, default=24, help="labelled patches per class")
    ap.add_argument("--tick", type=int, default=10, help="probe timer interval (ms)")
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--only-redraw", action="store_true", help="skip the training and CAM rows")
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_histo_wsss.cli.gui import open_gui
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier
    from napari_histo_wsss.sample_data import sample_slide_path
    from napari_histo_wsss.core.review import CamCanvas, Corrections

    slide = sample_slide_path()
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        project, sid = _labelled_project(Path(tmp) / "bench.wsss", slide, args.patch, args.mpp, args.per_class)
        # warm-up (first-use costs of torch/oneDNN kernels, slide caches) so that both training rows
        # below measure the same steady-state work
        warm = TrainConfig(method="segmix", epochs=1, batch_size=8, device="cpu", patch_size=args.patch)
        for _ev in train_classifier(project.root, project.runs_dir / "cls-warmup", warm) if not args.only_redraw else ():
            pass
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        viewer, w = open_gui(project.root, viewer=viewer)
        session = w["Project"].session
        w["Project"].detect_grid()
        _probe(args.tick, lambda: session.grid is not None, 120)

        rows.append(("idle", _probe(args.tick, lambda: False, args.idle_s)))
        rv = w["Review and correct"]

        if not args.only_redraw:
            rows += _job_rows(args, project, w)

        # live slider redraws on synthetic canvases (3 classes, random CAMs, light background)
        redraw: list[tuple[str, int, dict]] = []
        rng = np.random.default_rng(0)
        classes = project.classes
        for side in (1024, 2048, 4096):
            canvas = CamCanvas.empty(classes.num_classes, (side, side), 512, 4.0)
            canvas.cams[:] = rng.random(canvas.cams.shape, dtype=np.float32)
            canvas.probs[:] = rng.random(canvas.probs.shape, dtype=np.float32)
            canvas.rgb[:] = rng.integers(120, 256, canvas.rgb.shape, dtype=np.uint8)
            rv._clear()
            rv.canvas = canvas
            rv.edits = Corrections(np.full((side, side), classes.background_index, np.uint8), classes.num_classes)
            rv.show_layers()
            for view in ("whole mask", "zoomed (1024 px)"):
                layer = rv.mask_layer
                viewer.reset_view()
                if view != "whole mask":
                    viewer.camera.center = tuple(np.asarray(layer.data_to_world((side / 2, side / 2)))[-2:])
                    viewer.camera.zoom *= side / 1024
                _probe(args.tick, lambda: False, 0.5)  # draw, so that napari knows what is in view
                stats = []
                for v in (30, 40, 50, 60, 70):
                    seen: list[float] = []

                    def hook(_ev, seen=seen) -> None:
                        seen.append(time.perf_counter())

                    rv.pseudo_task.event.connect(hook)
                    rv.cam_thr.blockSignals(True)
                    rv.cam_thr.setValue(v)
                    rv.cam_thr.blockSignals(False)
                    t0 = time.perf_counter()
                    rv.recompute_pseudo()
                    n_view = rv.tiles_in_view
                    probe = _probe(args.tick, lambda: not rv.pseudo_task.running, 120)
                    rv.pseudo_task.event.disconnect(hook)
                    stats.append({"visible_ms": (seen[n_view - 1] - t0) * 1000 if n_view and len(seen) >= n_view else 0.0,
                                  "tiles_visible": n_view, "all_ms": (time.perf_counter() - t0) * 1000,
                                  "max_stall_ms": probe["max_ms"]})
                redraw.append((view, side, {k: float(np.median([x[k] for x in stats])) for k in stats[0]}))
        rv._dirty = False
        viewer.close()

    idle = rows[0][1]["max_ms"]
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, napari "
          f"{napari.__version__}, probe every {args.tick} ms; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"(the machine is shared)")
    print(f"{'job':<24}{'seconds':>9}{'ticks':>8}{'median ms':>11}{'p99 ms':>9}{'max stall ms':>14}{'max / idle':>12}")
    for name, r in rows:
        print(f"{name:<24}{r['seconds']:>9.1f}{r['ticks']:>8d}{r['median_ms']:>11.1f}{r['p99_ms']:>9.1f}"
              f"{r['max_ms']:>14.1f}{r['max_ms'] / max(idle, 1e-9):>12.1f}")
    print()
    print("threshold slider -> pseudo-mask redrawn (median of 5 slider moves, 512-px tiles, background worker)")
    print(f"{'canvas':<13}{'view':<19}{'tiles in view':>14}{'view ms':>9}{'all ms':>9}{'max stall ms':>14}")
    for view, side, r in redraw:
        print(f"{f'{side} x {side}':<13}{view:<19}{r['tiles_visible']:>14.0f}{r['visible_ms']:>9.0f}{r['all_ms']:>9.0f}"
              f"{r['max_stall_ms']:>14.1f}")


if __name__ == "__main__":
    main()
