"""Segmenter panel: stage two trained on the (corrected) pseudo-masks, then the whole slide predicted.

Train: the project's labelled patches with their saved pseudo-masks and the pathologist's
corrections (Review panel; corrected pixels override and weigh more) are the training set of
:func:`core.stage2.train.train_segmenter` (learning from a chosen stage-one classifier run), run in
the background with the same progress, ETA, live loss plot, cancel and resume as the classifier
(:class:`~.stage1.TrainingWidget`, whose run list, plot and progress handling this panel
shares; its settings form is generated from :class:`core.stage2.train.SegConfig`, with the core's
defaults). Predict (its form is generated from :class:`core.stage2.batch.PredictSettings`, as are
``predict-many``'s options): :func:`core.stage2.infer.predict_slide` writes an OME-Zarr label
pyramid into the run folder tile by tile; when it is complete it is shown as a multiscale Labels layer with the
class colours (read-only: corrections belong on the pseudo-mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QWidget

from napari_histo_wsss.core.settings import read_run_config
from napari_histo_wsss.core.stage2.batch import PredictSettings
from napari_histo_wsss.core.stage2.train import SegConfig, recorded_stage_one
from napari_histo_wsss.widgets._common import SettingsForm, guarded, label_colormap
from napari_histo_wsss.widgets._state import GuiError
from napari_histo_wsss.widgets.stage1 import TrainingWidget, list_runs

PREDICTION_LAYER = "prediction"


class Stage2Widget(TrainingWidget):
    """Train the stage-two segmenter on corrected pseudo-masks; predict the current slide."""

    heading = "Segmenter and slide prediction"
    next_step = "predict the slide with it (Predict slide, below)"
    run_prefix = "seg-"
    task_key = "train-seg"
    task_title = "Segmenter training"
    config_class = SegConfig

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.prediction_path: Path | None = None
        self.source.setToolTip("the stage-one classifier run whose pseudo-masks the segmenter learns from")
        self.session.mask_saved.connect(self._refresh_data)
        self.session.runs_changed.connect(self._refresh_data)
        label = self.data_form.labelForField(self.source)
        if label is not None:
            label.setText("Classifier run")

        # generated from PredictSettings (the fields predict-many shares with this panel)
        self.pred_settings = SettingsForm(PredictSettings, title="Predict the slide")
        box, form = self.pred_settings, self.pred_settings.form
        w = self.pred_settings.widgets
        self.pred_tile, self.pred_overlap, self.tta, self.gate = w["tile"], w["overlap"], w["tta"], w["gate"]
        row = QHBoxLayout()
        self.predict_btn = QPushButton("Predict slide")
        self.predict_btn.clicked.connect(self._on_predict)
        self.cancel_btn.setText("Cancel training")  # one panel, two jobs: each button says which it stops
        self.pred_cancel_btn = QPushButton("Cancel prediction")
        self.pred_cancel_btn.clicked.connect(self._on_pred_cancel)
        row.addWidget(self.predict_btn)
        row.addWidget(self.pred_cancel_btn)
        form.addRow(row)
        # keep the status line last
        self.main_layout.insertWidget(self.main_layout.indexOf(self.status), box)

        self.pred_task = self.session.task("predict", "Slide prediction")
        self.pred_task.finished.connect(self._on_pred_finished)
        self.watch(self.pred_task)

    # -- training data (overrides of the classifier panel) -----------------------------------------
    def _build_source_items(self) -> list[str]:
        return []  # filled with the project's classifier runs (stage one) by _refresh_data

    def _trains_on_project(self) -> bool:
        return True

    def _refresh_data(self, *_: Any) -> None:
        self._fill_stage_one_runs()
        p = self.session.project
        if p is None:
            self.data_label.setText("no project open")
            return
        slides = [sid for sid in p.slides if "pseudo" in p.mask_names(sid)]
        n = len(p.patch_labels())
        self.data_label.setText(
            f"{n} labelled patches; pseudo-masks (with corrections) of {len(slides)} slide(s): {', '.join(slides)}"
            if slides else "no pseudo-masks yet: compute and correct them in the Review panel")

    def _fill_stage_one_runs(self) -> None:
        current = self.source.currentText()
        self.source.blockSignals(True)
        self.source.clear()
        p = self.session.project
        if p is not None:
            for r in list_runs(Path(p.runs_dir), "cls-"):
                self.source.addItem(r.name, str(r))
        if current:
            self.source.setCurrentText(current)
        self.source.blockSignals(False)

    def dataset(self) -> Any:
        """The project's labelled patches; their masks are the saved pseudo-masks and corrections."""
        from napari_histo_wsss.core.data.datasets import load_dataset

        project = self.session.require_project()
        table = project.patch_labels()
        if len(table) == 0:
            raise GuiError("no labelled patches yet: label patches in the Patch labelling panel first")
        missing = sorted({str(s) for s in table.slide_id} - {sid for sid in project.slides if "pseudo" in project.mask_names(sid)})
        if missing:
            raise GuiError(f"slide(s) {', '.join(missing)} have labelled patches but no pseudo-mask: compute their CAMs "
                           "in the Review panel first")
        return load_dataset(project.root)

    def _stage_one_run(self, run_dir: Path) -> Path:
        """The classifier run a segmenter run learns from: recorded in its config, else the form's."""
        cfg_path = run_dir / "config.json"
        if cfg_path.is_file():
            recorded = read_run_config(cfg_path).get("stage_one")
            if recorded:  # absolute, also when an older run recorded it relative (as load_segmenter reads it)
                return Path(recorded_stage_one(recorded, run_dir))
        data = self.source.currentData()
        if not data:
            raise GuiError("no classifier run in this project yet: train one in the Training panel first")
        return Path(data)

    def _train_job(self, spec: Any, run_dir: Path, cfg: Any, resume: bool) -> Callable[[Callable[[], bool]], Iterator[Any]]:
        from napari_histo_wsss.core.stage2.train import train_segmenter

        stage_one = self._stage_one_run(run_dir)

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            return train_segmenter(stage_one, None, cfg, dataset=spec, out_dir=run_dir, resume=resume,
                                   should_stop=should_stop)

        return job

    # -- prediction ------------------------------------------------------------------------------
    @guarded
    def _on_predict(self, *_: Any) -> None:
        self.predict()

    @guarded
    def _on_pred_cancel(self, *_: Any) -> None:
        if not self.pred_task.running:
            self.say("no prediction is running")
            return
        self.pred_task.cancel()
        self.say("cancelling the prediction after the current batch of tiles")

    def predict(self, run_dir: str | Path | None = None) -> Path:
        """Predict the current slide with a segmenter run (background); returns the output path."""
        if self.pred_task.running:
            raise GuiError("a prediction is already running: wait for it or press Cancel")
        project = self.session.require_project()
        sid, _slide = self.session.require_slide()
        if run_dir is None:
            data = self.runs.currentData()
            if not data:
                raise GuiError("no segmenter run in this project yet: train one first")
            run_dir = data
        run_dir = Path(run_dir)
        out = run_dir / "predictions" / f"{sid}.ome.zarr"
        slide_path = Path(project.slide_path(sid))
        tissue = project.tissue(sid)
        grid = self.session.require_grid()
        ds = grid.downsample
        tile, overlap = self.pred_tile.value(), min(self.pred_overlap.value(), self.pred_tile.value() // 2)
        tta, gate, device = self.tta.isChecked(), self.gate.isChecked(), self.device.currentText()
        classes = project.classes
        stage_one = self._stage_one_run(run_dir) if gate else None

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            from napari_histo_wsss.core.slides.slide import open_slide
            from napari_histo_wsss.core.stage2.infer import predict_slide, segmenter_predict_fn
            from napari_histo_wsss.core.stage2.train import load_segmenter

            model = load_segmenter(run_dir)[0]
            gate_model = None
            if stage_one is not None:
                from napari_histo_wsss.core.stage1.train import load_run

                gate_model = load_run(stage_one)[0]
            dev = None if device == "auto" else device
            fn = segmenter_predict_fn(model, classes, device=dev, gate=gate_model)
            with open_slide(slide_path) as slide:
                yield from predict_slide(slide, fn, out, tile=tile, overlap=overlap, tissue=tissue, tta=tta,
                                         should_stop=should_stop, classes=classes, downsample=ds, overwrite=True)

        self.prediction_path = out
        self.pred_task.start(job, f"Prediction of {sid}")
        self.say(f"predicting {sid} with {run_dir.name} into {out}")
        return out

    def _on_pred_finished(self, outcome: str) -> None:
        if outcome != "done" or self.prediction_path is None:
            if outcome == "cancelled":  # the core says what is left: the previous output, or an incomplete one
                ev = self.pred_task.last_event
                said = ev.message if getattr(ev, "kind", "") == "cancelled" and ev.message else "no output was finished"
                self.say(f"prediction cancelled: {said}; nothing new is shown")
            return
        try:
            self.show_prediction(self.prediction_path)
        except Exception as e:  # noqa: BLE001 - a bad output must end as a message
            self.fail(f"could not show the prediction: {e}")
            return
        self.say(f"prediction of {self.session.slide_id} shown as the '{PREDICTION_LAYER}' layer", notify=True)

    def show_prediction(self, path: str | Path) -> Any:
        """Show a complete prediction pyramid as a multiscale Labels layer over the slide."""
        from napari_histo_wsss.core.io.export import open_label_pyramid

        project = self.session.require_project()
        pyr = open_label_pyramid(path)
        levels = pyr.levels
        names = ["unlabelled"] + project.classes.names + ["background / exclude"]
        layer = self.session.replace_layer(
            PREDICTION_LAYER, self.viewer.add_labels, data=levels if len(levels) > 1 else levels[0],
            multiscale=len(levels) > 1, colormap=label_colormap(project.classes.label_colormap()), opacity=0.6,
            features={"index": np.arange(len(names)), "class": names}, **self.session.overlay_transform(pyr.downsample),
        )
        layer.editable = False
        layer.metadata["histo_wsss"] = "prediction"
        layer.metadata["path"] = str(path)
        return layer
