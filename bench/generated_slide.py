"""A generated, lazily computed whole slide of any size, for whole-slide inference benchmarks and
memory tests: round tissue islands with an H&E-like procedural texture on white glass.

It offers the part of :class:`napari_histo_wsss.core.slides.slide.Slide` that whole-slide prediction
uses (``dimensions``, ``mpp``, ``path``, ``read_region``, ``read_scaled``) plus an exact
:meth:`GeneratedSlide.tissue_mask`, and computes only the pixels asked for, so a 100k x 100k
slide costs nothing until read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_histo_wsss.core.slides.tissue import TissueMask


class GeneratedSlide:
    """``size`` = (width, height) in level-0 pixels; ``islands`` = (cx, cy, radius) discs of
    tissue in level-0 pixels."""

    def __init__(self, size: tuple[int, int], islands: Sequence[tuple[float, float, float]], mpp: float = 0.5):
        self.dimensions = (int(size[0]), int(size[1]))
        self.islands = [tuple(float(v) for v in isl) for isl in islands]
        self.mpp = mpp
        self.path = Path(f"generated-{size[0]}x{size[1]}")
        self.level_dimensions = [self.dimensions]
        self.level_downsamples = [1.0]

    def _inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
        w, h = self.dimensions
        for cx, cy, r in self.islands:
            inside |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        return inside & (xs < w) & (ys < h) & (xs >= 0) & (ys >= 0)

    def read_region(self, location: tuple[float, float], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8: pink/purple texture on the islands, white glass elsewhere."""
        x0, y0 = int(round(location[0])), int(round(location[1]))
        w, h = int(size[0]), int(size[1])
        xs = (x0 + np.arange(w, dtype=np.float32))[None, :]
        ys = (y0 + np.arange(h, dtype=np.float32))[:, None]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        inside = self._inside(xs, ys)
        if inside.any():
            nuclei = (np.sin(xs * 0.21) * np.cos(ys * 0.17) + np.sin((xs + ys) * 0.05)) > 0.9
            tex = np.empty((h, w, 3), dtype=np.uint8)
            tex[...] = (220, 150, 190)
            tex[nuclei] = (90, 60, 150)
            out[inside] = tex[inside]
        return out

    def read_scaled(self, location: tuple[float, float], size0: tuple[float, float], out_size: tuple[int, int]) -> np.ndarray:
        """The level-0 box resampled to ``out_size`` by nearest neighbour (generated on the grid)."""
        ow, oh = int(out_size[0]), int(out_size[1])
        sx, sy = size0[0] / ow, size0[1] / oh
        xs = (location[0] + (np.arange(ow) + 0.5) * sx).astype(np.float32)[None, :]
        ys = (location[1] + (np.arange(oh) + 0.5) * sy).astype(np.float32)[:, None]
        out = np.full((oh, ow, 3), 255, dtype=np.uint8)
        inside = self._inside(xs, ys)
        out[inside] = (200, 140, 180)
        return out

    def tissue_mask(self, downsample: float = 64.0) -> TissueMask:
        """The exact tissue mask at ``downsample`` level-0 pixels per mask pixel."""
        w, h = self.dimensions
        mw, mh = math.ceil(w / downsample), math.ceil(h / downsample)
        xs = ((np.arange(mw) + 0.5) * downsample).astype(np.float32)[None, :]
        ys = ((np.arange(mh) + 0.5) * downsample).astype(np.float32)[:, None]
        return TissueMask(self._inside(xs, ys), downsample)
