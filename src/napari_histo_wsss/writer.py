"""npe2 writers: a napari Labels layer to OME-Zarr labels, pyramidal TIFF, palette PNG or QuPath
GeoJSON, all through :mod:`core.io.export`.

What a layer means is read from its ``meta``:

* values: the plugin's own layers (``metadata["histo_wsss"]`` in pseudo-mask / prediction /
  corrected) store ``class index + 1`` with 0 = unlabelled; any other Labels layer is read as
  class indices.
* classes: ``metadata["classes"]`` (a ``ClassTable.to_dict()``) when the layer carries one; else
  a table built from the layer's colours (``colormap``) or default colours, named ``class 1..K``.
* geometry: ``scale`` (level-0 pixels per layer pixel, last axis) and ``translate`` (level-0
  origin, (y, x)), so GeoJSON coordinates are level-0 pixels as QuPath expects.

A multiscale layer is written from its full-resolution level (TIFF and OME-Zarr, read tile by
tile) or from the finest level of at most 16384 px (PNG, GeoJSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_histo_wsss.core.data.classes import DEFAULT_COLORS, ClassDef, ClassTable
from napari_histo_wsss.core.io.export import (
    UNLABELLED,
    IndexView,
    export_geojson,
    export_ome_zarr,
    export_palette_png,
    export_tiff,
    level_for_max_side,
)

__all__ = ["write_labels_ome_zarr", "write_labels_tiff", "write_labels_png", "write_labels_geojson"]

_PLUGIN_KINDS = ("pseudo-mask", "prediction", "corrected")
_MAX_RASTER_SIDE = 16384


def _levels(data: Any, meta: dict) -> list[Any]:
    levels = list(data) if isinstance(data, (list, tuple)) else [data]
    plugin = ((meta.get("metadata") or {}).get("histo_wsss") in _PLUGIN_KINDS)
    return [IndexView(lv) for lv in levels] if plugin else levels


def _classes(meta: dict, levels: list[Any]) -> ClassTable:
    md = meta.get("metadata") or {}
    if isinstance(md.get("classes"), dict):
        return ClassTable.from_dict(md["classes"])
    plugin = md.get("histo_wsss") in _PLUGIN_KINDS
    smallest = np.asarray(levels[-1])
    top = int(smallest[smallest != UNLABELLED].max(initial=0)) if plugin else int(smallest.max(initial=0))
    n = max(1, top + 1)
    colors = _layer_colors(meta, n, plugin)
    return ClassTable(tuple(ClassDef(f"class {i + 1}", colors[i]) for i in range(n)), background=None,
                      white_background=False)


def _layer_colors(meta: dict, n: int, plugin: bool) -> list[tuple[int, int, int]]:
    """Class colours from the layer's colour map where it has one, else the default palette."""
    out = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n)]
    cmap = meta.get("colormap")
    get = getattr(cmap, "map", None)
    if get is None:
        return out
    try:
        values = np.arange(n) + (1 if plugin else 0)
        rgba = np.asarray(get(values), dtype=float)
        return [tuple(int(round(c * 255)) for c in rgba[i, :3]) for i in range(n)]
    except Exception:  # noqa: BLE001 - colour maps differ between napari versions; defaults are fine
        return out


def _geometry(meta: dict) -> tuple[float, tuple[float, float]]:
    scale = meta.get("scale") or (1.0, 1.0)
    translate = meta.get("translate") or (0.0, 0.0)
    return float(scale[-1]), (float(translate[-1]), float(translate[-2]) if len(translate) > 1 else 0.0)


def write_labels_ome_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an OME-Zarr label pyramid with the class colour table."""
    levels = _levels(data, meta)
    ds, _origin = _geometry(meta)
    export_ome_zarr(levels[0], path, _classes(meta, levels), downsample=ds, overwrite=True)
    return [str(path)]


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as a tiled pyramidal palette TIFF of class indices."""
    levels = _levels(data, meta)
    ds, _origin = _geometry(meta)
    export_tiff(levels, path, _classes(meta, levels), downsample=ds)
    return [str(path)]


def _raster(levels: list[Any], ds: float) -> tuple[np.ndarray, float]:
    k = level_for_max_side([tuple(lv.shape) for lv in levels], _MAX_RASTER_SIDE)
    full = levels[0].shape
    arr = np.asarray(levels[k])
    return arr, ds * full[-1] / arr.shape[-1]


def write_labels_png(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as a palette PNG (pixel value = class index)."""
    levels = _levels(data, meta)
    arr, _ = _raster(levels, 1.0)
    export_palette_png(arr, path, _classes(meta, levels))
    return [str(path)]


def write_labels_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as QuPath GeoJSON polygons in level-0 pixel coordinates."""
    levels = _levels(data, meta)
    ds, origin = _geometry(meta)
    arr, level_ds = _raster(levels, ds)
    export_geojson(arr, Path(path), _classes(meta, levels), downsample=level_ds, origin=origin)
    return [str(path)]
