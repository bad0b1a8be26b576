"""Frozen-backbone feature maps: the cache behind live CAMs and label suggestions.

Once per slide (in the background, resumable) the ImageNet-pretrained backbone, frozen, is run
over the slide's tissue at the project's working resolution, and its last feature map (stride 32)
is stored as one dense ``(h, w, C)`` float16 array over the whole slide: one cell per 32 working
pixels. Everything interactive is then cheap arithmetic on that array:

* a patch's features are the mean of the cells it covers (:meth:`SlideFeatures.patch_features`);
* a linear head fitted on those (``core/stage1/live.py``) applied to every cell gives the CAM
  of the whole slide at once, in the same logit units as the patch scores (the mean of a linear
  map is the linear map of the mean), with no tiles and so no tile seams;
* label suggestions rank patches in the same feature space (``core/stage1/suggest.py``).

Tiles of ``tile`` working pixels are read with a ``margin`` of context on every side, which is
dropped after the forward pass, so the map does not show the tile grid. Only tiles holding tissue
are computed; cells outside them stay zero and are flagged in ``tissue``. A patch folder's sheet
(a slide with ``regions``) is computed image by image instead (:func:`image_units`): each image's
cells with the same margin, so the white between images - four fifths of a sheet of 224-px
patches - is never computed, and no image's features see its neighbours.

Storage: a zarr group per slide and feature setting in the project
(``features/<slide_id>/<key>.zarr``). ``done`` marks finished tiles, so a cancelled or killed build
resumes where it stopped; a different backbone, weights, tile geometry or working resolution has a
different key, so stale features are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models.backbones import DEFAULT_BACKBONE
from napari_histo_wsss.core.progress import ProgressEvent

__all__ = [
    "FEATURE_STRIDE",
    "FeatureSpec",
    "FeatureExtractor",
    "SlideFeatures",
    "FeatureBuild",
    "build_slide_features",
    "feature_map_geometry",
    "image_units",
    "image_features",
    "slide_features_path",
]

#: Working pixels per feature cell (the backbone's output stride).
FEATURE_STRIDE = 32
#: Bumped whenever the stored layout or the computation changes: old caches are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature map is computed with. ``tile`` and ``margin`` are working pixels
    (multiples of :data:`FEATURE_STRIDE`)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    tile: int = 512
    margin: int = 64

    def __post_init__(self) -> None:
        for name in ("tile", "margin"):
            v = getattr(self, name)
            if v < 0 or v % FEATURE_STRIDE or (name == "tile" and v == 0):
                raise HistoWSSSError(f"feature {name} must be a positive multiple of {FEATURE_STRIDE} px, got {v}")

    def key(self, downsample: float) -> str:
        """Short id of these settings at a working ``downsample`` (level-0 px per working px)."""
        text = json.dumps({**asdict(self), "downsample": round(float(downsample), 6), "v": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


class FeatureExtractor:
    """The frozen backbone: RGB uint8 ``(H, W, 3)`` -> ``(ceil(H/32), ceil(W/32), C)`` float32."""

    def __init__(self, spec: FeatureSpec = FeatureSpec(), device: Any = "cpu"):
        import torch

        from napari_histo_wsss.core.models.backbones import backbone_spec, build_backbone

        _, reg = backbone_spec(spec.backbone)
        self.spec = spec
        self.device = torch.device(device)
        self.model = build_backbone(spec.backbone, spec.weights, output_stride=FEATURE_STRIDE).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.channels = int(self.model.channels[-1])
        self._mean = torch.tensor(reg.mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(reg.std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        h, w = rgb.shape[:2]
        ph, pw = -h % FEATURE_STRIDE, -w % FEATURE_STRIDE
        if ph or pw:  # pad with white glass to whole cells
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        rgb = np.ascontiguousarray(rgb)
        if not rgb.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants a writable buffer
            rgb = rgb.copy()
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            f = self.model((x - self._mean) / self._std)[-1]
        return f[0].permute(1, 2, 0).float().cpu().numpy()


def image_features(extractor: FeatureExtractor, rgb: np.ndarray) -> SlideFeatures:
    """Features of a whole image held in memory (a patch-folder image, a test image): one
    forward pass, every cell counted as tissue unless it is white glass."""
    from napari_histo_wsss.core.slides.tissue import white_background_mask

    f = extractor(rgb)
    h, w = f.shape[:2]
    white = white_background_mask(rgb)
    pad = np.pad(white, ((0, h * FEATURE_STRIDE - white.shape[0]), (0, w * FEATURE_STRIDE - white.shape[1])),
                 constant_values=True)
    glass = pad.reshape(h, FEATURE_STRIDE, w, FEATURE_STRIDE).mean(axis=(1, 3)) > 0.9
    return SlideFeatures(f.astype(np.float16), ~glass, float(FEATURE_STRIDE), (rgb.shape[1], rgb.shape[0]))


@dataclass
class SlideFeatures:
    """A dense feature map over a slide. ``features``: ``(h, w, C)`` float16 (a zarr array or
    numpy); ``tissue``: ``(h, w)`` bool, cells holding tissue; ``cell0``: level-0 px per cell;
    ``dims``: the slide's level-0 (width, height)."""

    features: Any
    tissue: np.ndarray
    cell0: float
    dims: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tissue.shape[0]), int(self.tissue.shape[1])

    def dense(self) -> np.ndarray:
        """The whole map in memory as float32."""
        return np.asarray(self.features[...], dtype=np.float32)

    def cell_boxes(self, x0: np.ndarray, y0: np.ndarray, size0: float) -> tuple[np.ndarray, ...]:
        """Cell index ranges ``(r0, r1, c0, c1)`` covered by level-0 boxes of side ``size0``."""
        h, w = self.shape
        c0 = np.clip(np.floor(np.asarray(x0, float) / self.cell0), 0, w - 1).astype(int)
        r0 = np.clip(np.floor(np.asarray(y0, float) / self.cell0), 0, h - 1).astype(int)
        c1 = np.clip(np.ceil((np.asarray(x0, float) + size0) / self.cell0), c0 + 1, w).astype(int)
        r1 = np.clip(np.ceil((np.asarray(y0, float) + size0) / self.cell0), r0 + 1, h).astype(int)
        return r0, r1, c0, c1

    def patch_features(self, x0: np.ndarray, y0: np.ndarray, size0: float, dense: np.ndarray | None = None) -> np.ndarray:
        """``(N, C)`` float32: the mean features of the tissue cells of each level-0 patch (all of
        its cells where none holds tissue)."""
        f = self.dense() if dense is None else dense
        r0, r1, c0, c1 = self.cell_boxes(x0, y0, size0)
        out = np.zeros((len(r0), f.shape[-1]), dtype=np.float32)
        for i in range(len(r0)):
            block = f[r0[i]:r1[i], c0[i]:c1[i]]
            keep = self.tissue[r0[i]:r1[i], c0[i]:c1[i]]
            out[i] = block[keep].mean(axis=0) if keep.any() else block.reshape(-1, f.shape[-1]).mean(axis=0)
        return out


def image_units(regions: list, cell0: float, tc: int) -> list[tuple[int, int, int, int]]:
    """The cell boxes ``(r0, r1, c0, c1)`` a patch folder's sheet is computed in: each image's
    cells (level-0 box / ``cell0``), cut into pieces of at most ``tc`` cells a side for large
    images. The white between images is never computed."""
    out = []
    for r in regions:
        r0, c0 = int(r.y // cell0), int(r.x // cell0)
        r1, c1 = max(r0 + 1, math.ceil((r.y + r.height) / cell0)), max(c0 + 1, math.ceil((r.x + r.width) / cell0))
        out += [(y, min(y + tc, r1), x, min(x + tc, c1)) for y in range(r0, r1, tc) for x in range(c0, c1, tc)]
    return out


def slide_features_path(project: Any, slide_id: str, spec: FeatureSpec, downsample: float) -> Path:
    """Where a project keeps a slide's feature map for ``spec`` at ``downsample``."""
    return project.features_dir(slide_id) / f"{spec.key(downsample)}.zarr"


@dataclass
class FeatureBuild(ProgressEvent):
    """A feature-build event; the last one (``done``) carries the finished map, and ``prepared``
    whatever a consumer derived from it in the same worker thread (e.g. the GUI's pooled patch
    features, so that its thread never does that work)."""

    result: SlideFeatures | None = None
    prepared: dict | None = None


def _open_store(path: Path, meta: dict, shape: tuple[int, int], channels: int, chunk: int, n_tiles: tuple[int, int]):
    import zarr

    if path.exists():
        try:
            g = zarr.open_group(str(path), mode="r+")
            if dict(g.attrs).get("meta") == meta:
                return g
        except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
            pass
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = zarr.open_group(str(path), mode="w")
    g.create_array("features", shape=(*shape, channels), chunks=(chunk, chunk, channels), dtype="float16", fill_value=0)
    g.create_array("tissue", shape=shape, chunks=shape, dtype="bool", fill_value=False)
    g.create_array("done", shape=n_tiles, chunks=n_tiles, dtype="bool", fill_value=False)
    g.attrs["meta"] = meta
    return g


def feature_map_geometry(dimensions: tuple[int, int], downsample: float) -> tuple[float, tuple[int, int]]:
    """(level-0 px per feature cell, ``(h, w)`` cells) of the feature map of a slide of level-0
    ``dimensions`` ``(w, h)`` at ``downsample`` level-0 px per working px: known before the map is
    built (the live layer is placed from it)."""
    cell0 = float(downsample) * FEATURE_STRIDE
    w0, h0 = (int(v) for v in dimensions)
    return cell0, (max(1, math.ceil(h0 / cell0)), max(1, math.ceil(w0 / cell0)))


def build_slide_features(
    slide: Any,
    tissue: Any,
    downsample: float,
    spec: FeatureSpec = FeatureSpec(),
    store: str | Path | None = None,
    device: Any = "cpu",
    should_stop: Callable[[], bool] = lambda: False,
    extractor: FeatureExtractor | None = None,
) -> Iterator[FeatureBuild]:
    """Compute (or resume, or just load) the feature map of an open slide.

    ``tissue``: a :class:`~napari_histo_wsss.core.slides.tissue.TissueMask` (tiles without
    tissue are skipped) or None (all tiles); ``downsample``: level-0 px per working px; ``store``:
    a ``.zarr`` folder to keep the map in (None: memory only). Yields ``step`` events per tile and
    a last ``done`` event with the map, or ``cancelled`` when ``should_stop()`` (finished tiles are
    kept in the store)."""
    w0, h0 = (int(v) for v in slide.dimensions)
    cell0, (h, w) = feature_map_geometry((w0, h0), downsample)
    tc = spec.tile // FEATURE_STRIDE  # cells per tile side
    regions = getattr(slide, "regions", None)
    if regions:  # a patch folder's sheet: image by image, so the white between images costs nothing
        units = image_units(regions, cell0, tc)
        grid, what = (len(units), 1), "images" if len(units) == len(regions) else "image pieces"
    else:  # a slide: the grid of tiles
        nty, ntx = math.ceil(h / tc), math.ceil(w / tc)
        units = [(ty * tc, ty * tc + tc, tx * tc, tx * tc + tc) for ty in range(nty) for tx in range(ntx)]
        grid, what = (nty, ntx), "tiles"
    keys = [np.unravel_index(i, grid) for i in range(len(units))]
    todo_all = [(k, u) for k, u in zip(keys, units)
                if tissue is None or tissue.box_fraction(u[2] * cell0, u[0] * cell0, (u[3] - u[2]) * cell0,
                                                         (u[1] - u[0]) * cell0) > 0]
    if not todo_all:
        raise HistoWSSSError(f"{getattr(slide, 'path', 'slide')}: no tissue found: no features to compute")
    channels = extractor.channels if extractor is not None else None
    meta = {"spec": asdict(spec), "downsample": float(downsample), "dims": [w0, h0], "version": FORMAT_VERSION}
    if regions:
        meta["units"] = "images"
    if store is not None:
        if channels is None:
            from napari_histo_wsss.core.models.backbones import backbone_spec

            channels = backbone_spec(spec.backbone)[1].channels[-1]
        g = _open_store(Path(store), meta, (h, w), int(channels), tc, grid)
        feats, done = g["features"], np.asarray(g["done"][...])
    else:
        g, feats, done = None, None, np.zeros(grid, dtype=bool)
    tissue_cells = np.zeros((h, w), dtype=bool)
    if tissue is not None:
        ys, xs = np.mgrid[0:h, 0:w]
        tissue_cells = tissue.box_fractions(xs.ravel() * cell0, ys.ravel() * cell0, cell0, cell0).reshape(h, w) > 0
    else:
        tissue_cells[:] = True
    n = len(todo_all)
    todo = [(k, u) for k, u in todo_all if not done[k]]
    unit = what[:-1]
    yield FeatureBuild("start", steps=n, step=n - len(todo),
                       message=f"features: {len(todo)} of {n} tissue {what} to compute")
    if todo and extractor is None:
        extractor = FeatureExtractor(spec, device)
    if feats is None:
        feats = np.zeros((h, w, extractor.channels if extractor else int(channels or 0)), dtype=np.float16)
    t0 = time.monotonic()
    m, mc = spec.margin, spec.margin // FEATURE_STRIDE
    for i, (key, (r0, r1, c0, c1)) in enumerate(todo, start=1):
        if should_stop():
            yield FeatureBuild("cancelled", message=f"features: stopped after {i - 1} of {len(todo)} {what}")
            return
        # the unit's cells plus the margin, in working pixels, read from level 0 coordinates
        x0w, y0w = c0 * FEATURE_STRIDE - m, r0 * FEATURE_STRIDE - m
        sw, sh = (c1 - c0) * FEATURE_STRIDE + 2 * m, (r1 - r0) * FEATURE_STRIDE + 2 * m
        rgb = slide.read_scaled((x0w * downsample, y0w * downsample), (sw * downsample, sh * downsample), (sw, sh))
        f = extractor(rgb)[mc:mc + r1 - r0, mc:mc + c1 - c0]
        rr, cc = min(h, r1), min(w, c1)
        feats[r0:rr, c0:cc] = f[: rr - r0, : cc - c0].astype(np.float16)
        done[key] = True
        if g is not None:
            g["done"][key] = True  # after the features: a killed build recomputes this unit
        el = time.monotonic() - t0
        yield FeatureBuild("step", step=n - len(todo) + i, steps=n, eta_s=el / i * (len(todo) - i),
                           message=f"features: {unit} {i}/{len(todo)}")
    computed = np.zeros((h, w), dtype=bool)
    for _key, (r0, r1, c0, c1) in todo_all:
        computed[r0:r1, c0:c1] = True
    tissue_cells &= computed
    if g is not None:
        g["tissue"][...] = tissue_cells
    yield FeatureBuild("done", step=n, steps=n, message=f"features: {n} {what} ready",
                       result=SlideFeatures(feats, tissue_cells, cell0, (w0, h0)))
