"""QuPath GeoJSON size and fidelity on a slide-sized label image: per-fragment polygons (the export
before issue 14) against one valid MultiPolygon per class at several simplification tolerances.

The label image is a mosaic of the real WSSS4LUAD validation ground-truth masks (31 masks, tiled
in rows, cycled, glass where a row runs short) of ``--width`` x ``--height`` pixels (default the
issue's 7000 x 3936). For each variant, one row: features, polygons, vertices, file size, export
time, rasterise-back time, the share of geometries shapely (GEOS, JTS's twin, as QuPath checks)
calls invalid, and the per-class IoU of :func:`core.io.export.rasterize_geojson` of the file against
the mosaic.

* ``per fragment (before)``: one Polygon feature per 4-connected region with the exact pixel-edge
  rings as they were written before (rings touching themselves at a pixel corner not repaired);
* ``per class, tolerance T``: :func:`core.io.export.export_geojson` (one MultiPolygon per class,
  valid, simplified by T pixels; 0 = exact pixel edges);
* ``per region (split)``: the same with ``split=True`` (one valid Polygon feature per region).

    python bench/bench_geojson.py                       # prints the markdown table (about 2-3 min)
    python bench/bench_geojson.py --tolerances 0 0.45 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape as to_shape

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import read_index_mask
from napari_histo_wsss.core.io.export import (
    GEOJSON_TOLERANCE,
    _feature_id,
    export_geojson,
    mask_to_polygons,
    rasterize_geojson,
    read_geojson,
)

CLASSES = get_preset("wsss4luad")


def mosaic(mask_dir: Path, height: int, width: int) -> np.ndarray:
    """Ground-truth masks tiled row by row (cycled) into a ``height`` x ``width`` label image."""
    masks = [read_index_mask(p, CLASSES) for p in sorted(mask_dir.glob("*.png"))]
    if not masks:
        raise SystemExit(f"no masks in {mask_dir}")
    out = np.full((height, width), CLASSES.background_index, np.uint8)
    y = i = 0
    while y < height:
        x = row_h = 0
        while x < width:
            m = masks[i % len(masks)]
            i += 1
            h, w = min(m.shape[0], height - y), min(m.shape[1], width - x)
            out[y:y + h, x:x + w] = m[:h, :w]
            x += w
            row_h = max(row_h, h)
        y += row_h
    return out


def export_per_fragment(labels: np.ndarray, path: Path) -> None:
    """The GeoJSON export as it was before: one Polygon per 4-connected region, pixel-edge rings."""
    features = []
    for idx, c in enumerate(CLASSES.classes):
        props = {"objectType": "annotation", "classification": {"name": c.name, "color": list(c.color)}, "isLocked": False}
        for j, rings in enumerate(mask_to_polygons(labels == idx, split_pinches=False)):
            coords = [[[round(float(x), 3), round(float(y), 3)] for x, y in ring] for ring in rings]
            features.append({"type": "Feature", "id": _feature_id(path, idx, j),
                             "geometry": {"type": "Polygon", "coordinates": coords}, "properties": dict(props)})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")))


def measure(name: str, labels: np.ndarray, write, path: Path) -> dict:
    t0 = time.perf_counter()
    write(path)
    t_export = time.perf_counter() - t0
    doc = json.loads(path.read_text())
    geoms = [to_shape(f["geometry"]) for f in doc["features"]]
    invalid = int(np.count_nonzero(~shapely.is_valid(np.array(geoms, dtype=object)))) if geoms else 0
    t0 = time.perf_counter()
    back = rasterize_geojson(read_geojson(path), labels.shape, CLASSES, fill=CLASSES.background_index)
    t_raster = time.perf_counter() - t0
    ious = []
    for k in range(CLASSES.num_classes):
        a, b = back == k, labels == k
        union = np.logical_or(a, b).sum()
        ious.append(float(np.logical_and(a, b).sum() / union) if union else float("nan"))
    return {"name": name, "features": len(doc["features"]), "polygons": int(sum(shapely.get_num_geometries(geoms))),
            "vertices": int(sum(shapely.get_num_coordinates(geoms))), "mb": path.stat().st_size / 1e6,
            "export_s": t_export, "raster_s": t_raster, "invalid": invalid, "iou": ious}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--masks", type=Path, default=data / "wsss4luad-subset" / "val" / "mask")
    ap.add_argument("--width", type=int, default=7000)
    ap.add_argument("--height", type=int, default=3936)
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.0, GEOJSON_TOLERANCE, 1.0, 2.0])
    args = ap.parse_args()

    labels = mosaic(args.masks, args.height, args.width)
    share = [float((labels == k).mean()) for k in range(CLASSES.background_index + 1)]
    print(f"mosaic {args.width} x {args.height} of {args.masks} ({', '.join(f'{n} {s:.0%}' for n, s in zip(CLASSES.names + ['background'], share))}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shapely {shapely.__version__} / GEOS {shapely.geos_version_string}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure("per fragment (before)", labels, lambda p: export_per_fragment(labels, p), Path(tmp) / "frag.geojson"))
        for tol in args.tolerances:
            name = f"per class, tolerance {tol:g}" + (" (default)" if tol == GEOJSON_TOLERANCE else "")
            rows.append(measure(name, labels, lambda p, t=tol: export_geojson(labels, p, CLASSES, tolerance=t), Path(tmp) / f"t{tol:g}.geojson"))
        rows.append(measure(f"per region (split), tolerance {GEOJSON_TOLERANCE:g}", labels,
                            lambda p: export_geojson(labels, p, CLASSES, split=True), Path(tmp) / "split.geojson"))
    head = ["variant", "features", "polygons", "vertices", "MB", "export s", "read+rasterise s", "invalid"] + \
        [f"IoU {n}" for n in CLASSES.names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["name"], f"{r['features']:,}", f"{r['polygons']:,}", f"{r['vertices']:,}", f"{r['mb']:.1f}",
                 f"{r['export_s']:.1f}", f"{r['raster_s']:.1f}",
                 f"{r['invalid']:,} ({r['invalid'] / max(r['features'], 1):.1%})"] + [f"{v:.4f}" for v in r["iou"]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
