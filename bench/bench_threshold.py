"""Pseudo-mask threshold update latency for a 4k x 4k view (yardstick: well under 100 ms).

When the pathologist moves the CAM-threshold or gating slider in the Review panel, the automatic
pseudo-mask of the slide's CAM canvas is recomputed by the panel's worker job
(:func:`core.review.pseudo_tiles`: per tile, cached :func:`core.cams.class_scores` +
:func:`core.cams.threshold_scores`, white glass cached per level). This script builds a
4096 x 4096 canvas with 3 classes from smooth random CAMs, then times one full update per slider
position, every repeat at a new slider value (so a gating move that changes a tile's classes
pays the recompute), with the white-background rule on and off, beside the 100 ms yardstick;
"uncached" is the same update through plain :func:`core.cams.pseudo_mask` per tile.

    python bench/bench_threshold.py [--side 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _canvas(side: int, tile: int, num_classes: int):
    from napari_histo_wsss.core.review import CamCanvas

    rng = np.random.default_rng(0)
    canvas = CamCanvas.empty(num_classes, (side, side), tile, downsample=4.0)
    coarse = rng.random((num_classes, side // 64, side // 64)).astype(np.float32)
    canvas.cams[:] = np.kron(coarse, np.ones((64, 64), np.float32))[:, :side, :side]
    n = side // tile
    canvas.probs[:] = rng.random((num_classes, n, n)).astype(np.float32)
    grey = (np.kron(rng.random((side // 16, side // 16)), np.ones((16, 16))) * 255).astype(np.uint8)
    canvas.rgb[:] = grey[:side, :side, None]
    return canvas


def _median(fn, values: list[float]) -> float:
    times = []
    for v in values:
        t0 = time.perf_counter()
        fn(v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from napari_histo_wsss.core.stage1.cams import pseudo_mask
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.review import pseudo_tiles

    classes = get_preset("wsss4luad")
    canvas = _canvas(args.side, args.tile, classes.num_classes)
    tiles = canvas.computed_tiles()
    white_cache: dict = {}

    def update(thr: float, gate: float, white: int | None) -> None:
        for _ in pseudo_tiles(canvas, classes, tiles, thr, gate, white, white_cache, lambda: False):
            pass

    def uncached(thr: float, gate: float) -> None:
        for ty, tx in tiles:
            sy, sx = canvas.tile_slices(ty, tx)
            pseudo_mask(canvas.cams[:, sy, sx], classes, probs=canvas.probs[:, ty, tx], prob_threshold=gate,
                        bg_threshold=thr, white_background=False)

    values = [0.1 + 0.8 * i / (args.repeats + 1) for i in range(args.repeats + 1)]
    rows = []
    for white in (None, 200):
        update(0.2, 0.5, white)  # the panel's first draw: fills the caches
        rows.append(("CAM threshold", "on" if white else "off", _median(lambda v: update(v, 0.5, white), values)))
        rows.append(("gating", "on" if white else "off", _median(lambda v: update(0.2, v, white), values)))
    rows.append(("CAM threshold, uncached", "off", _median(lambda v: uncached(v, 0.5), values[:3])))
    print(f"{args.side} x {args.side} canvas, {classes.num_classes} classes, tiles of {args.tile} px\n")
    print("| slider | white-glass rule | update ms | / 100 ms yardstick |")
    print("|---|---|---:|---:|")
    for name, white, t in rows:
        print(f"| {name} | {white} | {t * 1e3:.0f} | {t / 0.1:.2f} |")


if __name__ == "__main__":
    main()
