"""Opening cost vs slide size: the real 2k-pixel slide against a generated 50k x 50k pyramidal TIFF.

For each slide, measured side by side in one run (median of --repeats, each on a freshly opened
slide, file already in the OS page cache):

* ``open``: :func:`open_slide` (header, pyramid, one corner tile decoded to catch truncation);
* ``thumb``: the first :meth:`Slide.thumbnail` (``--thumb`` px);
* ``napari``: what napari does on File > Open with this plugin: ``get_reader(path)(path)`` and
  computing the coarsest level it draws first.

The 50k x 50k slide (2.5 gigapixels, 7 levels, 256-px JPEG tiles in SubIFDs, like a QuPath/OME
export) is written once into a temporary folder: real H&E tiles of the shipped CMU slide are
JPEG-encoded once and their bytes repeated, which writes ~50,000 tiles in seconds.

    python bench/bench_open.py                 # prints the table; docs/benchmarks/open.md has results
    python bench/bench_open.py --side 100000   # an even larger slide
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.reader import get_reader
from napari_histo_wsss.sample_data import sample_slide_path

TILE = 256


def _encoded_tiles(source: Path, quality: int, workdir: Path) -> list[bytes]:
    """JPEG tile bytes exactly as tifffile writes them: 6 tissue tiles and 2 glass tiles of the slide."""
    with open_slide(source) as s:
        spots = [(900, 1500), (1150, 1500), (900, 1750), (1150, 2000), (1000, 2300), (1200, 2600), (50, 50), (1900, 300)]
        tiles = [s.read_region(xy, 0, (TILE, TILE)) for xy in spots]
    probe = workdir / ".probe.tif"
    out = []
    for t in tiles:
        tifffile.imwrite(probe, t, tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": quality})
        with tifffile.TiffFile(probe) as tf:
            page = tf.pages[0]
            off, n = page.dataoffsets[0], page.databytecounts[0]
        with open(probe, "rb") as f:
            f.seek(off)
            out.append(f.read(n))
    probe.unlink()
    return out


def write_big_pyramid(path: Path, side: int, source: Path, quality: int = 80) -> tuple[int, float]:
    """A ``side`` x ``side`` RGB pyramidal TIFF (levels halve down to < 1024 px); returns (levels, seconds)."""
    t0 = time.perf_counter()
    tiles = _encoded_tiles(source, quality, path.parent)
    shapes = [(side, side)]
    while max(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))

    def tile_bytes(shape: tuple[int, int]):
        rows, cols = math.ceil(shape[0] / TILE), math.ceil(shape[1] / TILE)
        for r in range(rows):
            for c in range(cols):
                yield tiles[(r * 7 + c * 3) % len(tiles)]

    mpp = 0.25
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, shape in enumerate(shapes):
            res = 1e4 / (mpp * 2**i)
            tw.write(
                tile_bytes(shape), shape=(*shape, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                compression="jpeg", resolution=(res, res), resolutionunit="CENTIMETER",
                subifds=len(shapes) - 1 if i == 0 else None, subfiletype=1 if i else 0,
                description="napari-histo-wsss open benchmark (repeated real H&E tiles)" if i == 0 else None,
            )
    return len(shapes), time.perf_counter() - t0


def _median(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds (all threads) of ``fn``; CPU time is the
    steadier figure on a shared machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(path: Path, thumb: int, repeats: int) -> dict:
    def do_open():
        open_slide(path).close()

    def do_open_thumb():
        with open_slide(path) as s:
            s.thumbnail(thumb)

    def do_napari():
        layers = get_reader(str(path))(str(path))
        data = layers[0][0]
        np.asarray(data[-1] if isinstance(data, list) else data)

    do_open_thumb()  # warm-up: imports, codec initialisation
    with open_slide(path) as s:
        facts = {"size": s.dimensions, "levels": s.native_levels, "built": s.level_count - s.native_levels}
    t_open, _ = _median(do_open, repeats)
    t_total, c_total = _median(do_open_thumb, repeats)
    t_napari, _ = _median(do_napari, repeats)
    return {**facts, "open": t_open, "thumb": t_total - t_open, "total": t_total, "cpu": c_total, "napari": t_napari}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=50_000, help="side of the generated slide in pixels (default 50000)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--thumb", type=int, default=1024, help="thumbnail size (default 1024)")
    ap.add_argument("--workdir", default=None, help="where to write the big TIFF (default: a temporary folder, removed)")
    args = ap.parse_args()

    small = sample_slide_path()
    data_dir = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    tif2k = data_dir / "wsi-cmu-small-region" / "CMU-1-Small-Region.pyramid.tif"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        big = Path(tmp) / f"generated-{args.side}.tif"
        nlev, t_write = write_big_pyramid(big, args.side, small)
        print(f"wrote {big.name}: {args.side} x {args.side} px, {nlev} levels, {big.stat().st_size / 1e6:.0f} MB in {t_write:.1f} s")
        rows = [("CMU-1-Small-Region.svs", small)]
        if tif2k.is_file():
            rows.append(("CMU-1-Small-Region.pyramid.tif", tif2k))
        rows.append((f"generated {args.side // 1000}k TIFF", big))
        results = [(name, measure(p, args.thumb, args.repeats)) for name, p in rows]

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats}; thumbnail {args.thumb} px; times in ms")
    head = (f"{'slide':34s} {'size (px)':>15s} {'levels':>7s} {'open':>7s} {'thumb':>7s} {'total':>7s} "
            f"{'cpu':>7s} {'napari':>7s}")
    print(head)
    print("-" * len(head))
    for name, r in results:
        w, h = r["size"]
        lev = f"{r['levels']}+{r['built']}"
        print(f"{name:34s} {f'{w} x {h}':>15s} {lev:>7s} {1e3 * r['open']:7.1f} {1e3 * r['thumb']:7.1f} "
              f"{1e3 * r['total']:7.1f} {1e3 * r['cpu']:7.1f} {1e3 * r['napari']:7.1f}")
    print("levels = stored + built on demand; total = open + first thumbnail (wall); cpu = its process CPU time;")
    print("napari = reader + coarsest level\n")
    big = results[-1][1]
    for name, r in results[:-1]:
        print(f"ratio {results[-1][0]} / {name}: total {big['total'] / r['total']:.2f}, cpu {big['cpu'] / r['cpu']:.2f}, "
              f"napari {big['napari'] / r['napari']:.2f}")


if __name__ == "__main__":
    main()
