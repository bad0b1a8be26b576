"""Review and correct panel: CAMs and pseudo-masks over the slide, live thresholds, corrections.

The model of this step lives in :mod:`core.review` (the slide canvas, its tiling, the automatic
pseudo-mask, the corrected-pixel rules and the project mask names); this panel shows it and
turns the pathologist's strokes into :class:`~..core.review.Corrections`.

Compute (background job): :func:`core.review.compute_slide_cams` - the same job as
``histo-wsss cams`` - applies a run's classifier to the slide tile by tile and stores the project
masks ``cam``, ``cam_probs`` and ``pseudo``; each finished tile is shown at once.

Layers (all placed over the slide with :meth:`Session.overlay_transform`):

* ``CAM <class>`` - one Image layer per class, black-to-class-colour colormap, additive blending,
  contrast limits 0..1;
* ``pseudo-mask`` - a Labels layer holding ``class index + 1`` (0 = unlabelled) with the class
  colour table and the class names as features; it is the layer the pathologist edits with
  napari's brush, fill and eraser;
* ``reviewed`` - the outline of the regions marked reviewed.

Sliders (CAM threshold, gating probability, white-background grey level) recompute the automatic
mask tile by tile (:func:`core.review.pseudo_tiles`) and redraw it; pixels the user corrected are
kept. Painting or filling marks pixels touched (napari's ``paint`` event); undo restores the
automatic value so the corrected flag clears by itself. Corrections autosave (debounced) and on
"Save" as ``pseudo``, ``corrected``, ``corrected_flag`` and ``reviewed``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.review import (
    CLASSIFIER_RUN_PREFIX,
    MASK_CORRECTED,
    MASK_PSEUDO,
    CamCanvas,
    CamPlan,
    CamTile,
    Corrections,
    PseudoTile,
    ReviewSettings,
    calibrated_gating,
    compute_slide_cams,
    corrections_for_plan,
    list_runs,
    load_canvas,
    load_corrections,
    plan_slide_cams,
    pseudo_from_canvas,
    pseudo_tile,
    pseudo_tiles,
    white_tile,
)
from napari_histo_wsss.widgets._common import Panel, clear_layout, color_swatch, compact, form_group, guarded, label_colormap, same_layer
from napari_histo_wsss.widgets._state import GuiError

CAM_PREFIX = "CAM "
PSEUDO_LAYER = "pseudo-mask"
REVIEWED_LAYER = "reviewed"
_REVIEWED_RGBA = (0.0, 0.9, 0.9, 1.0)
_AUTOSAVE_MS = 1500
_REDRAW_MS = 60
_REFRESH_S = 0.3  # at most this often the CAM layers are re-uploaded while tiles arrive
_DEFAULTS = ReviewSettings()
_AS_TRAINED = "as trained"  # the CAM mode entry that stands for ReviewSettings.mode None (the run's cam_mode)

# ---------------------------------------------------------------------------------------------
# the panel
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# the panel
# ---------------------------------------------------------------------------------------------
def format_area(pixels: int, um_per_px: float | None) -> str:
    """'0.042 mm²', '830 µm²' or, without a pixel size, '57 px'."""
    if um_per_px is None:
        return f"{pixels} px"
    um2 = pixels * um_per_px**2
    return f"{um2 / 1e6:.3f} mm²" if um2 >= 1e4 else f"{um2:.0f} µm²"


def _slider(lo: int, hi: int, value: int) -> QSlider:
    s = QSlider(Qt.Orientation.Horizontal)
    s.setRange(lo, hi)
    s.setValue(value)
    return s


def cam_colormap(rgb: tuple[int, int, int], name: str) -> Any:
    """Black -> class colour, for additive blending of the per-class CAM layers."""
    from napari.utils.colormaps import Colormap

    return Colormap([[0.0, 0.0, 0.0, 1.0], [rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, 1.0]], name=f"cam-{name}")


class ReviewWidget(Panel):
    """CAMs and pseudo-masks of the current slide; live thresholds; corrections and review marks."""

    heading = "CAMs, pseudo-masks and corrections"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.canvas: CamCanvas | None = None
        self.edits: Corrections | None = None
        self.mask_layer: Any = None
        self.cam_layers: dict[int, Any] = {}
        self._slide_id: str | None = None
        self._dirty = False
        self._last_refresh = 0.0

        box, form = form_group("Classifier")
        self.runs = compact(QComboBox())
        self.runs.setToolTip("a finished (or cancelled) classifier run of this project")
        form.addRow("Run", self.runs)
        self.which = QComboBox()
        self.which.addItems(["best", "last"])
        form.addRow("Checkpoint", self.which)
        self.mode = QComboBox()
        for text, mode in ((_AS_TRAINED, None), ("last", "last"), ("multi", "multi")):
            self.mode.addItem(text, mode)
        self.mode.setCurrentIndex(self.mode.findData(_DEFAULTS.mode))
        self.mode.setToolTip(f"{_AS_TRAINED}: the run's cam_mode, the CAMs its validation scored (the core's default); "
                             "last: classic CAM; multi: last-stage CAM fused with two earlier stages (finer)")
        form.addRow("CAM mode", self.mode)
        self.tile = QSpinBox()
        self.tile.setRange(64, 4096)
        self.tile.setSingleStep(64)
        self.tile.setValue(_DEFAULTS.tile)
        self.tile.setSuffix(" px")
        self.tile.setToolTip("tile side in model pixels; gating uses one class probability per tile")
        form.addRow("Tile", self.tile)
        self.max_side = QSpinBox()
        self.max_side.setRange(256, 16384)
        self.max_side.setSingleStep(256)
        self.max_side.setValue(_DEFAULTS.max_side)
        self.max_side.setSuffix(" px")
        self.max_side.setToolTip("the editable mask is at most this many pixels across (painting stays fast)")
        form.addRow("Max. mask side", self.max_side)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device", self.device)
        row = QHBoxLayout()
        self.compute_btn = QPushButton("Compute CAMs")
        self.compute_btn.clicked.connect(self._on_compute)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self._on_cancel)
        self.load_btn = QPushButton("Load saved")
        self.load_btn.setToolTip("show the CAMs, pseudo-mask and corrections saved in the project")
        self.load_btn.clicked.connect(self._on_load)
        row.addWidget(self.compute_btn)
        row.addWidget(self.cancel_btn)
        row.addWidget(self.load_btn)
        form.addRow(row)
        self.main_layout.addWidget(box)

        box, form = form_group("Pseudo-mask")
        self.cam_thr = _slider(0, 100, int(round(_DEFAULTS.cam_threshold * 100)))
        self.cam_thr_label = QLabel()
        form.addRow("CAM threshold", self._with_label(self.cam_thr, self.cam_thr_label))
        self.gating = _slider(0, 100, 50)
        self.gating_label = QLabel()
        form.addRow("Gating (class prob.)", self._with_label(self.gating, self.gating_label))
        self.white = _slider(150, 255, _DEFAULTS.white_level)
        self.white_label = QLabel()
        form.addRow("White background", self._with_label(self.white, self.white_label))
        self.show_cams = QCheckBox("Show CAM layers")
        self.show_cams.setChecked(True)
        self.show_cams.toggled.connect(self._on_show_cams)
        form.addRow(self.show_cams)
        for s in (self.cam_thr, self.gating, self.white):
            s.valueChanged.connect(self._on_slider)
        self.main_layout.addWidget(box)

        box, form = form_group("Corrections")
        hint = QLabel("Edit the pseudo-mask layer with napari's brush (P), fill (F) and eraser (E); "
                      "choose the class here. Ctrl+Z undoes.")
        hint.setWordWrap(True)
        form.addRow(hint)
        self.paint_class = QComboBox()
        self.paint_class.currentIndexChanged.connect(self._on_paint_class)
        form.addRow("Paint class", self.paint_class)
        self.area_grid = QGridLayout()
        form.addRow(self.area_grid)
        self.review_label = QLabel("reviewed: 0%")
        form.addRow(self.review_label)
        row = QHBoxLayout()
        self.review_btn = QPushButton("Mark view reviewed")
        self.review_btn.clicked.connect(self._on_review)
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.clicked.connect(self._on_undo)
        self.save_btn = QPushButton("Save")
        self.save_btn.clicked.connect(self._on_save)
        row.addWidget(self.review_btn)
        row.addWidget(self.undo_btn)
        row.addWidget(self.save_btn)
        form.addRow(row)
        self.show_btn = QPushButton("Show layers again")
        self.show_btn.setToolTip("re-add the CAM and pseudo-mask layers (e.g. after deleting them)")
        self.show_btn.clicked.connect(self._on_show_layers)
        self.save_label = QLabel("")
        row = QHBoxLayout()
        row.addWidget(self.save_label, 1)
        row.addWidget(self.show_btn)
        form.addRow(row)
        self.main_layout.addWidget(box)
        self.finish_layout()

        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(_AUTOSAVE_MS)
        self._autosave.timeout.connect(self._autosave_now)
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(_REDRAW_MS)
        self._redraw_timer.timeout.connect(self.recompute_pseudo)
        self._stats_timer = QTimer(self)
        self._stats_timer.setSingleShot(True)
        self._stats_timer.setInterval(_REDRAW_MS)
        self._stats_timer.timeout.connect(self._update_stats)

        self._white_cache: dict = {}
        self._pseudo_again = False
        self._pseudo_started = 0.0
        self.redraw_seconds: float | None = None
        self.tiles_in_view = 0
        self.pseudo_task = self.session.task("pseudo", "Pseudo-mask redraw", quiet=True)
        self.pseudo_task.event.connect(self._on_pseudo_tile)
        self.pseudo_task.finished.connect(self._on_pseudo_finished)
        self.watch(self.pseudo_task)
        self.save_task = self.session.task("save-corrections", "Saving corrections", quiet=True)
        self.save_task.finished.connect(self._on_autosaved)
        self.watch(self.save_task)
        self.task = self.session.task("cams", "CAMs")
        self.task.event.connect(self._on_tile)
        self.task.finished.connect(self._on_finished)
        self.watch(self.task)
        self.session.project_changed.connect(self._on_project)
        self.session.slide_changed.connect(self._on_slide)
        self.session.runs_changed.connect(self._refresh_runs)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._update_slider_labels()
        self._on_project()

    @staticmethod
    def _with_label(slider: QSlider, label: QLabel) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addWidget(slider, 1)
        label.setMinimumWidth(36)
        row.addWidget(label)
        return row

    # -- settings ------------------------------------------------------------------------------
    @property
    def cam_threshold(self) -> float:
        return self.cam_thr.value() / 100.0

    @property
    def gating_threshold(self) -> float:
        return self.gating.value() / 100.0

    @property
    def white_level(self) -> int | None:
        p = self.session.project
        if p is None or not p.classes.white_background:
            return None
        return int(self.white.value())

    def _update_slider_labels(self) -> None:
        self.cam_thr_label.setText(f"{self.cam_threshold:.2f}")
        self.gating_label.setText(f"{self.gating_threshold:.2f}")
        wl = self.white_level
        self.white_label.setText(f"> {self.white.value()}" if wl is not None else "off")

    # -- project / slide / runs ----------------------------------------------------------------
    def _on_project(self) -> None:
        p = self.session.project
        self.white.setEnabled(p is not None and p.classes.white_background)
        self.white.setToolTip("grey level above which pixels are white glass (background)" if self.white.isEnabled()
                              else "this class table keeps white pixels (e.g. fat in breast tissue)")
        self.paint_class.blockSignals(True)
        self.paint_class.clear()
        if p is not None:
            for c in p.classes.classes:
                self.paint_class.addItem(c.name)
            self.paint_class.addItem("background / exclude")
        self.paint_class.blockSignals(False)
        self._rebuild_area_table()
        self._refresh_runs()
        self._update_slider_labels()
        self._on_slide()

    def _refresh_runs(self) -> None:
        current = self.runs.currentText()
        self.runs.clear()
        p = self.session.project
        if p is not None:
            for r in list_runs(Path(p.runs_dir), CLASSIFIER_RUN_PREFIX):
                self.runs.addItem(r.name, str(r))
        if current:
            self.runs.setCurrentText(current)

    def _on_slide(self) -> None:
        if self.session.slide_id == self._slide_id and self.canvas is not None:
            return
        if self._dirty:
            self.save()  # never drop corrections of the previous slide
        if self.task.running:
            self.task.cancel()
        self._clear()
        self._slide_id = self.session.slide_id

    def _clear(self) -> None:
        if self.pseudo_task.running:
            self.pseudo_task.cancel()
            self.pseudo_task.wait(10)
        self.canvas = None
        self.edits = None
        self._white_cache = {}
        self._dirty = False
        for name in [PSEUDO_LAYER, REVIEWED_LAYER] + [l.name for l in self.viewer.layers if l.name.startswith(CAM_PREFIX)]:
            layer = self.session.layer(name)
            if layer is not None:
                self.viewer.layers.remove(layer)
        self.mask_layer = None
        self.cam_layers = {}
        self._update_stats()

    # -- compute -------------------------------------------------------------------------------
    @guarded
    def _on_compute(self, *_: Any) -> None:
        self.compute()

    @guarded
    def _on_cancel(self, *_: Any) -> None:
        if not self.task.running:
            self.say("no CAM computation is running")
            return
        self.task.cancel()
        self.say("cancelling: tiles computed so far are kept")

    def compute(self, run_dir: str | Path | None = None) -> CamPlan:
        """Start computing the CAMs of the current slide with a run's classifier (background):
        :func:`core.review.compute_slide_cams`, the job of ``histo-wsss cams``."""
        if self.task.running:
            raise GuiError("CAMs are already being computed: wait for them or press Cancel")
        project = self.session.require_project()
        sid, _slide = self.session.require_slide()
        self.session.require_grid()
        if run_dir is None:
            data = self.runs.currentData()
            if not data:
                raise GuiError("no classifier run in this project yet: train one in the Training panel first")
            run_dir = data
        run_dir = Path(run_dir)
        which = self.which.currentText()
        if not (run_dir / "checkpoints" / f"{which}.pt").is_file():
            raise GuiError(f"{run_dir / 'checkpoints' / (which + '.pt')}: no such checkpoint; the run has not finished an epoch yet")
        if self._dirty:
            self.save()
        plan = plan_slide_cams(project, sid, self.tile.value(), self.max_side.value())
        chosen = calibrated_gating(run_dir, which)
        if chosen is not None:  # start the gating slider where the run's validation put it
            self.gating.setValue(int(round(chosen * 100)))
        settings = ReviewSettings(which=which, mode=self.mode.currentData(), tile=self.tile.value(),
                                  max_side=self.max_side.value(), device=self.device.currentText(),
                                  cam_threshold=self.cam_threshold, gating=self.gating_threshold,
                                  white_level=int(self.white.value()))
        self._start_canvas(project, plan)

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            return compute_slide_cams(project, sid, run_dir, settings, should_stop, overwrite=True,
                                      save=not project.read_only, keep_partial=True, plan=plan)

        self.task.start(job, f"CAMs of {sid}")
        kept = int(self.edits.flag().sum()) if self.edits is not None else 0
        self.say(f"computing CAMs of {sid} with {run_dir.name} ({which}): {len(plan.tiles)} tiles, "
                 f"mask {plan.shape[1]}x{plan.shape[0]} px at {plan.downsample:.2f}x"
                 + (f"; {kept} corrected pixels kept" if kept else ""))
        return plan

    def _start_canvas(self, project: Any, plan: CamPlan) -> None:
        self._clear()
        self._slide_id = sid = self.session.slide_id
        c = project.classes.num_classes
        self.canvas = CamCanvas.empty(c, plan.shape, plan.tile, plan.downsample)
        try:  # recomputing keeps the saved corrections: new tiles replace only automatic values
            self.edits = corrections_for_plan(project, sid, plan)
        except HistoWSSSError as e:
            self.say(f"the saved corrections of {sid} cannot be read ({e}); starting without them")
            self.edits = Corrections(np.full(plan.shape, project.classes.background_index, dtype=np.uint8), c)
        self.show_layers()

    def _on_tile(self, ev: Any) -> None:
        if not isinstance(ev, CamTile) or self.canvas is None or self.edits is None:
            return
        region = self.canvas.put(ev.ty, ev.tx, ev.cams, ev.probs, ev.rgb)
        project = self.session.require_project()
        white = white_tile(self.canvas, ev.ty, ev.tx, self.white_level)
        self._white_cache[(self.white_level, ev.ty, ev.tx)] = white
        self.edits.set_auto(pseudo_tile(self.canvas, project.classes, ev.ty, ev.tx, self.cam_threshold,
                                        self.gating_threshold, white), region)
        now = time.monotonic()
        if now - self._last_refresh > _REFRESH_S or ev.step == ev.steps:
            self._last_refresh = now
            self._refresh_layers()

    def _on_finished(self, outcome: str) -> None:
        if self.canvas is None:
            return
        self._refresh_layers()
        n = len(self.canvas.computed_tiles())
        if outcome == "failed":
            return
        try:
            self.save()
        except HistoWSSSError as e:
            self.fail(str(e))
            return
        if outcome == "done":
            self.say(f"CAMs and pseudo-mask of {self._slide_id} ready ({n} tiles); correct the pseudo-mask layer", notify=True)
        else:
            self.say(f"CAM computation cancelled after {n} tiles; those are shown and saved")

    # -- layers --------------------------------------------------------------------------------
    def show_layers(self) -> None:
        """(Re-)add the CAM image layers, the pseudo-mask Labels layer and the reviewed outline."""
        project = self.session.require_project()
        if self.canvas is None or self.edits is None:
            raise GuiError("no CAMs yet: press 'Compute CAMs' (or 'Load saved')")
        tf = self.session.overlay_transform(self.canvas.downsample)
        for i, cdef in enumerate(project.classes.classes):
            layer = self.session.replace_layer(
                f"{CAM_PREFIX}{cdef.name}", self.viewer.add_image, data=self.canvas.cams[i],
                colormap=cam_colormap(cdef.color, cdef.name), blending="additive", contrast_limits=(0.0, 1.0),
                visible=self.show_cams.isChecked(), **tf,
            )
            layer.metadata["histo_wsss"] = "cam"
            self.cam_layers[i] = layer
        layer = self.session.replace_layer(
            REVIEWED_LAYER, self.viewer.add_labels, data=self.edits.reviewed.view(np.uint8),
            colormap=label_colormap({1: _REVIEWED_RGBA}), opacity=0.9, **tf,
        )
        layer.contour = 2
        layer.editable = False
        names = ["unlabelled"] + project.classes.names + ["background / exclude"]
        layer = self.session.replace_layer(
            PSEUDO_LAYER, self.viewer.add_labels, data=self.edits.data,
            colormap=label_colormap(project.classes.label_colormap()), opacity=0.55,
            features={"index": np.arange(len(names)), "class": names}, **tf,
        )
        layer.metadata["histo_wsss"] = "pseudo-mask"
        layer.events.paint.connect(self._on_paint)
        layer.bind_key("Control-Z", lambda _l: self.undo(), overwrite=True)
        self.mask_layer = layer
        self._on_paint_class(self.paint_class.currentIndex())
        self.viewer.layers.selection.active = layer
        self._update_stats()

    def _refresh_layers(self) -> None:
        for layer in self.cam_layers.values():
            layer.refresh()
        if self.mask_layer is not None:
            self.mask_layer.refresh()
        self._update_stats()

    @guarded
    def _on_show_layers(self, *_: Any) -> None:
        self.show_layers()
        self.say("layers shown")

    def _on_show_cams(self, on: bool) -> None:
        for layer in self.cam_layers.values():
            layer.visible = on

    def _on_layer_removed(self, event: Any) -> None:
        removed = event.value
        if same_layer(removed, self.mask_layer):
            self.mask_layer = None
            if self.edits is not None:
                self.say("the pseudo-mask layer was deleted; your corrections are kept in memory and saved. "
                         "Press 'Show layers again' to continue.")
                if self._dirty:
                    self._autosave_now()
        for i, layer in list(self.cam_layers.items()):
            if same_layer(layer, removed):
                del self.cam_layers[i]

    def _on_paint_class(self, index: int) -> None:
        if self.mask_layer is not None and index >= 0:
            self.mask_layer.selected_label = index + 1

    # -- sliders -------------------------------------------------------------------------------
    def _on_slider(self, *_: Any) -> None:
        self._update_slider_labels()
        self._redraw_timer.start()

    def recompute_pseudo(self) -> None:
        """Apply the sliders to the mask (corrected pixels are kept): the tiles are recomputed in
        the background, those in view first, and drawn as they arrive."""
        if self.canvas is None or self.edits is None or self.session.project is None:
            return
        if self.pseudo_task.running:
            self._pseudo_again = True  # the sliders moved again: restart when this pass stops
            self.pseudo_task.cancel()
            return
        canvas, classes = self.canvas, self.session.project.classes
        tiles = self._tiles_in_view_order()
        args = (canvas, classes, tiles, self.cam_threshold, self.gating_threshold, self.white_level, self._white_cache)
        self._pseudo_started = time.perf_counter()
        self.pseudo_task.start(lambda should_stop: pseudo_tiles(*args, should_stop), "Pseudo-mask")

    def _tiles_in_view_order(self) -> list[tuple[int, int]]:
        """Computed tiles, those meeting the visible part of the mask first (nearest the centre first)."""
        canvas = self.canvas
        r0, c0, r1, c1 = self._visible_box()
        cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
        t = canvas.tile

        def key(tile: tuple[int, int]) -> tuple[int, float]:
            ty, tx = tile
            visible = ty * t < r1 and (ty + 1) * t > r0 and tx * t < c1 and (tx + 1) * t > c0
            return (0 if visible else 1, ((ty + 0.5) * t - cy) ** 2 + ((tx + 0.5) * t - cx) ** 2)

        order = sorted(canvas.computed_tiles(), key=key)
        self.tiles_in_view = sum(1 for tile in order if key(tile)[0] == 0)
        return order

    def _on_pseudo_tile(self, ev: Any) -> None:
        if not isinstance(ev, PseudoTile) or self.canvas is None or self.edits is None:
            return
        self.edits.set_auto(ev.mask, self.canvas.tile_slices(ev.ty, ev.tx))
        now = time.monotonic()
        if now - self._last_refresh > _REFRESH_S / 3 or ev.step == ev.steps:
            self._last_refresh = now
            if self.mask_layer is not None:
                self.mask_layer.refresh()

    def _on_pseudo_finished(self, outcome: str) -> None:
        if self._pseudo_again:
            self._pseudo_again = False
            self.recompute_pseudo()
            return
        if outcome != "done":
            return
        self.redraw_seconds = time.perf_counter() - self._pseudo_started
        if self.mask_layer is not None:
            self.mask_layer.refresh()
        self._mark_dirty()
        self._update_stats()

    # -- corrections ---------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        # napari emits "paint" before it writes the new values: count them a moment later
        if self.edits is None:
            return
        self.edits.touch_from_paint(event.value)
        self._mark_dirty()
        self._stats_timer.start()

    def _mark_dirty(self) -> None:
        self._dirty = True
        self.save_label.setText("<span style='color:#ffb74d'>unsaved changes (autosave soon)</span>")
        self._autosave.start()

    @guarded
    def _on_undo(self, *_: Any) -> None:
        self.undo()

    def undo(self) -> None:
        """Undo the last paint/fill/erase stroke on the pseudo-mask layer."""
        if self.mask_layer is None:
            raise GuiError("the pseudo-mask layer is not shown: press 'Show layers again'")
        if not self.mask_layer._undo_history:  # noqa: SLF001 - napari keeps no public "can undo"
            self.say("nothing to undo")
            return
        self.mask_layer.undo()
        self._mark_dirty()
        self._update_stats()

    @guarded
    def _on_review(self, *_: Any) -> None:
        self.mark_reviewed()

    def mark_reviewed(self, box: tuple[int, int, int, int] | None = None) -> float:
        """Mark the canvas box (row0, col0, row1, col1) - default the visible part of the mask - reviewed;
        returns the reviewed fraction of the tissue tiles."""
        if self.edits is None or self.canvas is None:
            raise GuiError("no pseudo-mask yet: compute or load the CAMs first")
        if box is None:
            box = self._visible_box()
        r0, c0, r1, c1 = box
        self.edits.reviewed[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
        layer = self.session.layer(REVIEWED_LAYER)
        if layer is not None:
            layer.refresh()
        self._mark_dirty()
        self._update_stats()
        return self.reviewed_fraction()

    def _visible_box(self) -> tuple[int, int, int, int]:
        layer = self.mask_layer
        h, w = self.canvas.shape if self.canvas is not None else (0, 0)
        if layer is None:
            return (0, 0, h, w)
        cp = np.asarray(layer.corner_pixels)
        if cp.shape != (2, 2) or not (cp[1] > cp[0]).all():
            return (0, 0, h, w)
        return (int(cp[0, 0]), int(cp[0, 1]), int(cp[1, 0]) + 1, int(cp[1, 1]) + 1)

    def reviewed_fraction(self) -> float:
        if self.edits is None or self.canvas is None:
            return 0.0
        region = self.canvas.computed_region()
        total = int(region.sum())
        return float((self.edits.reviewed & region).sum()) / total if total else 0.0

    def _rebuild_area_table(self) -> None:
        clear_layout(self.area_grid)
        self._area_labels: list[QLabel] = []
        p = self.session.project
        if p is None:
            return
        self.area_grid.addWidget(QLabel("<i>corrected area</i>"), 0, 0, 1, 3)
        rows = [(c.name, c.color) for c in p.classes.classes]
        bgc = p.classes.background.color if p.classes.background is not None else (255, 255, 255)
        rows.append(("background / erased", bgc))
        for r, (name, color) in enumerate(rows, start=1):
            self.area_grid.addWidget(color_swatch(color), r, 0)
            self.area_grid.addWidget(QLabel(name), r, 1)
            lab = QLabel("0")
            lab.setAlignment(Qt.AlignmentFlag.AlignRight)
            self.area_grid.addWidget(lab, r, 2)
            self._area_labels.append(lab)

    def _update_stats(self) -> None:
        labels = getattr(self, "_area_labels", [])
        if self.edits is None or self.canvas is None:
            for lab in labels:
                lab.setText("0")
            self.review_label.setText("reviewed: 0%")
            return
        px = self.edits.area_per_class()
        slide = self.session.slide
        mpp = getattr(slide, "mpp", None)
        for lab, n in zip(labels, px):
            lab.setText(format_area(int(n), self.canvas.downsample * mpp if mpp else None))
        self.review_label.setText(f"reviewed: {100 * self.reviewed_fraction():.0f}% of the tissue tiles")

    # -- save / load ---------------------------------------------------------------------------
    @guarded
    def _on_save(self, *_: Any) -> None:
        self.save()
        self.say("corrections saved to the project")

    def _snapshot(self) -> dict[str, np.ndarray]:
        """The masks to save, copied (painting may go on while they are written)."""
        return self.edits.masks()

    def _autosave_now(self) -> None:
        """Autosave in the background (writing slide-sized masks must not freeze painting)."""
        if not self._dirty or self.edits is None or self.canvas is None or self._slide_id is None:
            return
        if self.save_task.running:
            self._autosave.start()  # a save is being written: try again shortly
            return
        project = self.session.project
        if project is None:
            return
        sid, ds, arrays = self._slide_id, self.canvas.downsample, self._snapshot()

        def job(should_stop: Callable[[], bool]) -> Iterator[str]:
            for name, arr in arrays.items():
                project.write_mask(sid, name, arr, ds)
                yield name

        self._dirty = False
        self.save_label.setText("saving...")
        self.save_task.start(job, "Saving corrections")

    def _on_autosaved(self, outcome: str) -> None:
        if outcome == "done":
            if not self._dirty:
                self.save_label.setText("all corrections saved")
            self.session.mask_saved.emit(MASK_CORRECTED)
        elif outcome == "failed":
            self._dirty = True  # kept in memory; retried on the next edit or 'Save'
            self.save_label.setText("<span style='color:#ff6b6b'>NOT saved (kept in memory)</span>")

    def save(self) -> None:
        """Write pseudo, corrected, corrected_flag and reviewed to the project now (the CAMs
        themselves are written by the CAM job)."""
        if self.edits is None or self.canvas is None or self._slide_id is None:
            return
        project = self.session.require_project()
        if self.save_task.running:
            self.save_task.wait(60)
        sid, ds = self._slide_id, self.canvas.downsample
        try:
            for name, arr in self._snapshot().items():
                project.write_mask(sid, name, arr, ds)
        except HistoWSSSError:
            self.save_label.setText("<span style='color:#ff6b6b'>NOT saved</span>")
            raise
        self._dirty = False
        self._autosave.stop()
        self.save_label.setText("all corrections saved")
        self.session.mask_saved.emit(MASK_CORRECTED)

    @guarded
    def _on_load(self, *_: Any) -> None:
        self.load()

    def load(self) -> None:
        """Show the CAMs, pseudo-mask, corrections and review marks saved for the current slide."""
        project = self.session.require_project()
        sid, _slide = self.session.require_slide()
        canvas = load_canvas(project, sid)
        if canvas is None:
            raise GuiError(f"no saved CAMs for slide {sid}: press 'Compute CAMs'")
        self._clear()
        self._slide_id = sid
        self.canvas = canvas
        pseudo = project.read_mask(sid, MASK_PSEUDO)
        auto = pseudo[0] if pseudo is not None else pseudo_from_canvas(
            canvas, project.classes, self.cam_threshold, self.gating_threshold, self.white_level)
        self.edits = load_corrections(project, sid, auto.astype(np.uint8), canvas.downsample)
        self.show_layers()
        self.save_label.setText("loaded from the project")
        self.say(f"loaded the saved CAMs and corrections of {sid} ({int(self.edits.flag().sum())} corrected pixels)")
