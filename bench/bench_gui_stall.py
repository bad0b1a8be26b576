"""Does the napari event loop keep running while the plugin trains and computes CAMs?

A probe QTimer fires every ``--tick`` ms on the GUI thread and records the gap between firings;
the longest gap is the longest stall a user would feel (a frozen viewer). Measured side by side in
one run on the real CMU-1-Small-Region.svs, with the plugin's panels docked in a real viewer:

* ``idle``: nothing running (the floor of this machine and display);
* ``training (worker)``: the Training panel's Start, i.e. ``core.stage1.train.train_classifier`` in the
  panel's background worker, progress bar, live loss plot (what the plugin does);
* ``CAMs (worker)``: the Review panel's Compute CAMs, tiles arriving and drawn progressively;
* ``CAMs, default tile``: Compute CAMs again with the panel's default tile;
* ``CAMs, Cancel``: Compute CAMs again (256 px tiles), Cancel pressed as soon as the first tile
  is drawn;
* ``training (GUI thread)``: the same training generator consumed on the GUI thread between
  ``processEvents`` calls (the naive way a widget could do it), for contrast.

For the CAM rows: the probe runs across the press of Compute, so the longest stall includes
Compute itself and the layers it adds (the first row is the slide's first Compute, the others
recomputes, which refill the layers in place); also the time the Compute call takes, the time
from Compute to the first tile applied to the layers (napari paints it at its next redraw;
target under 3 s), and for the last the time from Cancel until the job has ended (target 2 s or
less).

Then the time ``viewer.close()`` takes while each long job runs (training, CAMs, stage two in its
synthesis phase; target 2 s): every panel stops its jobs when the window goes.

Then the live CAM-threshold slider on synthetic canvases of growing size: time from a slider move
until the whole mask is applied to the layer, and the longest event-loop stall meanwhile
(``ReviewWidget.recompute_pseudo``: the slide's mask from cached per-slide scores in a background
worker, one comparison per pixel, applied and refreshed once). ``bench_threshold.py`` times the
same move up to the rendered picture.

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


def _timed_cams(args: argparse.Namespace, rv, cancel: bool) -> dict:
    """Compute CAMs in the Review panel; the stall statistics plus ``first_tile_s`` (Compute to the
    first tile applied to the layers) and, with ``cancel`` (pressed once that tile is drawn),
    ``cancel_s`` (Cancel to the job's end)."""
    from qtpy.QtCore import QTimer

    from napari_histo_wsss.core.review import CamTile

    marks: dict[str, float] = {}

    def on_event(ev) -> None:  # connected after the panel's own slot: the tile is already applied
        if isinstance(ev, CamTile) and "first_tile_s" not in marks:
            marks["first_tile_s"] = time.perf_counter() - t0
            if cancel:
                marks["cancelled_at"] = time.perf_counter()
                rv._on_cancel()

    def ended() -> bool:
        if "compute_call_s" not in marks or rv.task.running:
            return False
        marks.setdefault("ended_at", time.perf_counter())
        return True

    def press() -> None:
        nonlocal t0
        t0 = time.perf_counter()
        rv.compute()
        marks["compute_call_s"] = time.perf_counter() - t0

    t0 = 0.0
    rv.task.event.connect(on_event)
    # the probe runs across the press: its longest gap includes Compute itself and the layers
    # added after it (napari's processEvents inside Compute lets the probe tick, as the user's
    # clicks would be served)
    QTimer.singleShot(50, press)
    row = _probe(args.tick, lambda: "compute_call_s" in marks and ended() and not rv._pending_layers, 900)
    row["compute_call_s"] = marks["compute_call_s"]
    rv.task.event.disconnect(on_event)
    row["first_tile_s"] = marks.get("first_tile_s", float("nan"))
    if cancel:
        row["cancel_s"] = marks.get("ended_at", float("nan")) - marks.get("cancelled_at", float("nan"))
    return row


def _job_rows(args: argparse.Namespace, project, w) -> list[tuple[str, dict]]:
    """Stalls while the Training panel trains, while the Review panel computes CAMs (both in their
    background workers), and while the same training runs on the GUI thread."""
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

    rows = []
    tr = w["Training"]
    tr.method.setCurrentText("segmix")
    tr.epochs.setValue(args.epochs)
    tr.steps.setValue(args.steps)
    tr.batch_size.setValue(8)
    tr.device.setCurrentText("cpu")
    tr.start()
    rows.append(("training (worker)", _probe(args.tick, lambda: not tr.task.running, 900)))

    rv = w["Review and correct"]
    rv.tile.setValue(256)
    rv.device.setCurrentText("cpu")
    rv._refresh_runs()
    rows.append(("CAMs (worker)", _timed_cams(args, rv, cancel=False)))
    from napari_histo_wsss.core.review import ReviewSettings

    rv.tile.setValue(ReviewSettings().tile)  # the panel's default
    rows.append(("CAMs, default tile", _timed_cams(args, rv, cancel=False)))
    rv.tile.setValue(256)
    rows.append(("CAMs, Cancel", _timed_cams(args, rv, cancel=True)))

    cfg = TrainConfig(method="segmix", epochs=args.epochs, steps=args.steps, batch_size=8, device="cpu",
                      patch_size=args.patch)
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


def _close_rows(args: argparse.Namespace, project) -> list[tuple[str, float]]:
    """Seconds ``viewer.close()`` takes while each long job runs (target 2 s): a fresh viewer on
    the project per job, the job started from its panel and closed once its first progress event
    is in (training: a step; CAMs: a tile; stage two: its synthesis phase under way)."""
    import napari

    from napari_histo_wsss.cli.gui import open_gui

    def started(task) -> Callable[[], bool]:
        return lambda: task.last_event is not None or not task.running

    rows = []
    for job in ("training", "CAMs", "stage two (synthesis phase)"):
        viewer, w = open_gui(project.root, viewer=napari.Viewer(show=True))
        session = w["Project"].session
        w["Project"].detect_grid()
        _probe(args.tick, lambda s=session: s.grid is not None, 120)
        if job == "training":
            panel = w["Training"]
            panel.epochs.setValue(50)
            panel.device.setCurrentText("cpu")
            panel.start()
        elif job == "CAMs":
            panel = w["Review and correct"]
            panel.runs.setCurrentIndex(panel.runs.findText("cls-gui-thread"))
            panel.tile.setValue(256)
            panel.device.setCurrentText("cpu")
            panel.compute()
        else:
            panel = w["Segmenter"]
            panel.epochs.setValue(50)
            panel.device.setCurrentText("cpu")
            panel.start()
        task = panel.task
        _probe(args.tick, started(task), 300)
        running = task.running
        t0 = time.perf_counter()
        viewer.close()
        rows.append((job + ("" if running else " (ended before the close)"), time.perf_counter() - t0))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each training row (all epochs)")
    ap.add_argument("--patch", type=int, default=64, help="patch size (px) of the project")
    ap.add_argument("--mpp", type=float, default=2.0, help="working resolution (um/px)")
    ap.add_argument("--per-class", type=int, default=24, help="labelled patches per class")
    ap.add_argument("--tick", type=int, default=10, help="probe timer interval (ms)")
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--only-redraw", action="store_true", help="skip the training and CAM rows")
    args = ap.parse_args()

    import napari
    import torch

    from napari_histo_wsss.cli.gui import open_gui
    from napari_histo_wsss.core.review import CamCanvas, Corrections
    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier
    from napari_histo_wsss.sample_data import sample_slide_path

    slide = sample_slide_path()
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        project, sid = _labelled_project(Path(tmp) / "bench.wsss", slide, args.patch, args.mpp, args.per_class)
        # warm-up (first-use costs of torch/oneDNN kernels, slide caches) so that both training rows
        # below measure the same steady-state work
        warm = TrainConfig(method="segmix", epochs=1, steps=20, batch_size=8, device="cpu", patch_size=args.patch)
        for _ev in train_classifier(project.root, project.runs_dir / "cls-warmup", warm) if not args.only_redraw else ():
            pass
        viewer = napari.Viewer(show=True)
        viewer, w = open_gui(project.root, viewer=viewer)
        session = w["Project"].session
        w["Project"].detect_grid()
        _probe(args.tick, lambda: session.grid is not None, 120)

        rows.append(("idle", _probe(args.tick, lambda: False, args.idle_s)))
        rv = w["Review and correct"]

        if not args.only_redraw:
            rows += _job_rows(args, project, w)

        # live slider redraws on synthetic canvases (3 classes, random CAMs, light background):
        # how long the GUI thread stalls while the panel redraws (bench_threshold.py times the redraw)
        redraw: list[tuple[str, int, dict]] = []
        rng = np.random.default_rng(0)
        classes = project.classes
        for side in (1024, 2048, 4096):
            canvas = CamCanvas.empty(classes.num_classes, (side, side), 512, 4.0)
            canvas.cams[:] = rng.random(canvas.cams.shape, dtype=np.float32)
            canvas.weight[:] = 1.0
            canvas.probs[:] = rng.random(canvas.probs.shape, dtype=np.float32)
            canvas.rgb[:] = rng.integers(120, 256, canvas.rgb.shape, dtype=np.uint8)
            rv._clear()
            rv.canvas = canvas
            rv.edits = Corrections(np.full((side, side), classes.background_index, np.uint8), classes.num_classes)
            rv.show_layers()
            viewer.reset_view()
            rv.recompute_pseudo()  # the first draw fills the per-slide score cache
            _probe(args.tick, lambda: not rv.pseudo_task.running, 120)
            stats = []
            for v in (30, 40, 50, 60, 70):
                rv.cam_thr.blockSignals(True)
                rv.cam_thr.setValue(v)
                rv.cam_thr.blockSignals(False)
                t0 = time.perf_counter()
                rv.recompute_pseudo()
                probe = _probe(args.tick, lambda: not rv.pseudo_task.running, 120)
                stats.append({"all_ms": (time.perf_counter() - t0) * 1000, "max_stall_ms": probe["max_ms"]})
            redraw.append(("whole mask", side, {k: float(np.median([x[k] for x in stats])) for k in stats[0]}))
        rv._dirty = False
        viewer.close()
        closes = _close_rows(args, project) if not args.only_redraw else []

    idle = rows[0][1]["max_ms"]
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, napari "
          f"{napari.__version__}, probe every {args.tick} ms; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"(the machine is shared)")
    print(f"{'job':<24}{'seconds':>9}{'ticks':>8}{'median ms':>11}{'p99 ms':>9}{'max stall ms':>14}{'max / idle':>12}")
    for name, r in rows:
        print(f"{name:<24}{r['seconds']:>9.1f}{r['ticks']:>8d}{r['median_ms']:>11.1f}{r['p99_ms']:>9.1f}"
              f"{r['max_ms']:>14.1f}{r['max_ms'] / max(idle, 1e-9):>12.1f}")
    cams = [(name, r) for name, r in rows if "first_tile_s" in r]
    if cams:
        print()
        print(f"{'CAM job':<24}{'Compute call s':>15}{'first tile s':>13}{'Cancel to end s':>17}")
        for name, r in cams:
            print(f"{name:<24}{r['compute_call_s']:>15.2f}{r['first_tile_s']:>13.2f}"
                  f"{r.get('cancel_s', float('nan')):>17.2f}")
    if closes:
        print()
        print(f"{'closing the viewer while':<40}{'close s':>9}")
        for name, sec in closes:
            print(f"{name:<40}{sec:>9.2f}")
    print()
    print("threshold slider -> pseudo-mask applied (median of 5 slider moves, background worker)")
    print(f"{'canvas':<13}{'view':<19}{'all ms':>9}{'max stall ms':>14}")
    for view, side, r in redraw:
        print(f"{f'{side} x {side}':<13}{view:<19}{r['all_ms']:>9.0f}{r['max_stall_ms']:>14.1f}")


if __name__ == "__main__":
    main()
