"""Review and correct panel: CAMs and pseudo-masks over the slide, live thresholds, corrections.

The model of this step lives in :mod:`core.review` (the slide canvas, its tiling, the automatic
pseudo-mask, the corrected-pixel rules and the project mask names); this panel shows it and
turns the pathologist's strokes into :class:`~..core.review.Corrections`.

Compute (background job): :func:`core.review.compute_slide_cams` - the same job as
``histo-wsss cams`` - applies a run's classifier to the slide tile by tile (blended, one gating and
normalisation per slide) and stores the project masks ``cam``, ``cam_probs`` and ``pseudo``; each
finished tile is shown at once.

Layers (all placed over the slide with :meth:`Session.overlay_transform`), in the review view
(:meth:`ReviewWidget.review_view`, also the "Review view" button):

* ``CAM <class>`` - one Image layer per class, made when "Show CAM layers" is ticked, zero off the
  tissue, translucent: the class hue with an opacity that grows with the score
  (:func:`cam_colormap`), each class scaled by its strongest score on the slide;
* ``pseudo-mask`` - a Labels layer holding ``class index + 1`` (0 = unlabelled) as a light fill:
  class colours, background (glass) transparent, uncertain tissue
  (:func:`core.review.uncertain_index`) in its own dark shade; the class names as features; it is
  the layer the pathologist edits with napari's brush, fill and eraser, number keys pick the class;
* ``reviewed`` - the outline of the regions marked reviewed (made once something is marked).

Adding or removing a napari layer costs 0.15-0.35 s of GUI thread (napari's own scene-graph work
and garbage collection), so Compute never removes layers: a recompute puts the new canvas into
the existing layers in place, a first Compute adds the missing layers one per event-loop turn after
the job has started, and layers nobody looks at (hidden CAMs, an empty reviewed outline) are not
made at all.

Sliders (CAM threshold, gating probability, white-background grey level) recompute the slide's
automatic mask off the GUI thread (:func:`core.review.pseudo_updates`, per-slide scores cached) and
redraw it; pixels the user corrected are kept. With "Refine borders" on crf (the default, as
``pseudo-masks``) the mask's class borders then move to the stain edges by a dense CRF over the
canvas (:func:`core.review.refined_labels`): the unrefined mask shows at once, the refined one
seconds later (cached per gating); switching it redoes the mask without recomputing the CAMs. Painting or filling records the stroke (napari's
``paint`` event: pixels touched, old values kept for Undo); undo restores the old values so the
corrected flag clears by itself. Corrections autosave (debounced) and on "Save" as ``pseudo``,
``corrected``, ``corrected_flag`` and ``reviewed``.
"""

from __future__ import annotations

import dataclasses
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
    QWidget,
)

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.review import (
    CLASSIFIER_RUN_PREFIX,
    MASK_CAM,
    MASK_CORRECTED,
    CamCanvas,
    CamPlan,
    CamTile,
    Corrections,
    PseudoTile,
    ReviewSettings,
    calibrated_gating,
    compute_slide_cams,
    corrections_for_canvas,
    corrections_for_plan,
    list_runs,
    load_canvas,
    new_canvas,
    plan_slide_cams,
    pseudo_from_canvas,
    pseudo_updates,
    uncertain_index,
)
from napari_histo_wsss.core.stage1.refine import CRF_MISSING, crf_available
from napari_histo_wsss.widgets._common import (
    Panel,
    SettingsForm,
    clear_layout,
    color_swatch,
    compact,
    form_group,
    guarded,
    label_colormap,
    same_layer,
)
from napari_histo_wsss.widgets._state import GuiError

CAM_PREFIX = "CAM "
PSEUDO_LAYER = "pseudo-mask"
REVIEWED_LAYER = "reviewed"
_REVIEWED_RGBA = (0.0, 0.9, 0.9, 1.0)
#: Uncertain tissue (no class reaches the CAM threshold): a dark shade, hue-less, so it reads
#: apart from every class colour on H&E (mean CIEDE2000 15 from the stain, 11.6 or more from any class fill)
UNCERTAIN_RGB = (0.12, 0.12, 0.15)
#: The review view's defaults: a light fill of the assigned classes over the slide (class colours
#: at 0.45 in effect), uncertain tissue a lighter shade (0.39), glass clear, CAMs off
PSEUDO_OPACITY = 0.6
_CLASS_ALPHA = 0.75
_UNCERTAIN_ALPHA = 0.65
#: a typical H&E purple, to show the legend swatch of uncertain tissue as it looks on the slide
_HE_RGB = (150, 90, 170)
CAM_OPACITY = 0.8
_AUTOSAVE_MS = 1500
_REDRAW_MS = 10
_REFRESH_S = 0.3  # at most this often the CAM layers are re-uploaded while tiles arrive
_DEFAULTS = ReviewSettings()
_SLIDER_SETTINGS = ("cam_threshold", "gating", "white_level")  # ReviewSettings shown as live sliders

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
    """Transparent -> the class hue, for translucent CAM layers over H&E: the colour is the
    class's hue at full saturation and brightness (a dark class colour would vanish on stained
    tissue) and the opacity grows with the score, so weak scores and glass show the slide."""
    import colorsys

    from napari.utils.colormaps import Colormap

    h, _s, _v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb(h, 1.0 if max(rgb) != min(rgb) else 0.0, 1.0)
    return Colormap([[r, g, b, 0.0], [r, g, b, 0.0], [r, g, b, 1.0]], controls=[0.0, 0.15, 1.0], name=f"cam-{name}")


def pseudo_colormap(classes: Any) -> dict:
    """Label colours of the pseudo-mask layer (values = class index + 1): the class colours,
    background (glass, excluded) transparent, uncertain tissue a dark shade of its own."""
    colors = {k: (r, g, b, _CLASS_ALPHA) for k, (r, g, b, _a) in classes.label_colormap().items() if k is not None}
    colors[classes.background_index + 1] = (0.0, 0.0, 0.0, 0.0)
    colors[uncertain_index(classes) + 1] = (*UNCERTAIN_RGB, _UNCERTAIN_ALPHA)
    return colors


class ReviewWidget(Panel):
    """CAMs and pseudo-masks of the current slide; live thresholds; corrections and review marks."""

    heading = "CAMs, pseudo-masks and corrections"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.canvas: CamCanvas | None = None
        self.edits: Corrections | None = None
        self.mask_layer: Any = None
        self.cam_layers: dict[int, Any] = {}
        self._pending_layers: list[tuple[str, int]] = []  # layers still to add, one per event-loop turn
        self._slide_id: str | None = None
        self._dirty = False
        self._last_refresh = 0.0

        # generated from ReviewSettings (the settings `histo-wsss cams` shares with this panel); the
        # three thresholds are the live sliders below, not form fields
        self.settings_form = SettingsForm(ReviewSettings, title="Classifier", skip=_SLIDER_SETTINGS)
        box, form = self.settings_form, self.settings_form.form
        self.runs = compact(QComboBox())
        self.runs.setToolTip("a finished (or cancelled) classifier run of this project")
        form.insertRow(0, "Run", self.runs)
        w = self.settings_form.widgets
        self.which, self.mode, self.tile, self.max_side, self.device = (
            w["which"], w["mode"], w["tile"], w["max_side"], w["device"])
        self.refine = w["refine"]
        self.refine.currentIndexChanged.connect(self._on_refine)
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
        self.gating.setToolTip("slide-level class probability (a class's best tile) that switches the class on for the slide")
        form.addRow("Gating (class prob.)", self._with_label(self.gating, self.gating_label))
        self.white = _slider(150, 255, _DEFAULTS.white_level)
        self.white_label = QLabel()
        form.addRow("White background", self._with_label(self.white, self.white_label))
        self.show_cams = QCheckBox("Show CAM layers")
        self.show_cams.setChecked(False)
        self.show_cams.setToolTip("one layer per class over the tissue: the class hue, more opaque where the score is higher")
        self.show_cams.toggled.connect(self._on_show_cams)
        self.view_btn = QPushButton("Review view")
        self.view_btn.setToolTip("the default view: slide, a light fill of the assigned classes (uncertain tissue in "
                                 "dark shade, glass clear), CAMs hidden, the pseudo-mask layer selected for editing")
        self.view_btn.clicked.connect(self._on_review_view)
        row = QHBoxLayout()
        row.addWidget(self.show_cams, 1)
        row.addWidget(self.view_btn)
        form.addRow(row)
        legend = QHBoxLayout()
        a = PSEUDO_OPACITY * _UNCERTAIN_ALPHA
        legend.addWidget(color_swatch(tuple(int(round((1 - a) * h + a * 255 * c)) for h, c in zip(_HE_RGB, UNCERTAIN_RGB))))
        legend.addWidget(QLabel("uncertain: tissue no class reaches (saved as background); glass is left clear"), 1)
        form.addRow(legend)
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

        self._pseudo_again = False
        self._save_after_pseudo = False
        self._index: Any = None  # core.review.ThresholdIndex of the canvas, once a whole mask was made
        self._shown_threshold: float | None = None  # the CAM threshold the shown automatic mask stands for
        self._pseudo_started = 0.0
        self.redraw_seconds: float | None = None
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
        # reopening a slide with saved CAMs shows them again (read in the background)
        self.restore_task = self.session.task("review-restore", "Saved review layers", quiet=True)
        self.restore_task.event.connect(self._on_restored)
        self.watch(self.restore_task)
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
        self._restore_saved()

    def _restore_saved(self) -> None:
        """Show the current slide's saved CAMs, pseudo-mask and corrections again, as the panel left
        them (a reopened project, another slide and back), read off the GUI thread."""
        project, sid = self.session.project, self.session.slide_id
        if project is None or sid is None or self.restore_task.running or MASK_CAM not in project.mask_names(sid):
            return
        thresholds = (self.cam_threshold, self.gating_threshold, self.white_level)
        refine = self.settings_form.values()["refine"]

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            canvas = load_canvas(project, sid, refine)
            if canvas is not None and not should_stop():
                yield ("restored", sid, canvas, corrections_for_canvas(project, sid, canvas, *thresholds))

        self.restore_task.start(job, f"saved review layers of {sid}")

    def _on_restored(self, item: Any) -> None:
        if not (isinstance(item, tuple) and item and item[0] == "restored"):
            return
        _, sid, canvas, edits = item
        if sid != self.session.slide_id or self.canvas is not None or self.task.running:
            return  # the user moved on, or is computing new CAMs
        self._show_saved(sid, canvas, edits, f"restored the saved CAMs and corrections of {sid}")

    def _reset(self) -> None:
        """Forget the shown canvas and its corrections (the layers stay, to be refilled)."""
        if self.pseudo_task.running:
            self.pseudo_task.cancel()
            self.pseudo_task.wait(10)
        self.canvas = None
        self.edits = None
        self._index = None
        self._shown_threshold = None
        self._dirty = False
        self._pending_layers = []

    def _clear(self) -> None:
        """Forget the canvas and remove its layers (another slide or project is shown)."""
        self._reset()
        for name in [PSEUDO_LAYER, REVIEWED_LAYER] + [lyr.name for lyr in self.viewer.layers if lyr.name.startswith(CAM_PREFIX)]:
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
        form = self.settings_form.values()
        which = form["which"]
        if not (run_dir / "checkpoints" / f"{which}.pt").is_file():
            raise GuiError(f"{run_dir / 'checkpoints' / (which + '.pt')}: no such checkpoint; the run has not finished an epoch yet")
        if self._dirty:
            self.save()
        plan = plan_slide_cams(project, sid, form["tile"], form["max_side"])
        settings = ReviewSettings(**form,
                                  cam_threshold=self.cam_threshold, gating=self.gating_threshold,
                                  white_level=int(self.white.value()))
        self._start_canvas(project, plan, settings.rule, settings.refine)

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            # in the worker: reading the run's calibration imports torch (seconds, never on the GUI
            # thread); the gating starts where the run's validation put it (the start event says so)
            chosen = calibrated_gating(run_dir, which)
            if chosen is not None:
                settings.gating = chosen
            # the panel refines its own canvas once the tiles are in (the unrefined mask shows
            # first, recompute_pseudo) and saves that mask: the job's copy would be the same CRF twice
            job_settings = dataclasses.replace(settings, refine="none")
            return compute_slide_cams(project, sid, run_dir, job_settings, should_stop, overwrite=True,
                                      save=not project.read_only, keep_partial=True, plan=plan)

        self.task.start(job, f"CAMs of {sid}")
        kept = int(self.edits.flag().sum()) if self.edits is not None else 0
        self.say(f"computing CAMs of {sid} with {run_dir.name} ({which}): {len(plan.tiles)} tiles, "
                 f"mask {plan.shape[1]}x{plan.shape[0]} px at {plan.downsample:.2f}x"
                 + (f"; {kept} corrected pixels kept" if kept else ""))
        return plan

    def _start_canvas(self, project: Any, plan: CamPlan, rule: str = _DEFAULTS.rule,
                      refine: str = _DEFAULTS.refine) -> None:
        self._reset()
        self._slide_id = sid = self.session.slide_id
        c = project.classes.num_classes
        # the open slide knows a patch folder's images: no header is read on the GUI thread
        self.canvas = new_canvas(project, sid, plan, rule, refine, slide=self.session.slide)
        if refine == "crf" and rule == "raw" and not crf_available():
            self.say(f"{CRF_MISSING}; the pseudo-mask stays unrefined")
        try:  # recomputing keeps the saved corrections: new tiles replace only automatic values
            self.edits = corrections_for_plan(project, sid, plan)
        except HistoWSSSError as e:
            self.say(f"the saved corrections of {sid} cannot be read ({e}); starting without them")
            self.edits = Corrections(np.full(plan.shape, project.classes.background_index, dtype=np.uint8), c)
        self.show_layers(defer=True)  # the job starts first; missing layers follow, one per event-loop turn

    def _on_tile(self, ev: Any) -> None:
        if getattr(ev, "kind", "") == "start" and "gating" in (ev.metrics or {}):
            if self.canvas is not None and ev.metrics.get("presence") is not None:  # the run's prob-area floor
                self.canvas.presence = np.asarray(ev.metrics["presence"], dtype=np.float32)
            self.gating.blockSignals(True)  # the tiles to come are drawn with it; no redraw needed
            self.gating.setValue(int(round(float(ev.metrics["gating"]) * 100)))
            self.gating.blockSignals(False)
            self._update_slider_labels()
            return
        if self.canvas is not None and "region_probs" in (getattr(ev, "metrics", None) or {}):
            self.canvas.set_region_probs(np.asarray(ev.metrics["region_probs"]))  # a patch folder: gated per image
            return
        if not isinstance(ev, CamTile) or self.canvas is None or self.edits is None:
            return
        region = self.canvas.put(ev.ty, ev.tx, ev.cams, ev.probs, ev.rgb, ev.box, logits=ev.logits)
        project = self.session.require_project()
        # the live view: the new tile's box with the slide's gating and normalisation so far
        # (the whole mask is redone once the last tile is in)
        self.edits.set_auto(pseudo_from_canvas(self.canvas, project.classes, self.cam_threshold, self.gating_threshold,
                                               self.white_level, uncertain=True, box=region), region)
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
        # the whole slide's gating and normalisation replace the live view; saved once it is in
        self._save_after_pseudo = True
        self.recompute_pseudo()
        if outcome == "done":
            self.say(f"CAMs and pseudo-mask of {self._slide_id} ready ({n} tiles); correct the pseudo-mask layer", notify=True)
        else:
            self.say(f"CAM computation cancelled after {n} tiles; those are shown and saved")

    # -- layers --------------------------------------------------------------------------------
    def show_layers(self, defer: bool = False) -> None:
        """Show the canvas: the pseudo-mask Labels layer, the CAM image layers (when "Show CAM
        layers" is ticked) and the reviewed outline (once something is marked), in the review view
        (:meth:`review_view`). Existing layers get the new data in place; missing ones are added
        now, or with ``defer`` one per event-loop turn (so that Compute returns at once)."""
        project = self.session.require_project()
        if self.canvas is None or self.edits is None:
            raise GuiError("no CAMs yet: press 'Compute CAMs' (or 'Load saved')")
        # CAM layers when shown (or made before: they get the new canvas too), the outline once
        # anything is reviewed (or made before)
        wanted = [("cam", i) for i in range(project.classes.num_classes)
                  if self.show_cams.isChecked() or i in self.cam_layers]
        wanted.append(("pseudo", 0))
        if self.edits.reviewed.any() or self.session.layer(REVIEWED_LAYER) is not None:
            wanted.append(("reviewed", 0))
        self._pending_layers = [w for w in wanted if not self._put_layer(*w, create=False)]
        if defer and self._pending_layers:
            QTimer.singleShot(0, self._add_pending_layer)
            self._update_stats()
            return
        while self._pending_layers:
            self._put_layer(*self._pending_layers.pop(0), create=True)
        self._on_layers_ready()

    def _add_pending_layer(self) -> None:
        """Add one missing layer of the shown canvas (one event-loop turn each)."""
        if not self._pending_layers or self.canvas is None or self.edits is None:
            return
        self._put_layer(*self._pending_layers.pop(0), create=True)
        if self._pending_layers:
            QTimer.singleShot(0, self._add_pending_layer)
        else:
            self._on_layers_ready()

    def _on_layers_ready(self) -> None:
        self._on_paint_class(self.paint_class.currentIndex())
        self.review_view()
        self._update_stats()

    def _put_layer(self, kind: str, i: int, create: bool) -> bool:
        """Put the canvas into the ``kind`` layer ("cam" of class ``i``, "pseudo" or "reviewed"):
        in place when the layer exists (True), else add it if ``create`` (True) or not (False)."""
        project = self.session.require_project()
        tf = self.session.overlay_transform(self.canvas.downsample)
        if kind == "cam":
            cdef = project.classes.classes[i]
            name, data = f"{CAM_PREFIX}{cdef.name}", self.canvas.cams[i]
            props = dict(contrast_limits=(0.0, max(float(self.canvas.peaks()[i]), 1e-6)))
        elif kind == "pseudo":
            name, data, props = PSEUDO_LAYER, self.edits.data, {}
        else:
            name, data, props = REVIEWED_LAYER, self.edits.reviewed.view(np.uint8), {}
        layer = self.session.layer(name)
        if layer is not None:
            layer.data = data
            layer.scale, layer.translate = tf["scale"], tf["translate"]
            for key, value in props.items():
                setattr(layer, key, value)
        elif not create:
            return False
        elif kind == "cam":
            layer = self.viewer.add_image(
                data, name=name, colormap=cam_colormap(cdef.color, cdef.name), blending="translucent",
                opacity=CAM_OPACITY, visible=self.show_cams.isChecked(), **props, **tf)
            layer.metadata["histo_wsss"] = "cam"
        elif kind == "pseudo":
            names = ["unlabelled"] + project.classes.names + ["background / exclude", "uncertain"]
            layer = self.viewer.add_labels(
                data, name=name, colormap=label_colormap(pseudo_colormap(project.classes)), opacity=PSEUDO_OPACITY,
                features={"index": np.arange(len(names)), "class": names}, **tf)
            layer.metadata["histo_wsss"] = "pseudo-mask"
            layer.metadata["same_as"] = {uncertain_index(project.classes) + 1: project.classes.background_index + 1}
            layer.events.paint.connect(self._on_paint)
            layer.bind_key("Control-Z", lambda _l: self.undo(), overwrite=True)
            for key in range(1, min(project.classes.num_classes + 1, 9) + 1):  # the classes, then background
                layer.bind_key(str(key), self._key_paint_class(key - 1), overwrite=True)
        else:
            layer = self.viewer.add_labels(data, name=name, colormap=label_colormap({1: _REVIEWED_RGBA}), opacity=0.9, **tf)
            layer.contour = 2
            layer.editable = False
        if kind == "cam":
            self.cam_layers[i] = layer
        elif kind == "pseudo":
            self.mask_layer = layer
        return True

    def _order_layers(self) -> None:
        """CAMs, then the pseudo-mask, then the reviewed outline on top of everything else."""
        order = list(self.cam_layers.values())
        for name in (PSEUDO_LAYER, REVIEWED_LAYER):
            layer = self.session.layer(name)
            if layer is not None:
                order.append(layer)
        n = len(self.viewer.layers)
        if [lyr for lyr in self.viewer.layers][n - len(order):] == order:
            return  # already so: moving layers is not free
        for layer in order:  # each to the top in turn
            self.viewer.layers.move(self.viewer.layers.index(layer), n)

    def review_view(self) -> None:
        """The one-click review view: the slide as it is, the CAM layers (if shown) above it, the
        pseudo-mask as a light fill of the assigned classes above them, the reviewed outline on
        top; the labelling layers (patch grid, tissue outline) hidden; the pseudo-mask layer
        selected so the brush, fill and number keys act on it."""
        from napari_histo_wsss.widgets._patch_grid import GRID_LAYER
        from napari_histo_wsss.widgets.project import TISSUE_LAYER

        for name in (GRID_LAYER, TISSUE_LAYER):
            layer = self.session.layer(name)
            if layer is not None:
                layer.visible = False
        self._order_layers()
        for layer in self.cam_layers.values():
            layer.visible = self.show_cams.isChecked()
            layer.opacity = CAM_OPACITY
        if self.mask_layer is not None:
            self.mask_layer.visible = True
            self.mask_layer.opacity = PSEUDO_OPACITY
            self.mask_layer.contour = 0
            self.viewer.layers.selection.active = self.mask_layer

    @guarded
    def _on_review_view(self, *_: Any) -> None:
        if self.canvas is None:
            raise GuiError("no CAMs yet: press 'Compute CAMs' (or 'Load saved')")
        if self.mask_layer is None:
            self.show_layers()
        self.review_view()
        self.say("review view: classes as a light fill, uncertain tissue in dark shade, glass clear")

    def _refresh_layers(self) -> None:
        peaks = self.canvas.peaks() if self.canvas is not None else None
        for i, layer in self.cam_layers.items():
            if peaks is not None:  # one normalisation per slide: the strongest score so far is full colour
                layer.contrast_limits = (0.0, max(float(peaks[i]), 1e-6))
            layer.refresh()
        if self.mask_layer is not None:
            self.mask_layer.refresh()
        self._update_stats()

    @guarded
    def _on_show_layers(self, *_: Any) -> None:
        self.show_layers()
        self.say("layers shown")

    def _on_show_cams(self, on: bool) -> None:
        if on and self.canvas is not None and self.edits is not None and self.session.project is not None:
            active = self.viewer.layers.selection.active  # a new layer becomes active: keep the user's
            for i in range(self.session.project.classes.num_classes):
                if i not in self.cam_layers:
                    self._put_layer("cam", i, create=True)
            self._order_layers()
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
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

    def _key_paint_class(self, index: int) -> Callable[[Any], None]:
        def pick(_layer: Any) -> None:
            self.paint_class.setCurrentIndex(index)
            self.say(f"painting with {self.paint_class.currentText()} (number keys pick the class on the pseudo-mask)")

        return pick

    def _on_paint_class(self, index: int) -> None:
        if self.mask_layer is not None and index >= 0:
            self.mask_layer.selected_label = index + 1

    # -- sliders -------------------------------------------------------------------------------
    def _on_refine(self, *_: Any) -> None:
        """"Refine borders" changed: the shown mask is made again with or without the dense CRF
        (corrected pixels are kept), off the GUI thread."""
        if self.canvas is None:
            return
        self.canvas.refine = self.settings_form.values()["refine"]
        self._index = None  # its classes were the other refinement's
        self.recompute_pseudo()

    def _on_slider(self, *_: Any) -> None:
        self._update_slider_labels()
        self._redraw_timer.start()

    def recompute_pseudo(self) -> None:
        """Apply the sliders to the mask (corrected pixels are kept): the whole slide's automatic
        mask is made off the GUI thread (:func:`core.review.pseudo_updates`; with the scores
        cached a CAM-threshold move is one comparison per pixel) and drawn at once."""
        if self.canvas is None or self.edits is None or self.session.project is None:
            return
        if self.pseudo_task.running:
            self._pseudo_again = True  # the sliders moved again: redo once this pass ends
            return
        args = (self.canvas, self.session.project.classes, self.cam_threshold, self.gating_threshold, self.white_level)
        index, shown = self._index, self._shown_threshold
        self._pseudo_started = time.perf_counter()
        if index is not None and shown is not None and index.fits(self.canvas, self.gating_threshold, self.white_level):
            # a CAM-threshold move: a binary search and the changed pixels only - milliseconds, so
            # done here at once (no thread hand-over) with the same core job
            for ev in pseudo_updates(*args, lambda: False, index, shown):
                self._on_pseudo_tile(ev)
            self._on_pseudo_finished("done")
            return
        self.pseudo_task.start(lambda should_stop: pseudo_updates(*args, should_stop, index, shown), "Pseudo-mask")

    def _on_pseudo_tile(self, ev: Any) -> None:
        if not isinstance(ev, PseudoTile) or self.canvas is None or self.edits is None:
            return
        if ev.index is not None:
            self._index = ev.index  # the next CAM-threshold moves change only the pixels they must
            return
        if ev.mask is not None:
            if ev.mask.shape != self.edits.auto.shape:
                return  # made for a slide that was since replaced
            self.edits.set_auto(ev.mask, ev.box)
        elif ev.changed is not None:
            self.edits.set_auto_at(*ev.changed)
        else:
            return
        self._shown_threshold = ev.threshold
        if self.mask_layer is not None:
            self.mask_layer.refresh()
        self.redraw_seconds = time.perf_counter() - self._pseudo_started

    def _on_pseudo_finished(self, outcome: str) -> None:
        if self._pseudo_again:
            self._pseudo_again = False
            self.recompute_pseudo()
            return
        if outcome != "done":
            return
        if self._save_after_pseudo:
            self._save_after_pseudo = False
            try:
                self.save()
            except HistoWSSSError as e:
                self.fail(str(e))
        else:
            self._mark_dirty()
        self._stats_timer.start()  # after the redraw: counting corrected areas is a pass over the mask

    # -- corrections ---------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        # napari emits "paint" before it writes the new values: count them a moment later
        if self.edits is None:
            return
        self.edits.record(event.value)
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
        if self.edits is None or not self.edits.undo():
            self.say("nothing to undo")
            return
        self.mask_layer.refresh()
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
        elif self.mask_layer is not None:  # the first mark: its outline layer goes on top
            active = self.viewer.layers.selection.active
            self._put_layer("reviewed", 0, create=True)
            self._order_layers()
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
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
        canvas = load_canvas(project, sid, self.settings_form.values()["refine"])
        if canvas is None:
            raise GuiError(f"no saved CAMs for slide {sid}: press 'Compute CAMs'")
        edits = corrections_for_canvas(project, sid, canvas, self.cam_threshold, self.gating_threshold, self.white_level)
        self._show_saved(sid, canvas, edits, f"loaded the saved CAMs and corrections of {sid}")

    def _show_saved(self, sid: str, canvas: CamCanvas, edits: Corrections, message: str) -> None:
        self._reset()
        self._slide_id = sid
        self.canvas = canvas
        self.edits = edits
        self.show_layers()
        self.save_label.setText("loaded from the project")
        self.say(f"{message} ({int(self.edits.flag().sum())} corrected pixels)")
