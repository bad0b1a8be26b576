"""Exports of tissue label images in the formats pathologists' tools open, and their read-back.

Formats:

* **OME-Zarr labels** (:func:`export_ome_zarr`, :class:`LabelPyramid`): OME-NGFF 0.4 (zarr v2, the
  version QuPath/Bio-Formats, napari-ome-zarr and Fiji read) ``<out>/labels/<name>/0,1,2...``: an
  integer multiscale label image (nearest-neighbour levels, 2x per level) with ``image-label``
  metadata: the class colour table (``colors``), class names (``properties``) and ``source``
  pointing back to the image group. Stored values are **class index + 1**; 0 means unlabelled
  (transparent in napari, as in this project's Labels layers), ``C + 1`` is background. The root
  group's ``histo_wsss`` attributes record the class table, the downsample (level-0 slide pixels
  per label pixel) and ``complete``: an array written by :func:`~.infer.predict_slide` is
  ``complete: false`` until its last chunk is on disk, and readers refuse an incomplete one.
* **Tiled pyramidal TIFF** (:func:`export_tiff`): palette-colour (class colours) uint8 class
  indices, 512 px deflate tiles, reduced levels as SubIFDs, resolution tags in centimetres when
  the pixel size is known; written tile by tile, so a slide-sized mask never sits in memory.
* **Palette PNG** (:func:`export_palette_png`): LUAD-HistoSeg style, pixel value = class index.
* **QuPath GeoJSON** (:func:`export_geojson`): a FeatureCollection of one ``MultiPolygon`` feature
  per class (or, with ``split``, one ``Polygon`` per connected region; exterior ring plus hole
  rings) with ``properties.objectType = "annotation"`` and ``properties.classification = {"name",
  "color"}``; coordinates are level-0 pixels ``[x, y]``. Rings are traced along pixel edges
  (foreground 4-connected), made valid (``shapely.make_valid``: QuPath/JTS rejects self-touching
  rings), then simplified by :data:`GEOJSON_TOLERANCE` label pixels; with tolerance 0
  :func:`rasterize_geojson` of :func:`read_geojson` gives back the same mask.
* **Patch labels CSV** (:func:`export_patch_labels_csv`).

Class-index masks (the in-memory convention everywhere else) hold ``0..C-1`` tissue, ``C``
background and, where nothing is known, :data:`UNLABELLED` (255).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.io.atomic import fsync_tree, staging_dir, swap_dir, write_text, write_with

__all__ = [
    "UNLABELLED",
    "index_to_stored",
    "stored_to_index",
    "LABELS_NAME",
    "LabelPyramid",
    "IndexView",
    "open_label_pyramid",
    "export_ome_zarr",
    "export_tiff",
    "export_palette_png",
    "export_patch_folder_pngs",
    "export_geojson",
    "mask_to_polygons",
    "mask_to_geometry",
    "GEOJSON_TOLERANCE",
    "Annotation",
    "read_geojson",
    "rasterize_geojson",
    "export_patch_labels_csv",
    "level_for_max_side",
]

#: Class-index value of pixels that carry no label (not predicted, not annotated).
UNLABELLED = 255
#: Default name of the label image inside an OME-Zarr (``labels/<name>``).
LABELS_NAME = "tissue"
NGFF_VERSION = "0.4"
_MIN_LEVEL_SIDE = 256
#: NGFF 0.4 stores zarr v2 chunks as nested folders ("/" separator).
_SLASH = {"name": "v2", "separator": "/"}


class ExportError(HistoWSSSError):
    """An export cannot be written or an exported file cannot be read back."""


def _disk_error(path: Path, e: BaseException, replacing: bool = False) -> ExportError:
    """A user-facing error for a failed write, naming the file and calling a full disk by name.
    ``replacing``: the output was being built beside an existing one, which is kept."""
    err = e if isinstance(e, OSError) else getattr(e, "__cause__", None)
    left = "the previous output is kept" if replacing else "the partial output is left marked incomplete"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return ExportError(f"{path}: the disk is full; {left} (free space and run again)")
    return ExportError(f"{path}: cannot write ({type(e).__name__}: {e}); {left}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _num_levels(shape: tuple[int, int], min_side: int = _MIN_LEVEL_SIDE) -> int:
    """Levels of a 2x pyramid: halve until the longer side is at most ``min_side``."""
    n, side = 1, max(shape)
    while side > min_side:
        side = math.ceil(side / 2)
        n += 1
    return n


def index_to_stored(index_block: np.ndarray) -> np.ndarray:
    """Class indices -> OME-Zarr label values (index + 1; UNLABELLED -> 0)."""
    block = np.asarray(index_block)
    out = block.astype(np.uint16) + 1
    out[block == UNLABELLED] = 0
    return out.astype(np.uint8) if out.max(initial=0) < 256 else out


def stored_to_index(stored_block: np.ndarray) -> np.ndarray:
    """OME-Zarr label values -> class indices (0 -> UNLABELLED)."""
    block = np.asarray(stored_block)
    out = block.astype(np.int32) - 1
    out[block == 0] = UNLABELLED
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# OME-Zarr label pyramid (also the incremental output of whole-slide prediction)
# ---------------------------------------------------------------------------------------------
class LabelPyramid:
    """An OME-NGFF 0.4 label pyramid on disk (see the module doc for the layout).

    Create with :meth:`create` (level 0 allocated, ``complete: false``), fill level 0 through
    :meth:`write_block` (class indices, any region), then :meth:`finish` builds the reduced levels
    chunk by chunk and marks the pyramid complete. Open an existing one with
    :func:`open_label_pyramid`. ``kind="maps"`` stores float16 ``(C, h, w)`` class maps (CAMs,
    probabilities) as an OME-Zarr image at the root instead of a label image.
    """

    def __init__(self, root: Path, group: Any, kind: str, name: str, meta: dict, replacing: Path | None = None):
        self.root = root
        self._group = group
        self.kind = kind
        self.name = name
        self.meta = meta
        #: The existing output this one replaces when :meth:`finish` succeeds (``root`` is then a
        #: hidden staging folder beside it); None when writing in place.
        self.replacing = replacing

    @property
    def path(self) -> Path:
        """Where the output is (or will be, once finished): the path the caller asked for."""
        return self.replacing or self.root

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, int], classes: ClassTable, downsample: float = 1.0,
               mpp: float | None = None, name: str = LABELS_NAME, kind: str = "labels", chunk: int = 1024,
               extra: dict | None = None, overwrite: bool = False, fill_index: int | None = None) -> LabelPyramid:
        """Allocate an empty pyramid for a ``shape`` (h, w) label image whose pixels are
        ``downsample`` level-0 pixels of a slide with ``mpp`` microns per level-0 pixel.
        Unwritten label pixels read as ``fill_index`` (default unlabelled); whole-slide
        prediction uses background, so glass needs no chunk on disk.

        With ``overwrite``, an existing pyramid is not touched until :meth:`finish`: the new one is
        written in a hidden folder beside it and swapped in at the end, so a failed or cancelled
        run (call :meth:`abort`) leaves the old output whole."""
        import zarr

        root = Path(path)
        if kind not in ("labels", "maps"):
            raise ExportError(f"{root}: unknown pyramid kind {kind!r} (labels or maps)")
        h, w = int(shape[0]), int(shape[1])
        if h < 1 or w < 1:
            raise ExportError(f"{root}: cannot write an empty {w}x{h} label image")
        if root.exists():
            if not overwrite:
                raise ExportError(f"{root} already exists; choose a new output path or allow overwriting")
            if not (root / ".zgroup").is_file():
                raise ExportError(f"{root} exists and is not a zarr folder; refusing to replace it")
        replacing = root if root.exists() else None
        if replacing is not None:
            root = staging_dir(replacing)
        meta = {"complete": False, "kind": kind, "name": name, "shape": [h, w], "downsample": float(downsample),
                "mpp": None if mpp is None else float(mpp), "classes": classes.to_dict(),
                "value_offset": 1 if kind == "labels" else 0, "created": _now(), **(extra or {})}
        try:
            group = zarr.open_group(str(root), mode="w", zarr_format=2)
            group.attrs["histo_wsss"] = meta
            levels = _num_levels((h, w))
            target = group
            if kind == "labels":
                labels = group.create_group("labels")
                labels.attrs["labels"] = [name]
                target = labels.create_group(name)
                target.attrs.update(_multiscales(name, levels, downsample, mpp, channels=False))
                target.attrs["image-label"] = _image_label(classes)
                target.create_array("0", shape=(h, w), chunks=(min(chunk, h), min(chunk, w)), dtype="uint8",
                                    fill_value=0 if fill_index is None else int(fill_index) + 1, chunk_key_encoding=_SLASH)
            else:
                c = classes.num_classes
                group.attrs.update(_multiscales(name, levels, downsample, mpp, channels=True))
                group.attrs["omero"] = _omero(classes)
                group.create_array("0", shape=(c, h, w), chunks=(1, min(chunk, h), min(chunk, w)), dtype="float16",
                                   fill_value=0, chunk_key_encoding=_SLASH)
        except Exception as e:  # noqa: BLE001 - zarr/OS errors of many types
            if replacing is not None:
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(e, ExportError):
                raise
            raise _disk_error(replacing or root, e, replacing is not None) from e
        return cls(root, target, kind, name, meta, replacing)

    # -- access ----------------------------------------------------------------------------------
    @property
    def classes(self) -> ClassTable:
        return ClassTable.from_dict(self.meta["classes"])

    @property
    def downsample(self) -> float:
        return float(self.meta["downsample"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def level(self, k: int = 0) -> Any:
        """The zarr array of level ``k`` (stored values: class index + 1 for labels)."""
        return self._group[str(k)]

    @property
    def levels(self) -> list[Any]:
        out, k = [], 0
        while str(k) in self._group:
            out.append(self._group[str(k)])
            k += 1
        return out

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 slide pixels per pixel of each level."""
        return [self.downsample * 2**k for k in range(len(self.levels))]

    def index_levels(self) -> list[IndexView]:
        """Every level as a lazy class-index view (sliceable like an array, read on demand), the
        input the exporters take for slide-sized label images."""
        if self.kind != "labels":
            raise ExportError(f"{self.root}: holds class maps, not labels")
        return [IndexView(a) for a in self.levels]

    def read_index(self, level: int = 0, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Class indices (uint8, background ``C``, :data:`UNLABELLED` where unknown) of a level,
        or of the ``box = (y0, x0, y1, x1)`` of it."""
        arr = self.level(level)
        block = arr[...] if box is None else arr[box[0]:box[2], box[1]:box[3]]
        return stored_to_index(block) if self.kind == "labels" else np.asarray(block)

    # -- writing ---------------------------------------------------------------------------------
    def write_block(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Write class indices (labels) or float maps ``(C, h, w)`` (maps) into level 0 at
        ``(y0, x0)``; the block is clipped to the image."""
        arr = self.level(0)
        h, w = arr.shape[-2:]
        bh, bw = block.shape[-2:]
        y1, x1 = min(y0 + bh, h), min(x0 + bw, w)
        if y1 <= y0 or x1 <= x0:
            return
        try:
            if self.kind == "labels":
                arr[y0:y1, x0:x1] = index_to_stored(block[: y1 - y0, : x1 - x0])
            else:
                arr[:, y0:y1, x0:x1] = np.asarray(block[:, : y1 - y0, : x1 - x0], dtype=np.float16)
        except Exception as e:  # noqa: BLE001
            raise _disk_error(self.path, e, self.replacing is not None) from e

    def finish(self) -> None:
        """Build the reduced levels from level 0 (chunk rows at a time) and mark complete; a
        replacement is then swapped in for the old output (``root`` becomes the final path)."""
        import zarr

        try:
            k = 1
            prev = self.level(0)
            while max(prev.shape[-2:]) > _MIN_LEVEL_SIDE:
                h, w = (math.ceil(s / 2) for s in prev.shape[-2:])
                chunks = prev.chunks
                shape = (h, w) if self.kind == "labels" else (prev.shape[0], h, w)
                chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
                cur = self._group.create_array(str(k), shape=shape, chunks=chunks, dtype=prev.dtype,
                                               fill_value=prev.fill_value,
                                               chunk_key_encoding=_SLASH, overwrite=True)
                sy, sx = chunks[-2], chunks[-1]
                stored = self._stored_chunks(k - 1)
                pcy, pcx = prev.chunks[-2], prev.chunks[-1]
                for y in range(0, h, sy):  # one output chunk at a time: memory stays at a few chunks
                    for x in range(0, w, sx):
                        if stored is not None and not any(
                                (cy, cx) in stored for cy in range(2 * y // pcy, -(-2 * (y + sy) // pcy))
                                for cx in range(2 * x // pcx, -(-2 * (x + sx) // pcx))):
                            continue  # nothing written there: the reduced chunk is fill as well
                        src = np.asarray(prev[..., 2 * y: 2 * (y + sy), 2 * x: 2 * (x + sx)])
                        cur[..., y: y + sy, x: x + sx] = _reduce(src, self.kind)
                prev = cur
                k += 1
            self.meta["complete"] = True
            self.meta["completed"] = _now()
            root = zarr.open_group(str(self.root), mode="r+", zarr_format=2)
            root.attrs["histo_wsss"] = self.meta
            if self.replacing is not None:
                fsync_tree(self.root)
        except Exception as e:  # noqa: BLE001
            raise _disk_error(self.path, e, self.replacing is not None) from e
        if self.replacing is not None:
            swap_dir(self.root, self.replacing)
            self.root, self.replacing = self.replacing, None
            try:
                group = zarr.open_group(str(self.root), mode="r+", zarr_format=2)
                self._group = group["labels"][self.name] if self.kind == "labels" else group
            except Exception as e:  # noqa: BLE001
                raise _disk_error(self.root, e) from e

    def abort(self) -> None:
        """Give up an unfinished replacement: remove its staging folder, keeping the old output.
        A pyramid written in place stays as it is, marked incomplete."""
        if self.replacing is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stored_chunks(self, k: int) -> set[tuple[int, int]] | None:
        """(row, col) chunk indices of level ``k`` present on disk (2-D label levels of a local
        pyramid; None when unknown, e.g. float maps with a channel axis)."""
        folder = self.root / ("labels/" + self.name if self.kind == "labels" else "") / str(k)
        if self.kind != "labels" or not folder.is_dir():
            return None
        out = set()
        for row in folder.iterdir():
            if row.name.isdigit():
                out.update((int(row.name), int(c.name)) for c in row.iterdir() if c.name.isdigit())
        return out

    def update_meta(self, **values: Any) -> None:
        """Store extra keys (e.g. the model that made a prediction) in the root's ``histo_wsss``
        attributes."""
        import zarr

        self.meta.update(values)
        try:
            zarr.open_group(str(self.root), mode="r+", zarr_format=2).attrs["histo_wsss"] = self.meta
        except Exception as e:  # noqa: BLE001
            raise _disk_error(self.path, e, self.replacing is not None) from e


class IndexView:
    """Stored label values (class index + 1, as in OME-Zarr and the plugin's napari layers) seen
    as class indices: ``view[rows, cols]`` reads that region of the underlying array (zarr, dask,
    numpy) and converts it (value - 1; 0 -> :data:`UNLABELLED`)."""

    def __init__(self, array: Any):
        self._array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return stored_to_index(self._array[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _reduce(block: np.ndarray, kind: str) -> np.ndarray:
    """2x reduction: nearest neighbour for labels (no invented classes), 2x2 mean for maps."""
    if kind == "labels":
        return block[..., ::2, ::2]
    b = np.asarray(block, dtype=np.float32)
    h, w = b.shape[-2:]
    b = np.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
    return ((b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2]) / 4).astype(np.float16)


def _multiscales(name: str, levels: int, downsample: float, mpp: float | None, channels: bool) -> dict:
    unit = {"unit": "micrometer"} if mpp else {}
    base = float(downsample) * (float(mpp) if mpp else 1.0)
    axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    datasets = []
    for k in range(levels):
        s = base * 2**k
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": ([1.0] if channels else []) + [s, s]}]})
    return {"multiscales": [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
                             "type": "mean" if channels else "nearest"}]}


def _image_label(classes: ClassTable) -> dict:
    colors, props = [], []
    entries = [(i, c.name, c.color) for i, c in enumerate(classes.classes)]
    if classes.background is not None:
        entries.append((classes.background_index, classes.background.name, classes.background.color))
    for idx, name, col in entries:
        colors.append({"label-value": idx + 1, "rgba": [int(col[0]), int(col[1]), int(col[2]), 255]})
        props.append({"label-value": idx + 1, "class": name, "class-index": idx})
    return {"version": NGFF_VERSION, "colors": colors, "properties": props, "source": {"image": "../../"}}


def _omero(classes: ClassTable) -> dict:
    chans = [{"label": c.name, "color": "{:02X}{:02X}{:02X}".format(*c.color), "active": True,
              "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}} for c in classes.classes]
    return {"channels": chans}


def open_label_pyramid(path: str | Path, require_complete: bool = True) -> LabelPyramid:
    """Open a pyramid written by :class:`LabelPyramid` / :func:`~.infer.predict_slide`.
    An incomplete one (interrupted prediction, full disk) raises :class:`ExportError` unless
    ``require_complete`` is False."""
    import zarr

    root = Path(path)
    if not root.exists():
        raise ExportError(f"{root}: no such OME-Zarr")
    try:
        group = zarr.open_group(str(root), mode="r+" if _writable(root) else "r", zarr_format=2)
        meta = dict(group.attrs.get("histo_wsss", {}))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{root}: not a readable OME-Zarr ({type(e).__name__}: {e})") from e
    if not meta:
        raise ExportError(f"{root}: not written by napari-histo-wsss (no 'histo_wsss' attributes)")
    if require_complete and meta.get("complete") is not True:
        raise ExportError(f"{root}: incomplete output (interrupted or failed while writing); it is not a result - "
                          "run the prediction again")
    kind, name = meta.get("kind", "labels"), meta.get("name", LABELS_NAME)
    target = group["labels"][name] if kind == "labels" else group
    return LabelPyramid(root, target, kind, name, meta)


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def _as_levels(labels: Any) -> list[Any]:
    """A single 2-D array-like or a pyramid (list, largest first) -> list of levels."""
    if isinstance(labels, LabelPyramid):
        raise ExportError("pass LabelPyramid.read_index(...) or a class-index array, not the pyramid itself")
    if isinstance(labels, (list, tuple)):
        levels = list(labels)
    else:
        levels = [labels]
    for lv in levels:
        if len(lv.shape) != 2:
            raise ExportError(f"a label image must be 2-D (rows, cols), got shape {tuple(lv.shape)}")
    return levels


def _check_indices(block: np.ndarray, classes: ClassTable, where: str) -> None:
    if block.size == 0:
        return
    bad = (block > classes.background_index) & (block != UNLABELLED)
    if bad.any():
        vals = np.unique(block[bad])[:10].tolist()
        raise ExportError(f"{where}: label values {vals} are not class indices of the table "
                          f"(0..{classes.background_index - 1} tissue, {classes.background_index} background)")


def export_ome_zarr(labels: Any, path: str | Path, classes: ClassTable, downsample: float = 1.0,
                    mpp: float | None = None, name: str = LABELS_NAME, chunk: int = 1024,
                    overwrite: bool = False) -> Path:
    """Write a class-index label image (numpy, zarr or dask array, read in chunk rows) as an
    OME-Zarr label pyramid with the class colour table. Returns the path.

    With ``overwrite`` an existing OME-Zarr is replaced only once the new one is complete (see
    :meth:`LabelPyramid.create`); until then it stays readable, so ``labels`` may even be read
    from it."""
    level0 = _as_levels(labels)[0]
    h, w = int(level0.shape[0]), int(level0.shape[1])
    pyr = LabelPyramid.create(path, (h, w), classes, downsample, mpp, name=name, chunk=chunk, overwrite=overwrite)
    try:
        for y in range(0, h, chunk):
            block = np.asarray(level0[y: y + chunk])
            _check_indices(block, classes, str(path))
            pyr.write_block(y, 0, block)
        pyr.finish()
    except BaseException:
        pyr.abort()
        raise
    return pyr.root


# ---------------------------------------------------------------------------------------------
# tiled pyramidal TIFF and palette PNG
# ---------------------------------------------------------------------------------------------
def _tiff_colormap(classes: ClassTable) -> np.ndarray:
    pal = np.array(classes.palette(), dtype=np.uint16).reshape(256, 3).T
    return pal * 257  # 8 -> 16 bit


def export_tiff(labels: Any, path: str | Path, classes: ClassTable, downsample: float = 1.0,
                mpp: float | None = None, tile: int = 512) -> Path:
    """Write class indices as a tiled, pyramidal (SubIFD), palette-colour TIFF, one tile at a
    time. ``labels`` may be a 2-D array-like or a pyramid (list, largest first; reduced levels
    are otherwise taken every 2nd pixel). The file appears atomically."""
    import tifffile

    levels = _as_levels(labels)
    level0 = levels[0]
    h, w = int(level0.shape[0]), int(level0.shape[1])
    n_levels = _num_levels((h, w), max(tile, _MIN_LEVEL_SIDE))
    cmap = _tiff_colormap(classes)
    path = Path(path)

    def level_source(k: int) -> tuple[Any, int]:
        """(array to read, extra step) for level k: a given pyramid level or level 0 strided."""
        if k < len(levels) and tuple(levels[k].shape) == (math.ceil(h / 2**k), math.ceil(w / 2**k)):
            return levels[k], 1
        return level0, 2**k

    def tiles(k: int) -> Iterator[np.ndarray]:
        src, step = level_source(k)
        lh, lw = math.ceil(h / 2**k), math.ceil(w / 2**k)
        for ty in range(0, lh, tile):
            row = np.asarray(src[ty * step: (ty + tile) * step: step, ::step])
            _check_indices(row, classes, str(path))
            for tx in range(0, lw, tile):
                block = row[:, tx: tx + tile]
                out = np.full((tile, tile), UNLABELLED, dtype=np.uint8)
                out[: block.shape[0], : block.shape[1]] = block
                yield out

    res_kw: dict = {}
    if mpp:
        px_per_cm = 1e4 / (float(mpp) * float(downsample))
        res_kw = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    def write(tmp: Path) -> None:
        big = h * w > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
            for k in range(n_levels):
                lh, lw = math.ceil(h / 2**k), math.ceil(w / 2**k)
                kw = dict(shape=(lh, lw), dtype=np.uint8, tile=(tile, tile), photometric="palette",
                          colormap=cmap, compression="zlib", metadata=None)
                if k == 0:
                    kw["subifds"] = n_levels - 1
                    kw["description"] = json.dumps({"histo_wsss": {"classes": classes.to_dict(),
                                                                  "downsample": float(downsample), "mpp": mpp}})
                else:
                    kw["subfiletype"] = 1
                if res_kw:
                    ds = 2**k
                    kw["resolution"] = (res_kw["resolution"][0] / ds, res_kw["resolution"][1] / ds)
                    kw["resolutionunit"] = res_kw["resolutionunit"]
                tw.write(tiles(k), **kw)

    try:
        write_with(path, write, suffix=".tif")
    except HistoWSSSError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises several types
        raise _disk_error(path, e) from e
    return path


def export_palette_png(labels: np.ndarray, path: str | Path, classes: ClassTable) -> Path:
    """Write class indices as a palette PNG (pixel value = class index, colours = class table),
    the LUAD-HistoSeg mask convention; readable with ``np.array(Image.open(path))``."""
    from napari_histo_wsss.core.stage1.cams import save_pseudo_mask

    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ExportError(f"{path}: a palette PNG needs a 2-D label image, got shape {arr.shape}")
    _check_indices(arr, classes, str(path))
    save_pseudo_mask(path, arr.astype(np.uint8), classes)
    return Path(path)


def export_patch_folder_pngs(labels: Any, regions: list, folder: str | Path, classes: ClassTable,
                             downsample: float = 1.0, origin: tuple[float, float] = (0.0, 0.0),
                             should_stop: Callable[[], bool] = lambda: False) -> list[Path] | None:
    """A patch folder's label image cut back into one palette PNG per image.

    ``labels``: class indices over the folder's sheet (``core/slides/mosaic.py``), ``downsample``
    level-0 pixels per label pixel, ``origin`` the level-0 position of label pixel (0, 0);
    ``regions``: the sheet's images (``slide.regions``). Each image gets ``<stem>.png`` at its own
    size (nearest label pixel at each image pixel's centre), named after the image, as the
    WSSS4LUAD / LUAD-HistoSeg masks are, so that ``histo-wsss evaluate`` can score the folder
    against ground-truth masks. The folder is written whole or not at all (a failure or a stop
    leaves no partial folder, and an existing ``folder`` as it was); returns the files, or None
    when stopped."""
    from napari_histo_wsss.core.io.atomic import replace_dir

    stems = [Path(r.name).stem for r in regions]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ExportError(f"{folder}: images {', '.join(dup)} differ only in their extension; one PNG each would collide")
    shape = labels.shape
    written = []
    try:
        with replace_dir(folder) as tmp:
            for r, stem in zip(regions, stems):
                if should_stop():
                    raise _Stopped
                rows = np.floor(((r.y + np.arange(r.height) + 0.5) - origin[1]) / downsample).astype(np.int64)
                cols = np.floor(((r.x + np.arange(r.width) + 0.5) - origin[0]) / downsample).astype(np.int64)
                rows, cols = np.clip(rows, 0, shape[0] - 1), np.clip(cols, 0, shape[1] - 1)
                block = np.asarray(labels[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1])
                export_palette_png(block[(rows - rows[0])[:, None], (cols - cols[0])[None, :]], tmp / f"{stem}.png",
                                   classes)
                written.append(Path(folder) / f"{stem}.png")
    except _Stopped:
        return None
    return written


class _Stopped(Exception):
    """A stop inside :func:`export_patch_folder_pngs` (caught there: no folder is left behind)."""


# ---------------------------------------------------------------------------------------------
# GeoJSON: exact pixel-edge polygons
# ---------------------------------------------------------------------------------------------
# Directions in image coordinates (x right, y down): east, south, west, north. Boundary edges
# are oriented so that the foreground lies on their right on screen (clockwise around a pixel);
# exterior rings then have positive shoelace area, holes negative.
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


def _runs(edge: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True along axis 1 of a 2-D bool array -> (row, start, stop) arrays."""
    padded = np.zeros((edge.shape[0], edge.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = edge
    d = np.diff(padded, axis=1)
    r0, c0 = np.nonzero(d == 1)
    r1, c1 = np.nonzero(d == -1)
    return r0, c0, c1  # nonzero is row-major, so starts and stops pair up in order


def _segments(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal straight boundary segments of a bool mask: start x, y, end x, y, direction."""
    m = np.pad(mask, 1)
    sx, sy, ex, ey, dr = [], [], [], [], []
    # horizontal edges on line y = r (between padded rows r-1 and r), in unpadded coordinates
    up, down = m[:-1, :], m[1:, :]
    east = down & ~up            # foreground below: top edge of a pixel, heading east
    west = up & ~down            # foreground above: bottom edge of a pixel, heading west
    for edge, d in ((east, 0), (west, 2)):
        r, c0, c1 = _runs(edge[:, 1:-1])
        y = r  # line index in unpadded coordinates
        if d == 0:
            sx.append(c0); ex.append(c1)
        else:
            sx.append(c1); ex.append(c0)
        sy.append(y); ey.append(y); dr.append(np.full(r.shape, d))
    left, right = m[:, :-1], m[:, 1:]
    south = left & ~right        # foreground on the left of the line: right edge of a pixel, heading south
    north = right & ~left        # foreground on the right: left edge of a pixel, heading north
    for edge, d in ((south, 1), (north, 3)):
        r, c0, c1 = _runs(edge[1:-1, :].T)
        x = r
        if d == 1:
            sy.append(c0); ey.append(c1)
        else:
            sy.append(c1); ey.append(c0)
        sx.append(x); ex.append(x); dr.append(np.full(r.shape, d))
    return tuple(np.concatenate(a).astype(np.int64) for a in (sx, sy, ex, ey, dr))


def mask_to_polygons(mask: np.ndarray, split_pinches: bool = True) -> list[list[np.ndarray]]:
    """Exact polygons of a bool mask: ``[[exterior, hole, hole...], ...]``, one entry per
    4-connected component, each ring an ``(n, 2)`` float array of ``(x, y)`` pixel-edge
    coordinates, closed (first point repeated). Filling the polygons (pixel centres inside)
    gives back exactly ``mask``. Rings are simple (valid polygons); ``split_pinches=False``
    leaves a ring that runs through a saddle corner twice whole, as exports before issue 14 did
    (kept for bench/bench_geojson.py)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    sx, sy, ex, ey, dr = _segments(mask)
    n = sx.shape[0]
    width = mask.shape[1] + 3
    start_key = sy * width + sx
    end_key = ey * width + ex
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    lo = np.searchsorted(sorted_keys, end_key, side="left")
    hi = np.searchsorted(sorted_keys, end_key, side="right")
    nxt = order[np.minimum(lo, n - 1)]
    saddle = np.nonzero(hi - lo == 2)[0]
    if saddle.size:  # two ways out: turn right (keeps the foreground 4-connected)
        a, b = order[lo[saddle]], order[lo[saddle] + 1]
        want = (dr[saddle] + 1) % 4
        nxt[saddle] = np.where(dr[a] == want, a, b)
    # components, to attach each hole to its exterior
    comp, _ = ndimage.label(mask)
    # the foreground pixel on the right of a segment's first unit edge
    px = sx + np.where(dr == 0, 0, np.where(dr == 2, -1, np.where(dr == 1, -1, 0)))
    py = sy + np.where(dr == 1, 0, np.where(dr == 3, -1, np.where(dr == 0, 0, -1)))
    seg_comp = comp[py, px]
    seen = np.zeros(n, dtype=bool)
    at_saddle = np.zeros(n, dtype=bool)
    at_saddle[saddle] = True
    exteriors: dict[int, list[np.ndarray]] = {}
    holes: dict[int, list[np.ndarray]] = {}
    nxt_list = nxt.tolist()
    for s in range(n):
        if seen[s]:
            continue
        ring_idx = []
        cur = s
        while not seen[cur]:
            seen[cur] = True
            ring_idx.append(cur)
            cur = nxt_list[cur]
        idx = np.array(ring_idx)
        pts = np.stack([sx[idx], sy[idx]], axis=1).astype(np.float64)
        # a ring through a saddle corner twice touches itself there, which OGC/JTS (QuPath)
        # calls invalid: cut it into simple loops there (a hole touching the shell, or two holes
        # touching, at one point is valid)
        keys = end_key[idx[at_saddle[idx]]]
        loops = _split_at_pinches(pts) if split_pinches and keys.size > np.unique(keys).size else [pts]
        cid = int(seg_comp[s])
        for loop in loops:
            loop = np.vstack([loop, loop[:1]])
            area = 0.5 * float(np.sum(loop[:-1, 0] * loop[1:, 1] - loop[1:, 0] * loop[:-1, 1]))
            (exteriors if area > 0 else holes).setdefault(cid, []).append(loop)
    out = []
    for c in sorted(exteriors):
        first, *more = exteriors[c]
        out.append([first] + holes.get(c, []))
        out.extend([e] for e in more)  # not expected from a 4-connected component; kept, not lost
    return out


def _split_at_pinches(pts: np.ndarray) -> list[np.ndarray]:
    """Cut a closed ring (vertices ``pts``, first not repeated) that passes through some vertex
    more than once into simple loops, each starting and ending (implicitly) at a repeated vertex."""
    stack: list[tuple[float, float]] = []
    pos: dict[tuple[float, float], int] = {}
    loops = []
    for v in map(tuple, pts.tolist()):
        i = pos.get(v)
        if i is None:
            pos[v] = len(stack)
            stack.append(v)
            continue
        loop = stack[i:]
        for u in loop[1:]:
            del pos[u]
        del stack[i + 1:]
        loops.append(np.array(loop, dtype=np.float64))
    loops.append(np.array(stack, dtype=np.float64))
    return [lp for lp in loops if len(lp) >= 4]


def _feature_id(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "histo-wsss:" + ":".join(str(p) for p in parts)))


#: Default GeoJSON simplification tolerance, in pixels of the label image being exported (the
#: working level: ``tolerance * downsample`` level-0 pixels). Just under half a pixel: a straight
#: pixel edge cannot slide onto the pixel centres beside it (from 0.5 px on, a rectangle's side
#: may move by half a pixel), yet staircases, once their corners are cut, collapse to straight
#: lines. On a 7000x3936 mosaic of WSSS4LUAD ground-truth masks it writes 2.2x fewer vertices than
#: the pixel edges at a per-class IoU of at least 0.99 after rasterising back
#: (docs/benchmarks.md, bench/bench_geojson.py).
GEOJSON_TOLERANCE = 0.45


def _polygon_parts(geom: Any) -> list[Any]:
    """The polygons of any shapely geometry (nested collections flattened; points and lines of a
    repaired geometry dropped: they cover no pixel)."""
    import shapely

    out = []
    for g in shapely.get_parts(geom):
        if g.geom_type == "Polygon":
            if not g.is_empty:
                out.append(g)
        elif g.geom_type in ("MultiPolygon", "GeometryCollection"):
            out.extend(_polygon_parts(g))
    return out


def _valid_multipolygon(parts: list[Any]) -> Any:
    """One valid MultiPolygon of ``parts`` (each valid). Parts of one class traced from a mask
    touch at most at pixel corners, so they form a valid MultiPolygon as they are; after
    simplification two may overlap, and only then are they repaired (unioned)."""
    import shapely

    mp = shapely.multipolygons(parts)
    if shapely.is_valid(mp):
        return mp
    fixed = shapely.multipolygons(_polygon_parts(shapely.make_valid(mp, method="structure", keep_collapsed=False)))
    if not shapely.is_valid(fixed):  # pragma: no cover - GEOS repair is exact; keep a last resort
        fixed = shapely.multipolygons(_polygon_parts(shapely.union_all(parts)))
    return fixed


def _cut_corners(ring: np.ndarray) -> np.ndarray:
    """A closed pixel-edge ring with every corner cut 0.5 px (a unit edge becomes its midpoint).

    Pixel centres stay on their side (the cut passes 0.35 px from the corner pixel's centre), so
    the ring still rasterises to the same pixels, but a 45-degree staircase becomes a straight
    line that Douglas-Peucker can drop at any tolerance instead of a zig-zag whose chords run
    through pixel centres."""
    v = ring[:-1]
    d = np.roll(v, -1, axis=0) - v
    length = np.hypot(d[:, 0], d[:, 1])[:, None]
    step = d * (np.minimum(0.5, length / 2) / np.maximum(length, 1e-12))
    pts = np.stack([v + step, v + d - step], axis=1).reshape(-1, 2)
    keep = np.ones(len(pts), dtype=bool)
    keep[1::2] = length[:, 0] > 1  # a unit edge: both cuts meet at its midpoint
    pts = pts[keep]
    return np.vstack([pts, pts[:1]])


def mask_to_geometry(mask: np.ndarray, tolerance: float = 0.0, holes: bool = True, min_area: float = 0.0) -> Any:
    """A bool mask as one valid shapely ``MultiPolygon`` in pixel-edge ``(x, y)`` coordinates
    (empty when nothing is set), one part per 4-connected region (two that overlap once simplified
    are merged).

    The pixel-edge polygons of :func:`mask_to_polygons` (already simple: rings are cut where they
    touch themselves at a pixel corner, which OGC/JTS and so QuPath call invalid) lose regions
    under ``min_area`` pixels; with ``tolerance > 0`` their corners are cut 0.5 px
    (:func:`_cut_corners`) and they are simplified with topology-preserving Douglas-Peucker of
    ``tolerance`` pixels (below 0.35 px the result still rasterises to the same pixels; 0 keeps the
    pixel edges). Anything invalid is repaired with ``make_valid``; exteriors are oriented
    counter-clockwise in these coordinates (RFC 7946), holes clockwise. ``holes=False`` fills the
    holes in the raster first, so a region inside a hole merges into the filled region."""
    import shapely
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not holes:
        m = ndimage.binary_fill_holes(m)
    rings = mask_to_polygons(m)
    polys = np.array([shapely.Polygon(r[0], r[1:]) for r in rings], dtype=object)
    if polys.size and min_area > 0:
        keep = shapely.area(polys) >= min_area
        polys, rings = polys[keep], [r for r, k in zip(rings, keep) if k]
    if polys.size and tolerance > 0:
        polys = np.array([shapely.Polygon(_cut_corners(r[0]), [_cut_corners(h) for h in r[1:]]) for r in rings],
                         dtype=object)
    if polys.size:
        bad = ~shapely.is_valid(polys)
        if bad.any():
            polys[bad] = shapely.make_valid(polys[bad], method="structure", keep_collapsed=False)
            polys = np.array(_polygon_parts(polys), dtype=object)
    if polys.size and tolerance > 0:
        polys = np.array(_polygon_parts(shapely.simplify(polys, float(tolerance), preserve_topology=True)), dtype=object)
    if not polys.size:
        return shapely.MultiPolygon()
    return shapely.orient_polygons(_valid_multipolygon(list(polys)), exterior_cw=False)


def _geojson_coords(poly: Any, ds: float, ox: float, oy: float) -> list:
    """A shapely polygon's rings as GeoJSON coordinates in level-0 pixels (closed rings; whole
    numbers written as integers, which keeps files small; else 3 decimals)."""
    import shapely

    rings = [poly.exterior, *poly.interiors]
    out = []
    for ring in rings:
        c = shapely.get_coordinates(ring) * ds + (ox, oy)
        c = np.round(c, 3)
        ci = np.round(c)
        out.append(ci.astype(np.int64).tolist() if np.array_equal(c, ci) else c.tolist())
    return out


def export_geojson(labels: np.ndarray, path: str | Path, classes: ClassTable, downsample: float = 1.0,
                   origin: tuple[float, float] = (0.0, 0.0), include_background: bool = False,
                   min_area: float = 0.0, split: bool = False, tolerance: float = GEOJSON_TOLERANCE,
                   holes: bool = True, should_stop: Callable[[], bool] | None = None) -> Path | None:
    """Write class indices as a QuPath-compatible GeoJSON FeatureCollection.

    Coordinates are level-0 pixels: ``x0 = origin[0] + x * downsample`` (likewise y), where
    ``x, y`` are pixel-edge coordinates of ``labels``. Every geometry is valid (OGC/JTS, as QuPath
    checks it): see :func:`mask_to_geometry`. By default one ``MultiPolygon`` feature per class
    (a slide-sized mask gives a handful of features, not tens of thousands of fragments); with
    ``split`` one ``Polygon`` feature per connected region. ``tolerance`` is in pixels of
    ``labels`` (default :data:`GEOJSON_TOLERANCE`; 0 keeps the pixel edges, so rasterising back
    gives the same mask); ``holes=False`` fills holes; regions smaller than ``min_area`` label
    pixels are dropped. Background is exported only with ``include_background``; unlabelled
    pixels never. A mask with nothing to export is refused and nothing is written.
    ``should_stop`` is asked before each class (a slide-sized class takes about a second): when it
    says stop, nothing is written and None is returned.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ExportError(f"{path}: GeoJSON export needs a 2-D label image, got shape {arr.shape}")
    _check_indices(arr, classes, str(path))
    if tolerance < 0 or min_area < 0:
        raise ExportError(f"{path}: tolerance and minimum area must be >= 0 (got {tolerance:g}, {min_area:g})")
    ds = float(downsample)
    ox, oy = float(origin[0]), float(origin[1])
    entries = [(i, c.name, c.color) for i, c in enumerate(classes.classes)]
    if include_background and classes.background is not None:
        entries.append((classes.background_index, classes.background.name, classes.background.color))
    masks = {i: m for i, m in ((e[0], arr == e[0]) for e in entries) if m.any()}
    if not masks:
        what = "unlabelled" if (arr == UNLABELLED).all() else "background or unlabelled"
        raise ExportError(f"{path}: no labelled pixels to export (the mask holds only {what} pixels); nothing written")
    features = []
    for idx, name, color in entries:
        if idx not in masks:
            continue
        if should_stop is not None and should_stop():
            return None
        geom = mask_to_geometry(masks.pop(idx), tolerance=tolerance, holes=holes, min_area=min_area)
        if geom.is_empty:
            continue
        props = {"objectType": "annotation", "classification": {"name": name, "color": [int(c) for c in color]},
                 "isLocked": False}
        polys = [_geojson_coords(p, ds, ox, oy) for p in geom.geoms]
        if split:
            for j, p in enumerate(polys):
                features.append({"type": "Feature", "id": _feature_id(path, idx, j),
                                 "geometry": {"type": "Polygon", "coordinates": p}, "properties": dict(props)})
        else:
            features.append({"type": "Feature", "id": _feature_id(path, idx), "geometry":
                             {"type": "MultiPolygon", "coordinates": polys}, "properties": props})
    if not features:
        raise ExportError(f"{path}: no region of at least {min_area:g} pixels to export; nothing written")
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    write_text(path, text)
    return Path(path)


@dataclass
class Annotation:
    """One GeoJSON feature read back: class name and colour (None when unclassified) and its
    polygons, each a list of ``(n, 2)`` level-0 ``(x, y)`` rings (exterior first, then holes)."""

    name: str | None
    color: tuple[int, int, int] | None
    polygons: list[list[np.ndarray]]


def read_geojson(path: str | Path) -> list[Annotation]:
    """Read a GeoJSON file (FeatureCollection, a list of features as QuPath writes, or one
    Feature) into :class:`Annotation` objects. Polygon and MultiPolygon geometries are read;
    points and lines (not regions) are skipped. Malformed files raise :class:`ExportError`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ExportError(f"{path}: cannot read: {e.strerror or e}") from e
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON: {e}") from e
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features", [])
    elif isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise ExportError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    out = []
    for i, f in enumerate(feats):
        try:
            geom = f["geometry"]
            gtype = geom["type"]
            if gtype == "Polygon":
                polys = [geom["coordinates"]]
            elif gtype == "MultiPolygon":
                polys = geom["coordinates"]
            else:
                continue
            rings = [[np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in p] for p in polys]
            cls = (f.get("properties") or {}).get("classification") or {}
            color = cls.get("color")
            if isinstance(color, int):  # QuPath may write a packed ARGB integer
                color = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
            out.append(Annotation(cls.get("name"), tuple(int(c) for c in color[:3]) if color else None, rings))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{path}: feature {i} is malformed ({type(e).__name__}: {e})") from e
    return out


def rasterize_geojson(annotations: Sequence[Annotation] | str | Path, shape: tuple[int, int], classes: ClassTable,
                      downsample: float = 1.0, origin: tuple[float, float] = (0.0, 0.0),
                      fill: int = UNLABELLED) -> np.ndarray:
    """Paint annotations into a class-index mask of ``shape`` (h, w) whose pixels are
    ``downsample`` level-0 pixels from ``origin``: a pixel takes a polygon's class when its centre
    lies inside the exterior ring and outside the holes. Classes are matched by name; an unknown
    class name is an error. Unpainted pixels get ``fill``; where annotations overlap, the later
    one wins."""
    if isinstance(annotations, (str, Path)):
        annotations = read_geojson(annotations)
    h, w = int(shape[0]), int(shape[1])
    out = np.full((h, w), fill, dtype=np.uint8)
    lookup = {n.lower(): i for i, n in enumerate(classes.names)}
    if classes.background is not None:
        lookup.setdefault(classes.background.name.lower(), classes.background_index)
    ds, ox, oy = float(downsample), float(origin[0]), float(origin[1])
    for a in annotations:
        if a.name is None or a.name.lower() not in lookup:
            raise ExportError(f"annotation class {a.name!r} is not in the class table ({', '.join(classes.names)})")
        painted = _scanline_fill(a.polygons, (h, w), ds, ox, oy)
        if painted is not None:
            window, inside = painted
            out[window][inside] = lookup[a.name.lower()]
    return out


def _scanline_fill(polygons: Sequence[Sequence[np.ndarray]], shape: tuple[int, int], ds: float, ox: float,
                   oy: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The pixels of a ``shape`` raster (``ds`` level-0 pixels each, from ``(ox, oy)``) whose
    centres lie inside any of ``polygons`` (level-0 rings, exterior then holes): ``(window,
    bool mask of the window)``, None when none. An even-odd scanline fill per polygon costs
    O(boundary crossings), where a point-in-polygon test per pixel would cost O(pixels x vertices),
    hopeless for a class-wide MultiPolygon with 10^5 vertices over a slide."""
    h, w = shape
    xs0, ys0, xs1, ys1, pids = [], [], [], [], []
    for pid, rings in enumerate(polygons):
        for ring in rings:
            r = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
            if len(r) < 3:
                continue
            if not np.array_equal(r[0], r[-1]):
                r = np.vstack([r, r[:1]])
            x, y = (r[:, 0] - ox) / ds, (r[:, 1] - oy) / ds
            xs0.append(x[:-1]); ys0.append(y[:-1]); xs1.append(x[1:]); ys1.append(y[1:])
            pids.append(np.full(len(r) - 1, pid))
    if not pids:
        return None
    x0, y0, x1, y1, pid = (np.concatenate(v) for v in (xs0, ys0, xs1, ys1, pids))
    # an edge crosses the line through row r's pixel centres (y = r + 0.5) when ylo <= r + 0.5 < yhi
    ra = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, h).astype(np.int64)
    rb = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, h).astype(np.int64)
    cnt = rb - ra
    e = np.nonzero(cnt > 0)[0]
    if not e.size:
        return None
    cnt = cnt[e]
    e = np.repeat(e, cnt)
    rows = ra[e] + np.arange(e.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    xc = x0[e] + (rows + 0.5 - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    order = np.lexsort((xc, rows, pid[e]))
    xc, rows = xc[order], rows[order]
    # crossings of one polygon on one row come in pairs (closed rings): inside between the two
    ca = np.clip(np.ceil(xc[0::2] - 0.5), 0, w).astype(np.int64)
    cb = np.clip(np.ceil(xc[1::2] - 0.5), 0, w).astype(np.int64)
    rr = rows[0::2]
    span = cb > ca
    if not span.any():
        return None
    ca, cb, rr = ca[span], cb[span], rr[span]
    r0, c0 = int(rr.min()), int(ca.min())
    diff = np.zeros((int(rr.max()) + 1 - r0, int(cb.max()) + 1 - c0), dtype=np.int32)
    np.add.at(diff, (rr - r0, ca - c0), 1)
    np.add.at(diff, (rr - r0, cb - c0), -1)
    inside = np.cumsum(diff, axis=1)[:, :-1] > 0  # > 0: polygons of one feature add up (union)
    return (slice(r0, r0 + inside.shape[0]), slice(c0, c0 + inside.shape[1])), inside


def level_for_max_side(shapes: Sequence[tuple[int, ...]], max_side: int) -> int:
    """The finest level (index into ``shapes``, largest first) whose longer side is at most
    ``max_side`` pixels (the coarsest level if none is)."""
    for k, s in enumerate(shapes):
        if max(s[-2:]) <= max_side:
            return k
    return len(shapes) - 1


# ---------------------------------------------------------------------------------------------
# patch labels
# ---------------------------------------------------------------------------------------------
def export_patch_labels_csv(table: Any, path: str | Path) -> Path:
    """Write a project's patch labels (``core.data.project.PatchLabelTable``) as CSV: ``slide_id, x,
    y, size0`` (level-0 pixels), one 0/1 column per class name, ``updated``, ``who``."""
    names = list(getattr(table, "class_names", []) or [f"class_{i}" for i in range(table.labels.shape[1])])
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide_id", "x", "y", "size0"] + names + ["updated", "who"])
    for i in range(len(table)):
        wr.writerow([table.slide_id[i], int(table.x[i]), int(table.y[i]), int(table.size0[i])]
                    + [int(v) for v in table.labels[i]] + [table.updated[i], table.who[i]])
    write_text(path, buf.getvalue())
    return Path(path)
