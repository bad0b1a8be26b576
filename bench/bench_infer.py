"""Whole-slide prediction benchmark: throughput against in-memory inference, and memory.

1. Throughput: ``predict_slide`` over the real CMU-1-Small-Region slide (tissue tiles, reading,
   cosine blending, zarr writing, pyramid) divided by the bare throughput of the same predict
   function on the same tiles already in memory. Target: above 0.9. The two are measured
   alternately, ``--repeats`` times each, and the medians compared.
2. Memory: peak resident memory (sampled every 10 ms in a fresh process) during
   ``predict_slide`` with the same segmenter on a generated 50k x 50k slide vs a 10k x 10k one
   with the same tissue islands. Should be about equal (memory bounded by tiles, not slide).

Run: ``python bench/bench_infer.py [--threads 1] [--tile 512] [--batch-size 4] [--repeats 3]``
Prints a table; copy it into docs/benchmarks/stage2.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from napari_histo_wsss.core.data.classes import get_preset  # noqa: E402
from napari_histo_wsss.core.models import Segmenter  # noqa: E402
from napari_histo_wsss.core.slides.slide import open_slide  # noqa: E402
from napari_histo_wsss.core.stage2.infer import _read_tile, plan_tiles, predict_slide, segmenter_predict_fn  # noqa: E402

CLASSES = get_preset("wsss4luad")
DATA = Path(os.environ.get("HISTO_WSSS_DATA", HERE.parent.parent / "shared" / "data"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Segmenter(CLASSES.num_classes, "efficientnet-lite0", weights="none").eval()


def throughput(args: argparse.Namespace) -> dict:
    slide = open_slide(DATA / "wsi-cmu-small-region" / "CMU-1-Small-Region.svs")
    fn = segmenter_predict_fn(_model(), CLASSES, "cpu")
    plan = plan_tiles(slide, args.tile, args.overlap, 1.0, None)
    tiles = [(int(r), int(c)) for r, c in zip(*np.nonzero(plan.active))]
    batches = [torch.stack([_read_tile(slide, plan, r, c) for r, c in tiles[i:i + args.batch_size]])
               for i in range(0, len(tiles), args.batch_size)]
    with torch.no_grad():
        fn(batches[0])  # warm-up (kernel selection)
    bare, whole = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in batches:
                    fn(x)
            bare.append(len(tiles) / (time.perf_counter() - t0))
            out = Path(tmp) / f"p{k}.ome.zarr"
            t0 = time.perf_counter()
            last = list(predict_slide(slide, fn, out, tile=args.tile, overlap=args.overlap,
                                      batch_size=args.batch_size, classes=CLASSES))[-1]
            whole.append(last.metrics["tiles"] / (time.perf_counter() - t0))
    return {"tiles": len(tiles), "bare": statistics.median(bare), "whole": statistics.median(whole),
            "ratio": statistics.median(whole) / statistics.median(bare), "bare_all": bare, "whole_all": whole}


_CHILD = """
import sys, time, torch
sys.path.insert(0, {here!r})
from generated_slide import GeneratedSlide
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.stage2.infer import predict_slide, segmenter_predict_fn
from napari_histo_wsss.core.models import Segmenter
torch.set_num_threads({threads})
side = int(sys.argv[1])
C = get_preset('wsss4luad')
torch.manual_seed(0)
fn = segmenter_predict_fn(Segmenter(C.num_classes, 'efficientnet-lite0', weights='none').eval(), C, 'cpu')
islands = [(2000, 2000, 900), (side - 2000, side - 2000, 900)]
slide = GeneratedSlide((side, side), islands)
import threading, psutil
proc = psutil.Process()
before = proc.memory_info().rss
peak = [before]
done = threading.Event()
def sample():
    while not done.wait(0.01):
        peak[0] = max(peak[0], proc.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
last = list(predict_slide(slide, fn, sys.argv[2], tile={tile}, overlap={overlap}, batch_size={batch},
                          classes=C, tissue=slide.tissue_mask(64)))[-1]
done.set()
print(before, max(peak[0], proc.memory_info().rss), last.metrics['tiles'], time.perf_counter() - t0)
"""


def memory(args: argparse.Namespace) -> dict:
    script = _CHILD.format(here=str(HERE), threads=args.threads, tile=args.tile, overlap=args.overlap,
                           batch=args.batch_size)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in (10_000, 50_000):
            res = subprocess.run([sys.executable, "-c", script, str(side), str(Path(tmp) / f"m{side}.ome.zarr")],
                                 capture_output=True, text=True, check=True)
            before, peak, tiles, secs = res.stdout.split()
            out[side] = {"before_mib": int(before) / 2**20, "peak_mib": int(peak) / 2**20,
                         "growth_mib": (int(peak) - int(before)) / 2**20, "tiles": int(tiles), "seconds": float(secs)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine has 2 shared cores)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = throughput(args)
    print(f"# whole-slide prediction, DeepLabV3+ EfficientNet-Lite0, tile {args.tile}, overlap {args.overlap}, "
          f"batch {args.batch_size}, torch threads {args.threads}")
    print("| measure | value |\n|---|---|")
    print(f"| tissue tiles of CMU-1-Small-Region (2220x2967, level 0) | {t['tiles']} |")
    print(f"| bare predict_fn on in-memory tiles (tiles/s, median of {args.repeats}) | {t['bare']:.3f} |")
    print(f"| predict_slide end to end (tiles/s, median of {args.repeats}) | {t['whole']:.3f} |")
    print(f"| **ratio whole-slide / bare** | **{t['ratio']:.3f}** |")
    print(f"| all runs bare / whole | {', '.join(f'{v:.3f}' for v in t['bare_all'])} / "
          f"{', '.join(f'{v:.3f}' for v in t['whole_all'])} |")
    m = memory(args)
    print("\n| generated slide | tissue tiles | seconds | RSS before (MiB) | peak RSS during prediction (MiB) | growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for side, r in m.items():
        print(f"| {side} x {side} | {r['tiles']} | {r['seconds']:.1f} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['growth_mib']:.0f} |")
    print(f"| **ratio 50k / 10k of the peak** | | | | **{m[50_000]['peak_mib'] / m[10_000]['peak_mib']:.3f}** | |")


if __name__ == "__main__":
    main()
