"""Export and metrics panel: a tissue label layer to the formats pathologists' tools open, and
per-class IoU against a ground truth.

Source: any Labels layer of the viewer. The plugin's own layers (pseudo-mask, prediction) store
``class index + 1`` (0 = unlabelled) and say so in ``layer.metadata["histo_wsss"]``; any other
Labels layer (e.g. a palette PNG opened with napari's reader) is read as class indices. Where the
layer sits over the slide (level-0 pixels per layer pixel, origin) comes from its scale/translate
(:meth:`Session.layer_geometry`), so GeoJSON coordinates are level-0 pixels as QuPath expects.

Formats (one dialog, any combination, written in the background by :mod:`core.io.export`):
OME-Zarr labels with the colour table, tiled pyramidal TIFF, palette PNG, QuPath GeoJSON, and the
project's patch labels as CSV.

Metrics: the source layer against a ground-truth Labels layer or mask file (palette/RGB PNG or
TIFF via :func:`core.data.datasets.read_index_mask`, QuPath GeoJSON via
:func:`core.io.export.rasterize_geojson`), resampled to the prediction's raster by nearest neighbour,
scored by :class:`core.metrics.ConfusionMatrix` (background ignored).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.widgets._common import Panel, compact, form_group, guarded
from napari_histo_wsss.widgets._state import GuiError

FORMATS = {
    "ome-zarr": ("OME-Zarr labels", ".ome.zarr"),
    "tiff": ("pyramidal TIFF", ".tif"),
    "png": ("palette PNG", ".png"),
    "png-images": ("palette PNG per image of a patch folder", "/"),
    "geojson": ("QuPath GeoJSON", ".geojson"),
    "csv": ("patch labels CSV", "-patch-labels.csv"),
}
# In-memory rasters (PNG, GeoJSON, metrics) use the finest level whose longer side is at most this.
_MAX_RASTER_SIDE = 16384
_FILE_GT = "mask file..."


def is_plugin_layer(layer: Any) -> bool:
    """True for Labels layers written by this plugin (values = class index + 1)."""
    return (getattr(layer, "metadata", None) or {}).get("histo_wsss") in ("pseudo-mask", "prediction", "corrected",
                                                                         "live-pseudo")


def layer_levels(layer: Any) -> list[Any]:
    """The levels of a Labels layer, largest first (one level when not multiscale)."""
    return list(layer.data) if getattr(layer, "multiscale", False) else [layer.data]


def to_class_index(values: np.ndarray, plugin_layer: bool, same_as: dict | None = None) -> np.ndarray:
    """Layer values -> class indices (plugin layers: value - 1, 0 -> UNLABELLED). ``same_as``
    maps display-only values to the value they stand for (the Review panel's "uncertain" tissue
    is background, as saved: ``layer.metadata["same_as"]``)."""
    from napari_histo_wsss.core.io.export import stored_to_index

    arr = np.asarray(values)
    if same_as:
        arr = arr.copy()
        for shown, value in same_as.items():
            arr[arr == shown] = value
    return stored_to_index(arr) if plugin_layer else arr.astype(np.uint8)


def index_levels(layer: Any) -> list[Any]:
    """The layer's levels as lazy class-index arrays (dask; read chunk by chunk on export)."""
    import dask.array as da

    plugin = is_plugin_layer(layer)
    same_as = (getattr(layer, "metadata", None) or {}).get("same_as")
    out = []
    for lv in layer_levels(layer):
        arr = lv if isinstance(lv, da.Array) else da.from_array(lv, chunks=(1024, 1024))
        out.append(arr.map_blocks(lambda b: to_class_index(b, plugin, same_as), dtype=np.uint8))
    return out


def raster_level(levels: list[Any], max_side: int = _MAX_RASTER_SIDE) -> tuple[int, np.ndarray]:
    """(level index, numpy class indices) of the finest level small enough to hold in memory."""
    from napari_histo_wsss.core.io.export import level_for_max_side

    k = level_for_max_side([tuple(lv.shape) for lv in levels], max_side)
    return k, np.asarray(levels[k])


def nearest_resize(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to ``shape`` (pixel centres aligned)."""
    h, w = shape
    if mask.shape == (h, w):
        return mask
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def score_masks(pred: np.ndarray, gt: np.ndarray, classes: Any) -> dict:
    """mIoU and per-class IoU of class-index ``pred`` against ``gt`` (same shape); unlabelled
    ground truth is ignored like background, unlabelled prediction counts as background."""
    from napari_histo_wsss.core.io.export import UNLABELLED
    from napari_histo_wsss.core.metrics import ConfusionMatrix

    bg = classes.background_index
    gt = np.where(gt == UNLABELLED, bg, gt)
    pred = np.where(pred == UNLABELLED, bg, pred)
    cm = ConfusionMatrix(bg + 1, ignore_index=bg)
    cm.update(pred, gt)
    return cm.scores(classes.names)


@dataclass(eq=False)
class ExportDone(ProgressEvent):
    """One written file, as a progress event of the export job."""

    kind: str = "step"
    path: Path | None = None


class ExportWidget(Panel):
    """Export a label layer in one go to several formats; per-class IoU against a ground truth."""

    heading = "Export and metrics"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.written: list[Path] = []
        self.last_scores: dict | None = None

        box, form = form_group("Export")
        self.source = compact(QComboBox())
        self.source.setToolTip("the Labels layer to export (pseudo-mask, prediction, ...)")
        form.addRow("Layer", self.source)
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("output folder")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.basename = QLineEdit()
        self.basename.setPlaceholderText("file name stem (default: slide and layer)")
        form.addRow("Name", self.basename)
        self.format_boxes: dict[str, QCheckBox] = {}
        for key, (title, suffix) in FORMATS.items():
            cb = QCheckBox(f"{title} ({suffix})")
            cb.setChecked(key in ("ome-zarr", "geojson"))
            if key == "geojson":  # written with core.io.export's defaults, as `histo-wsss export` does
                from napari_histo_wsss.core.io.export import GEOJSON_TOLERANCE

                cb.setToolTip(f"one MultiPolygon per class, holes as inner rings, outlines simplified by "
                              f"{GEOJSON_TOLERANCE:g} px of the exported level; level-0 pixel coordinates")
            self.format_boxes[key] = cb
            form.addRow(cb)
        self.export_btn = QPushButton("Export")
        self.export_btn.clicked.connect(self._on_export)
        form.addRow(self.export_btn)
        self.files_label = QLabel("")
        self.files_label.setWordWrap(True)
        form.addRow(self.files_label)
        self.main_layout.addWidget(box)

        box, form = form_group("Metrics")
        self.gt = compact(QComboBox())
        self.gt.setToolTip("ground truth: a Labels layer (class indices) or a mask file")
        self.gt.currentTextChanged.connect(self._on_gt_choice)
        form.addRow("Ground truth", self.gt)
        self.gt_file = QLineEdit()
        self.gt_file.setPlaceholderText("mask file (.png, .tif, .geojson) covering the whole slide")
        gbtn = QPushButton("...")
        gbtn.setMaximumWidth(30)
        gbtn.clicked.connect(self._browse_gt)
        row = QHBoxLayout()
        row.addWidget(self.gt_file, 1)
        row.addWidget(gbtn)
        form.addRow(row)
        self.score_btn = QPushButton("Compute IoU")
        self.score_btn.clicked.connect(self._on_score)
        form.addRow(self.score_btn)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        form.addRow(self.summary)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["class", "IoU", "GT pixels"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setMaximumHeight(160)
        form.addRow(self.table)
        self.main_layout.addWidget(box)
        self.finish_layout()

        self.task = self.session.task("export", "Export")
        self.task.event.connect(self._on_written)
        self.task.finished.connect(self._on_finished)
        self.watch(self.task)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- layer lists ---------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        labels = [layer.name for layer in self.viewer.layers if layer.__class__.__name__ == "Labels"
                  and layer.metadata.get("histo_wsss") != "reviewed"]
        for combo, extra in ((self.source, []), (self.gt, [_FILE_GT])):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(labels + extra)
            if current in labels + extra:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_gt_choice(self.gt.currentText())

    def _on_gt_choice(self, text: str) -> None:
        self.gt_file.setEnabled(text == _FILE_GT)

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export folder", self.folder.text())
        if d:
            self.folder.setText(d)

    def _browse_gt(self) -> None:
        p, _f = QFileDialog.getOpenFileName(self, "Ground-truth mask", "", "Masks (*.png *.tif *.tiff *.geojson *.json);;All files (*)")
        if p:
            self.gt_file.setText(p)
            self.gt.setCurrentText(_FILE_GT)

    def _source_layer(self) -> Any:
        name = self.source.currentText()
        layer = self.session.layer(name)
        if layer is None:
            raise GuiError("no label layer to export: compute a pseudo-mask (Review panel) or a prediction first"
                           if not name else f"layer {name!r} no longer exists (deleted?)")
        return layer

    # -- export --------------------------------------------------------------------------------
    @guarded
    def _on_export(self, *_: Any) -> None:
        self.export()

    def export(self, formats: list[str] | None = None, folder: str | Path | None = None) -> list[Path]:
        """Start writing the source layer in ``formats`` (default: the ticked boxes) to ``folder``;
        returns the paths that will be written."""
        if self.task.running:
            raise GuiError("an export is already running")
        project = self.session.require_project()
        layer = self._source_layer()
        formats = formats if formats is not None else [k for k, cb in self.format_boxes.items() if cb.isChecked()]
        if not formats:
            raise GuiError("tick at least one format")
        text = str(folder) if folder is not None else self.folder.text().strip()
        if not text:
            raise GuiError("choose an output folder")
        out = Path(text).expanduser()
        stem = self.basename.text().strip() or f"{self.session.slide_id or 'labels'}-{layer.name}".replace(" ", "_")
        ds, origin = self.session.layer_geometry(layer)
        mpp = getattr(self.session.slide, "mpp", None)
        classes = project.classes
        levels = index_levels(layer)
        if is_plugin_layer(layer) and not getattr(layer, "multiscale", False):
            levels = [np.asarray(to_class_index(np.array(layer.data, copy=True), True,  # a snapshot: painting may go on
                                                layer.metadata.get("same_as")))]
        table = project.patch_labels() if "csv" in formats else None
        regions = getattr(self.session.slide, "regions", None)
        if "png-images" in formats and not regions:
            raise GuiError("'palette PNG per image' needs a patch folder as the current slide")
        if "png-images" in formats:  # never into the patch folder: new PNGs there would change it
            from napari_histo_wsss.core.io.atomic import check_apart

            check_apart(out, inputs=[self.session.slide.path], what="output folder")
        paths = {k: out / (stem if k == "png-images" else f"{stem}{FORMATS[k][1]}") for k in formats}

        def job(should_stop: Callable[[], bool]) -> Iterator[ExportDone]:
            from napari_histo_wsss.core.io import export as ex

            out.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            for i, (key, path) in enumerate(paths.items(), start=1):
                if should_stop():
                    return
                if key == "ome-zarr":
                    ex.export_ome_zarr(levels[0], path, classes, downsample=ds, mpp=mpp, overwrite=True)
                elif key == "tiff":
                    ex.export_tiff(levels, path, classes, downsample=ds, mpp=mpp)
                elif key == "png-images":
                    if ex.export_patch_folder_pngs(levels[0], regions, path, classes, downsample=ds, origin=origin,
                                                   should_stop=should_stop) is None:
                        return
                elif key in ("png", "geojson"):
                    k, arr = raster_level(levels)
                    lds = ds * levels[0].shape[0] / levels[k].shape[0]
                    if key == "png":
                        ex.export_palette_png(arr, path, classes)
                    elif ex.export_geojson(arr, path, classes, downsample=lds, origin=origin,
                                           should_stop=should_stop) is None:
                        return  # cancelled between classes: that file was not written
                else:
                    ex.export_patch_labels_csv(table, path)
                spent = time.monotonic() - t0
                yield ExportDone(path=path, step=i, steps=len(paths), message=path.name,
                                 eta_s=spent / i * (len(paths) - i))

        self.written = []
        self.files_label.setText("")
        self.task.start(job, f"Export of {layer.name}")
        self.say(f"exporting {layer.name} to {out} ({', '.join(formats)})")
        return list(paths.values())

    def _on_written(self, ev: Any) -> None:
        if isinstance(ev, ExportDone):
            self.written.append(ev.path)
            self.files_label.setText("written: " + ", ".join(p.name for p in self.written))

    def _on_finished(self, outcome: str) -> None:
        if outcome == "done":
            self.say(f"exported {len(self.written)} file(s) to {self.written[0].parent if self.written else ''}", notify=True)
        elif outcome == "cancelled":
            kept = ", ".join(p.name for p in self.written) or "none"
            self.say(f"export cancelled; files written before: {kept} (no file was left half-written)")

    # -- metrics -------------------------------------------------------------------------------
    @guarded
    def _on_score(self, *_: Any) -> None:
        self.score()

    def ground_truth(self, shape: tuple[int, int], downsample: float, origin: tuple[float, float]) -> np.ndarray:
        """The chosen ground truth as class indices on a raster of ``shape`` (h, w)."""
        from napari_histo_wsss.core.data.datasets import read_index_mask
        from napari_histo_wsss.core.io.export import rasterize_geojson

        project = self.session.require_project()
        if self.gt.currentText() == _FILE_GT:
            text = self.gt_file.text().strip()
            if not text:
                raise GuiError("choose a ground-truth mask file")
            path = Path(text).expanduser()
            if not path.is_file():
                raise GuiError(f"{path}: no such file")
            if path.suffix.lower() in (".geojson", ".json"):
                return rasterize_geojson(path, shape, project.classes, downsample=downsample, origin=origin)
            return nearest_resize(read_index_mask(path, project.classes), shape)
        layer = self.session.layer(self.gt.currentText())
        if layer is None:
            raise GuiError("choose a ground-truth layer or mask file")
        _k, arr = raster_level(index_levels(layer))
        return nearest_resize(arr, shape)

    def score(self) -> dict:
        """Per-class IoU of the source layer against the ground truth; fills the table."""
        project = self.session.require_project()
        layer = self._source_layer()
        if self.gt.currentText() == layer.name:
            raise GuiError("the ground truth is the layer being scored: choose another layer or a file")
        levels = index_levels(layer)
        k, pred = raster_level(levels, 4096)
        ds, origin = self.session.layer_geometry(layer)
        lds = ds * levels[0].shape[0] / levels[k].shape[0]
        t0 = time.monotonic()
        gt = self.ground_truth(pred.shape, lds, origin)
        scores = score_masks(pred, gt, project.classes)
        self.last_scores = scores
        self.table.setRowCount(0)
        for name, iou in scores["per_class_iou"].items():
            r = self.table.rowCount()
            self.table.insertRow(r)
            self.table.setItem(r, 0, QTableWidgetItem(name))
            self.table.setItem(r, 1, QTableWidgetItem("-" if iou is None else f"{iou:.3f}"))
            self.table.setItem(r, 2, QTableWidgetItem(str(scores["gt_pixels"].get(name, 0))))
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        self.summary.setText(f"mIoU {fmt(scores['miou'])} · fwIoU {fmt(scores['fwiou'])} · pixel acc. "
                             f"{fmt(scores['pixel_accuracy'])} (background ignored; {pred.shape[1]}x{pred.shape[0]} px, "
                             f"{time.monotonic() - t0:.1f} s)")
        self.say(f"scored {layer.name}: mIoU {fmt(scores['miou'])}")
        return scores
