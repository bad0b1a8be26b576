"""How a patch folder scales: opening it as one contact sheet, its first thumbnail, tissue
detection, the patch grid and the feature cache, for folders of N patches (224 px crops cut from
the shared WSSS4LUAD images, written once to a scratch folder outside the project). The feature
cache is timed image by image (what the product does) and, beside it in the same run, over the
sheet's tiles as a slide would be (the white between images computed too; how it was until
2026-12-05).

    python bench/bench_patch_folder.py                 # N = 100, 1000
    python bench/bench_patch_folder.py --n 100 1000 3000 --no-features

Prints one markdown table, all sizes side by side (one run, one machine).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_folder(out: Path, n: int, side: int = 224, seed: int = 0) -> None:
    src = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((DATA / "wsss4luad-subset" / "val" / "img").glob("*.png"))]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = src[i % len(src)]
        y = int(rng.integers(0, max(1, a.shape[0] - side)))
        x = int(rng.integers(0, max(1, a.shape[1] - side)))
        crop = np.full((side, side, 3), 255, np.uint8)
        part = a[y:y + side, x:x + side]
        crop[:part.shape[0], :part.shape[1]] = part
        Image.fromarray(crop).save(out / f"p{i:05d}.png")


def measure(folder: Path, features: bool) -> dict:
    from napari_histo_wsss.core.slides.grid import make_grid
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.slides.tissue import detect_tissue
    from napari_histo_wsss.core.stage1.features import FeatureSpec, build_slide_features

    out = {}
    t = time.perf_counter()
    slide = open_slide(folder)
    out["open_s"] = time.perf_counter() - t
    out["sheet"] = f"{slide.dimensions[0]} x {slide.dimensions[1]}"
    t = time.perf_counter()
    slide.thumbnail(1024)
    out["thumbnail_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tissue = detect_tissue(slide)
    out["tissue_s"] = time.perf_counter() - t
    t = time.perf_counter()
    grid = make_grid(slide, tissue, patch_size=224, target_mpp=None)
    out["grid_s"] = time.perf_counter() - t
    out["patches"] = len(grid)
    if features:
        t = time.perf_counter()
        for _ev in build_slide_features(slide, tissue, 1.0, FeatureSpec()):
            pass
        out["features_s"] = time.perf_counter() - t
        regions, slide.regions = slide.regions, None  # the same sheet, tiled like a slide
        t = time.perf_counter()
        for _ev in build_slide_features(slide, tissue, 1.0, FeatureSpec()):
            pass
        out["features_tiles_s"] = time.perf_counter() - t
        slide.regions = regions
    slide.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--no-features", action="store_true")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            folder = Path(tmp) / f"n{n}"
            make_folder(folder, n)
            rows.append((n, measure(folder, not args.no_features)))
    cols = ["open_s", "thumbnail_s", "tissue_s", "grid_s"] + ([] if args.no_features else ["features_s", "features_tiles_s"])
    print("| patches | sheet (px) | grid patches | " + " | ".join(c.replace("features_tiles_s", "features as tiles (s)").replace("_s", " (s)") for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for n, r in rows:
        print(f"| {n} | {r['sheet']} | {r['patches']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
