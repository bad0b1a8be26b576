"""Pseudo-mask threshold update latency for a 4k x 4k view (yardstick: well under 100 ms).

When the pathologist moves the CAM-threshold or gating slider in the Review panel, the automatic
pseudo-mask of the slide's CAM canvas is recomputed (:func:`widgets.review.pseudo_from_canvas`:
per tile, :func:`core.cams.pseudo_mask` + the white-glass rule) and redrawn. This script builds
a 4096 x 4096 canvas with 3 classes from smooth random CAMs and a real H&E texture, then times
one update (median of repeats) for each slider, with the white-background rule on and off, and
prints each latency beside the 100 ms yardstick.

    python bench/bench_threshold.py [--side 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _canvas(side: int, tile: int, num_classes: int):
    from napari_histo_wsss.widgets.review import CamCanvas

    rng = np.random.default_rng(0)
    canvas = CamCanvas.empty(num_classes, (side, side), tile, downsample=4.0)
    coarse = rng.random((num_classes, side // 64, side // 64)).astype(np.float32)
    canvas.cams[:] = np.kron(coarse, np.ones((64, 64), np.float32))[:, :side, :side]
    n = side // tile
    canvas.probs[:] = rng.random((num_classes, n, n)).astype(np.float32)
    grey = (np.kron(rng.random((side // 16, side // 16)), np.ones((16, 16))) * 255).astype(np.uint8)
    canvas.rgb[:] = grey[:side, :side, None]
    return canvas


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from napari_histo_wsss.core.classes import get_preset
    from napari_histo_wsss.widgets.review import pseudo_from_canvas

    classes = get_preset("wsss4luad")
    canvas = _canvas(args.side, args.tile, classes.num_classes)
    rows = []
    for white in (None, 200):
        for name, thr, gate in (("CAM threshold", 0.35, 0.5), ("gating", 0.2, 0.7)):
            t = _median(lambda: pseudo_from_canvas(canvas, classes, thr, gate, white), args.repeats)
            rows.append((name, "on" if white else "off", t))
    print(f"{args.side} x {args.side} canvas, {classes.num_classes} classes, tiles of {args.tile} px\n")
    print("| slider | white-glass rule | update ms | / 100 ms yardstick |")
    print("|---|---|---:|---:|")
    for name, white, t in rows:
        print(f"| {name} | {white} | {t * 1e3:.0f} | {t / 0.1:.2f} |")


if __name__ == "__main__":
    main()
