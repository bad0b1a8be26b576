"""Training panel: stage-one CAM classifier training in the background with a live loss plot.

The form is generated from :class:`core.stage1.train.TrainConfig`'s field declarations
(:class:`~._common.SettingsForm`: the core's defaults, limits and help, the less common settings
under "Advanced settings"); Start runs
:func:`core.stage1.train.train_classifier` in a :class:`~._worker.BackgroundTask` (the event loop stays
free; the core checkpoints every epoch and on Cancel), Resume continues the selected run from its
last checkpoint. Training data is the project's labelled patches (all slides) or an imported
labelled patch folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from napari_histo_wsss.core.models.backbones import BACKBONES  # noqa: F401 - the form lists them (TrainConfig.backbone)
from napari_histo_wsss.core.review import list_runs
from napari_histo_wsss.core.stage1.train import TrainConfig
from napari_histo_wsss.widgets._common import Panel, SettingsForm, compact, form_group, guarded
from napari_histo_wsss.widgets._plot import LivePlot
from napari_histo_wsss.widgets._state import GuiError
from napari_histo_wsss.widgets._worker import describe_event, progress_units

SOURCE_PROJECT = "project labels (all slides)"
SOURCE_FOLDER = "imported patch folder"
_LOSS_COLOURS = ["#4fc3f7", "#ffb74d", "#e57373", "#ba68c8"]
_SCORE_COLOURS = ["#81c784", "#fff176", "#f06292", "#90a4ae"]


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-epoch rows of a run's ``metrics.jsonl`` (damaged trailing lines skipped)."""
    path = run_dir / "metrics.jsonl"
    rows: list[dict] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def segmix_state(metrics: dict) -> str:
    """' · SegMix 32 px tiles, 50% swapped' from an epoch row's curriculum state ('' if none)."""
    st = metrics.get("segmix")
    if not isinstance(st, dict):
        return ""
    if not st.get("tile"):
        return " · SegMix warm-up (no shuffle)"
    return f" · SegMix {st['tile']} px tiles, {100 * float(st.get('share') or 0):.0f}% swapped"


def is_score(key: str) -> bool:
    """Whether a metrics key is a 0..1 segmentation score (mIoU, fwIoU, pixel accuracy...)."""
    k = key.lower()
    return "iou" in k or "accuracy" in k


def numeric_items(d: dict) -> Iterator[tuple[str, float]]:
    """Scalar numeric entries of a metrics dict (nested dicts such as per-class IoU skipped)."""
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            yield k, float(v)


class TrainingWidget(Panel):
    """Train the CAM classifier on labelled patches; progress, ETA, live plot, cancel, resume."""

    heading = "Train CAM classifier"
    #: what the status line suggests once a training has finished
    next_step = "review its CAMs in the Review panel"
    #: Run folders of this panel are called ``<run_prefix><method>-<time>`` under the project's runs/.
    run_prefix = "cls-"
    task_key = "train-cls"
    task_title = "Classifier training"
    #: The trainer's settings class: the form is generated from its fields (core defaults).
    config_class: Any = TrainConfig

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)

        box, form = form_group("Training data")
        self.data_form = form
        self.source = compact(QComboBox())
        self.source.addItems(self._build_source_items())
        form.addRow("Source", self.source)
        self.data_label = QLabel("")
        self.data_label.setWordWrap(True)
        form.addRow(self.data_label)
        self.main_layout.addWidget(box)

        # the form of the trainer's settings class, generated from its field declarations: the
        # core's defaults, limits and help; each field's editor is also an attribute (self.epochs...)
        self.settings = SettingsForm(self.config_class, "Settings")
        for name, editor in self.settings.widgets.items():
            if not hasattr(self, name):
                setattr(self, name, editor)
        self.main_layout.addWidget(self.settings)

        box, form = form_group("Run")
        self.runs = compact(QComboBox())
        self.runs.setToolTip("previous runs of this project (Resume continues the selected one)")
        self.runs.currentIndexChanged.connect(self._on_run_selected)
        form.addRow("Runs", self.runs)
        row = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.start_btn.clicked.connect(self._on_start)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self._on_cancel)
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.clicked.connect(self._on_resume)
        row.addWidget(self.start_btn)
        row.addWidget(self.cancel_btn)
        row.addWidget(self.resume_btn)
        form.addRow(row)
        self.bar = QProgressBar()
        self.bar.setFormat("%p%")
        form.addRow(self.bar)
        self.eta = QLabel("")
        self.eta.setWordWrap(True)
        form.addRow(self.eta)
        self.plot = LivePlot("epoch")
        self.plot.add_series("loss", _LOSS_COLOURS[0])
        form.addRow(self.plot)
        self.main_layout.addWidget(box)
        self.finish_layout()

        self.task = self.session.task(self.task_key, self.task_title)
        self.task.event.connect(self._on_event)
        self.task.finished.connect(self._on_finished)
        self.watch(self.task)
        self.run_dir: Path | None = None
        self.session.project_changed.connect(self._refresh)
        self.session.labels_changed.connect(self._refresh_data)
        self.session.runs_changed.connect(self._refresh_runs)
        self.source.currentIndexChanged.connect(self._refresh_data)
        self._refresh()

    # -- form ----------------------------------------------------------------------------------
    def _build_source_items(self) -> list[str]:
        """Training data sources offered in the form."""
        return [SOURCE_PROJECT, SOURCE_FOLDER]

    def _trains_on_project(self) -> bool:
        """Whether the training patches come from the project (their size is the project's)."""
        return self.source.currentText() == SOURCE_PROJECT

    def _load_run_config(self, run_dir: Path) -> Any:
        """The saved config of a run folder (what Resume continues)."""
        return self.config_class.saved(run_dir)

    def _refresh(self) -> None:
        p = self.session.project
        if p is not None:
            self.source.setCurrentText(SOURCE_PROJECT)
        self._refresh_data()
        self._refresh_runs()
        self._set_running(self.task.running)

    def _refresh_data(self, *_: Any) -> None:
        if self.source.currentText() == SOURCE_FOLDER:
            d = self.session.dataset_dir
            self.data_label.setText(f"folder: {d}" if d else "no folder imported: use 'Import labelled patch folder' in the Patch labelling panel")
            return
        p = self.session.project
        if p is None:
            self.data_label.setText("no project open")
            return
        table = p.patch_labels()
        lab = np.asarray(table.labels)
        if lab.size == 0:
            self.data_label.setText("no labelled patches yet")
            return
        counts = lab.sum(axis=0)
        self.data_label.setText(f"{lab.shape[0]} labelled patches: " + ", ".join(f"{n} {int(c)}" for n, c in zip(p.classes.names, counts)))

    def _refresh_runs(self) -> None:
        current = self.runs.currentText()
        self.runs.blockSignals(True)
        self.runs.clear()
        p = self.session.project
        if p is not None:
            for r in list_runs(Path(p.runs_dir), self.run_prefix):
                self.runs.addItem(r.name, str(r))
        if current:
            self.runs.setCurrentText(current)
        self.runs.blockSignals(False)

    def config(self, **overrides: Any) -> Any:
        """The trainer's settings (:attr:`config_class`) from the form, plus ``overrides``; a
        setting the trainer does not know is an error (never silently ignored)."""
        values = self.settings.values()
        project = self.session.project
        if project is not None and self._trains_on_project():
            values["patch_size"] = int(project.settings.get("patch_size", 224))
        values.update(overrides)
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise GuiError(f"this version of the trainer has no setting(s) {', '.join(unknown)}")
        cfg = self.config_class(**values)
        cfg.validate()
        return cfg

    def dataset(self) -> Any:
        """The training data chosen in the form, checked: labels exist, at least two classes."""
        from napari_histo_wsss.core.data.datasets import load_dataset

        project = self.session.require_project()
        if self.source.currentText() == SOURCE_FOLDER:
            if not self.session.dataset_dir:
                raise GuiError("no labelled patch folder imported: use 'Import labelled patch folder' in the Patch labelling panel")
            spec = load_dataset(Path(self.session.dataset_dir), classes=project.classes)
        else:
            spec = load_dataset(project.root)
        if not spec.train:
            raise GuiError("no labelled patches yet: label patches in the Patch labelling panel first")
        counts = np.sum([s.labels for s in spec.train], axis=0)
        present = [n for n, c in zip(spec.classes.names, counts) if c > 0]
        if len(present) < 2:
            only = present[0] if present else "none"
            raise GuiError(f"only one class ({only}) has labelled patches: a classifier needs patches of at least two classes")
        return spec

    # -- actions -------------------------------------------------------------------------------
    @guarded
    def _on_start(self, *_: Any) -> None:
        self.start()

    @guarded
    def _on_resume(self, *_: Any) -> None:
        self.resume()

    @guarded
    def _on_cancel(self, *_: Any) -> None:
        if not self.task.running:
            self.say("no training is running")
            return
        self.task.cancel()
        self.say("cancelling: the run stops after the current step and keeps its checkpoint")

    def start(self) -> Path:
        """Start a new run in the project's runs folder; returns its folder."""
        if self.task.running:
            raise GuiError("training is already running: wait for it to finish or press Cancel")
        project = self.session.require_project()
        spec = self.dataset()
        cfg = self.config()
        method = getattr(cfg, "method", "") or "run"
        run_dir = project.run_dir(f"{self.run_prefix}{method}-{time.strftime('%Y%m%d-%H%M%S')}")
        self._launch(spec, run_dir, cfg, resume=False)
        return run_dir

    def resume(self) -> Path:
        """Continue the selected run from its last checkpoint (epochs from the form if larger)."""
        if self.task.running:
            raise GuiError("training is already running: wait for it to finish or press Cancel")
        self.session.require_project()
        data = self.runs.currentData()
        if not data:
            raise GuiError("no run to resume: start a training first")
        run_dir = Path(data)
        cfg = self._load_run_config(run_dir)
        if self.epochs.value() > cfg.epochs:
            cfg = dataclasses.replace(cfg, epochs=self.epochs.value())
        self._launch(self.dataset(), run_dir, cfg, resume=True)
        return run_dir

    def _train_job(self, spec: Any, run_dir: Path, cfg: Any, resume: bool) -> Callable[[Callable[[], bool]], Iterator[Any]]:
        """The background job: the core training generator for this run."""
        from napari_histo_wsss.core.stage1.train import train_classifier

        def job(should_stop: Callable[[], bool]) -> Iterator[Any]:
            return train_classifier(spec, run_dir, cfg, resume=resume, should_stop=should_stop)

        return job

    def _launch(self, spec: Any, run_dir: Path, cfg: Any, resume: bool) -> None:
        job = self._train_job(spec, run_dir, cfg, resume)
        self.run_dir = run_dir
        self.plot.clear()
        if resume:
            self._plot_history(run_dir)
        self.task.start(job, f"Training {run_dir.name}")
        self._set_running(True)
        n = len(getattr(spec, "train", ()) or ())
        what = ", ".join(str(v) for v in (getattr(cfg, "method", ""), cfg.backbone, cfg.device) if v)
        self.say(("resuming " if resume else "training ") + f"{run_dir.name} on {n} training items ({what})")

    def _set_running(self, running: bool) -> None:
        self.start_btn.setEnabled(True)  # pressing Start while running gives a clear message
        self.resume_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    # -- progress ------------------------------------------------------------------------------
    def _on_event(self, ev: Any) -> None:
        total, done = progress_units(ev)
        if total:
            self.bar.setMaximum(total)
            self.bar.setValue(done)
        kind = getattr(ev, "kind", "")
        if kind != "checkpoint":  # checkpoint messages are file paths: the status line has the run
            self.eta.setText(describe_event("", ev).lstrip(" ·") + segmix_state(getattr(ev, "metrics", None) or {}))
        steps = getattr(ev, "steps", 0) or 0
        if kind == "step" and ev.loss is not None and steps:
            self.plot.append("loss", max(ev.epoch - 1, 0) + ev.step / steps, ev.loss)
        elif kind == "epoch":
            self._plot_epoch(float(ev.epoch), ev.metrics or {})
        elif kind == "start" and self.run_dir is not None:
            self.session.runs_changed.emit()
        elif kind == "log" and not steps and getattr(ev, "message", "") and ev.metrics.get("level") == "warning":
            # the run's warnings (a class with no labelled patch, a class never labelled alone, a fresh
            # start instead of a resume): the pathologist must see them, not a passing ETA text
            self.warn(ev.message)

    def _plot_epoch(self, x: float, metrics: dict) -> None:
        """Per-epoch losses (left axis) and scores such as mIoU (right axis, 0..1); timings,
        learning rate and bookkeeping are not plotted."""
        for k, v in numeric_items(metrics):
            score = is_score(k)
            if "loss" not in k and not score:
                continue
            if k not in self.plot.series:
                pool = _SCORE_COLOURS if score else _LOSS_COLOURS
                used = sum(1 for s in self.plot.series.values() if s.right_axis == score)
                self.plot.add_series(k, pool[used % len(pool)], right_axis=score)
            self.plot.append(k, x, v)

    def _plot_history(self, run_dir: Path) -> None:
        for row in read_metrics(run_dir):
            if "epoch" in row:
                self._plot_epoch(float(row["epoch"]), row)

    def _on_run_selected(self, *_: Any) -> None:
        if self.task.running:
            return
        data = self.runs.currentData()
        self.plot.clear()
        if data:
            self._plot_history(Path(data))

    def _on_finished(self, outcome: str) -> None:
        self._set_running(False)
        self.session.runs_changed.emit()
        name = self.run_dir.name if self.run_dir else "run"
        if outcome == "done":
            self.bar.setValue(self.bar.maximum())
            self.say(f"training of {name} finished; {self.next_step}", notify=True)
        elif outcome == "cancelled":
            self.say(f"training of {name} cancelled; its checkpoint is kept: press Resume to continue")
        if self.run_dir is not None:
            self.runs.setCurrentText(self.run_dir.name)
