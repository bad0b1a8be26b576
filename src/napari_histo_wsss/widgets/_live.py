"""Live CAMs and label suggestions inside the Labelling panel.

Once the slide's feature cache is ready (built in the background on first use, kept in the
project), every label edit refits the live head (``core/stage1/live.py``) off the GUI thread and
replaces the small ``live pseudo-mask`` layer (one pixel per 32 working pixels, so pushing it is
cheap): the class with the largest raw logit, "uncertain" where no class reaches the floor.
Suggestions (``core/stage1/suggest.py``) are listed in the panel and on the keyboard:

* ``N``: select the next suggested patch and centre the view on it;
* ``1``..``9``: toggle classes on it (the grid's own keys);
* ``Enter``: confirm it and move to the next one (a new batch is computed when the list runs out).

The ranking is also a ``suggestions`` points layer: a numbered ring on each suggested patch still to
label, so the pathologist sees where the next labels are wanted across the slide.

So a pathologist can label a batch without touching the mouse.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QListWidget, QPushButton, QSpinBox, QVBoxLayout, QWidget

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.widgets._common import form_group, label_colormap

LIVE_LAYER = "live pseudo-mask"
SUGGEST_LAYER = "suggestions"  # the suggested patches still to label, numbered in suggestion order
FLOOR = 0.5  # a cell whose best class probability is below this is shown as uncertain


def live_style(classes: Any) -> tuple[dict, float]:
    """(label colours, opacity): the live layer looks like the Review panel's pseudo-mask, with the
    same class fills and the same style for uncertain tissue."""
    from napari_histo_wsss.widgets.review import PSEUDO_OPACITY, pseudo_colormap

    return pseudo_colormap(classes), PSEUDO_OPACITY


def _prepare(feats: Any, grid: Any) -> dict:
    """The dense map, its standardisation, every grid patch's pooled features, their embedding and
    its typicality (computed here, in the worker, once per cache: not on the GUI thread at every
    'Suggest patches')."""
    from napari_histo_wsss.core.stage1.live import standardiser
    from napari_histo_wsss.core.stage1.suggest import embed, typicality

    dense = feats.dense()
    mean, std = standardiser(dense, feats.tissue)
    pooled = feats.patch_features(grid.x, grid.y, grid.size0, dense=dense)
    coords = embed(pooled, mean, std)
    return {"dense": dense, "mean": mean, "std": std, "pooled": pooled, "coords": coords,
            "typical": typicality(coords)}


class LiveLabelling(QObject):
    """The live part of the Labelling panel (``panel``: a LabellingWidget)."""

    refitted = Signal(object)  # (generation, result dict), from the refit thread

    def __init__(self, panel: Any) -> None:
        super().__init__(panel)
        self.panel = panel
        self.session = panel.session
        self.features = None  # SlideFeatures of the current slide
        self._dense: np.ndarray | None = None
        self._pooled: np.ndarray | None = None
        self._coords: np.ndarray | None = None
        self._typical: np.ndarray | None = None
        self._mean = self._std = None
        # the project's stage-one run and its probabilities for every grid patch (disagreement):
        # (run folder, checkpoint stamp, (N, K) probs), computed off the GUI thread
        self._trained: tuple | None = None
        self._pending_trained: Callable[[], Any] | None = None  # asked for while the job was running
        self.head = None
        self.probs: np.ndarray | None = None
        self.queue: list[int] = []  # grid indices still to label, in suggestion order
        self._rank: dict[int, int] = {}  # grid index -> its rank in the current batch (1 = first)
        self.current: int | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self.last_update_s: float | None = None

        box, form = form_group("Live CAMs and suggestions")
        self.enable_box = QCheckBox("Live CAMs (frozen features, refit on every label)")
        self.enable_box.setToolTip("Computes the slide's feature cache once (kept in the project), then updates the "
                                   "'live pseudo-mask' layer after every label")
        self.enable_box.toggled.connect(self._on_enable)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # the status changes on every refit: in a box of fixed height, so a new text re-lays out this
        # box only, not the dock and the main window (that re-layout stalled the viewer 20-40 ms a label)
        status_box = QWidget()
        status_layout = QVBoxLayout(status_box)
        status_layout.setContentsMargins(0, 0, 0, 0)
        status_layout.addWidget(self.status)
        self.status.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        status_box.setFixedHeight(4 * self.status.fontMetrics().lineSpacing() + 4)
        row = QHBoxLayout()
        self.suggest_btn = QPushButton("Suggest patches")
        self.suggest_btn.setToolTip("Rank unlabelled patches: uncertain ones and tissue not yet labelled (N: next, Enter: confirm)")
        self.suggest_btn.clicked.connect(self._on_suggest)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 200)
        self.n_spin.setValue(10)
        self.n_spin.setToolTip("patches per batch")
        row.addWidget(self.suggest_btn)
        row.addWidget(self.n_spin)
        self.compare_box = QCheckBox("Rank where the trained run disagrees")
        self.compare_box.setToolTip("Also rank patches where the project's newest stage-one run and the live head "
                                    "disagree (off by default: it did not help in the simulated annotator, "
                                    "docs/benchmarks/live_labelling.md)")
        self.list = QListWidget()
        self.list.setMaximumHeight(120)
        self.list.itemDoubleClicked.connect(lambda item: self.goto(int(item.data(256))))
        form.addRow(self.enable_box)
        form.addRow(row)
        form.addRow(self.compare_box)
        form.addRow(self.list)
        form.addRow(QLabel("Keys on the grid: N next suggestion, 1-9 classes, Enter confirm and go on"))
        form.addRow(status_box)
        self.box = box
        self.refitted.connect(self._on_refitted)
        self.session.task("live-trained", "Trained-run predictions").finished.connect(self._trained_task_ended)
        self.session.grid_changed.connect(self._reset)

    # -- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.features is not None and self._pooled is not None

    def _reset(self) -> None:
        self.features = self._dense = self._pooled = self._coords = self._typical = None
        self.head = self.probs = self._trained = None
        self.queue, self.current = [], None
        self.list.clear()
        self._show_suggestions()
        if self.enable_box.isChecked() and self.session.grid is not None:
            self.start_features()

    def attach(self, overlay: Any) -> None:
        """Bind the suggestion keys on the grid layer (called whenever the grid layer is (re)added)."""
        layer = overlay.layer
        if layer is None:
            return
        layer.bind_key("n", lambda _l: self.next(), overwrite=True)
        layer.bind_key("Enter", lambda _l: self.confirm(), overwrite=True)

    # -- feature cache ---------------------------------------------------------------------------
    def _on_enable(self, on: bool) -> None:
        if on:
            try:
                self.start_features()
            except HistoWSSSError as e:
                self.panel.fail(str(e))
                self.enable_box.setChecked(False)
        else:
            task = self.session.task("live-features", "Feature cache")
            task.cancel()
            for name in (LIVE_LAYER, SUGGEST_LAYER):
                layer = self.session.layer(name)
                if layer is not None:
                    self.session.viewer.layers.remove(layer)

    def start_features(self) -> None:
        """Build (or load) the current slide's feature cache in the background."""
        from napari_histo_wsss.core.stage1.features import (
            FeatureSpec,
            build_slide_features,
            feature_map_geometry,
            slide_features_path,
        )

        project = self.session.require_project()
        sid, _ = self.session.require_slide()
        grid = self.session.require_grid()
        task = self.session.task("live-features", "Feature cache")
        if task.running:
            return
        spec = FeatureSpec()
        store = None if project.read_only else slide_features_path(project, sid, spec, grid.downsample)
        # the (empty) live layer now, in answer to the click: adding a layer holds the GUI thread
        # for about 0.1 s, which would otherwise fall on the first refit
        cell0, shape = feature_map_geometry(self.session.slide.dimensions, grid.downsample)
        self._show(np.zeros(shape, np.uint8), cell0)
        path = project.slide_path(sid)
        tissue = project.tissue(sid)

        def job(should_stop):
            from napari_histo_wsss.core.device import pick_device
            from napari_histo_wsss.core.slides.slide import open_slide
            from napari_histo_wsss.core.stage1.live import warm_up

            with open_slide(path) as slide:  # its own reader: the viewer's one serves the GUI thread
                for ev in build_slide_features(slide, tissue, grid.downsample, spec, store=store,
                                               device=pick_device("auto"), should_stop=should_stop):
                    if ev.kind == "done":  # everything the refits need, computed here, not on the GUI thread
                        ev.prepared = _prepare(ev.result, grid)
                        warm_up()  # torch's one-off start-up cost here, not in the first refit
                    yield ev

        def on_event(ev: Any) -> None:
            if ev.kind == "done" and self.session.slide_id == sid and self.session.grid is grid:
                self._features_ready(ev.result, ev.prepared)
            elif ev.message:
                self.status.setText(ev.message)

        self._start(task, job, on_event, f"feature cache of {sid}")

    @staticmethod
    def _start(task: Any, job: Callable, on_event: Callable, what: str) -> None:
        """Run ``job`` in ``task``'s slot with ``on_event`` as its only listener."""
        try:
            task.event.disconnect()
        except (RuntimeError, TypeError):
            pass
        task.event.connect(on_event)
        task.start(job, what)

    def _features_ready(self, feats: Any, prepared: dict) -> None:
        self.features = feats
        self._dense, self._mean, self._std = prepared["dense"], prepared["mean"], prepared["std"]
        self._pooled, self._coords, self._typical = prepared["pooled"], prepared["coords"], prepared["typical"]
        self.status.setText(f"features ready ({feats.shape[0]} x {feats.shape[1]} cells); label patches to see live CAMs")
        self.labels_changed()

    # -- refit -------------------------------------------------------------------------------------
    def labels_changed(self) -> None:
        """Refit the live head on the grid's labels in a thread; the newest edit wins."""
        ov = self.panel.overlay
        if not self.ready or ov is None or not self.enable_box.isChecked():
            return
        labels = np.asarray(ov.labels).copy()
        self._generation += 1
        gen = self._generation
        project = self.session.require_project()
        k, names = project.classes.num_classes, project.classes.names
        pooled, dense, tissue, mean, std = self._pooled, self._dense, self.features.tissue, self._mean, self._std
        previous = self.head

        def work() -> None:
            from napari_histo_wsss.core.stage1.live import LiveHead, cam_logits, pseudo_from_logits

            t0 = time.perf_counter()
            has = labels.any(axis=1)
            if not has.any():
                self.refitted.emit((gen, None))
                return
            with self._lock:
                if gen != self._generation:  # a newer edit is queued behind this one: it refits instead
                    return
                head = LiveHead(k, mean, std)
                if previous is not None:
                    head.weight, head.bias = previous.weight, previous.bias  # warm start
                head.fit(pooled[has], labels[has])
                mask = pseudo_from_logits(cam_logits(head, dense, tissue), floor=FLOOR)
                probs = head.probabilities(pooled)
            self.refitted.emit((gen, {"head": head, "mask": mask, "probs": probs, "warnings": head.warnings(names),
                                      "seconds": time.perf_counter() - t0, "n": int(has.sum())}))

        threading.Thread(target=work, name="histo-wsss-live-head", daemon=True).start()

    def _on_refitted(self, item: Any) -> None:
        gen, result = item
        if gen != self._generation or not self.ready:
            return  # a newer edit is on its way
        if result is None:
            self.head = self.probs = None
            self.status.setText("no labelled patch yet: use 'Suggest patches' for a first batch (a random sample of the tissue patches)")
            return
        self.head, self.probs = result["head"], result["probs"]
        self.last_update_s = result["seconds"]
        self._show(result["mask"])
        notes = "; ".join(result["warnings"])
        self.status.setText(f"live head on {result['n']} labelled patches, updated in {result['seconds'] * 1000:.0f} ms"
                            + (f". {notes}" if notes else ""))

    def _show(self, mask: np.ndarray, cell0: float | None = None) -> None:
        """Put ``mask`` (feature cells, live-head values) in the live layer, made when missing
        (``cell0``: level-0 px per cell, default the feature map's)."""
        from napari_histo_wsss.core.review import uncertain_index
        from napari_histo_wsss.core.stage1.live import UNCERTAIN

        classes = self.session.require_project().classes
        data = mask.astype(np.uint8)
        data[mask == UNCERTAIN] = uncertain_index(classes) + 1
        layer = self.session.layer(LIVE_LAYER)
        if layer is not None and layer.data.shape == data.shape:
            layer.data = data  # a few thousand cells: replacing them is cheaper than diffing
            return
        tf = self.session.overlay_transform(self.features.cell0 if cell0 is None else cell0)
        colors, opacity = live_style(classes)
        viewer = self.session.viewer
        active = viewer.layers.selection.active
        layer = self.session.replace_layer(LIVE_LAYER, viewer.add_labels, data=data, opacity=opacity,
                                           colormap=label_colormap(colors), **tf)
        layer.editable = False
        layer.metadata["histo_wsss"] = "live-pseudo"
        # exported as the Review's mask is: value = class + 1; uncertain and off-tissue cells are background
        bg = classes.background_index + 1
        layer.metadata["same_as"] = {0: bg, uncertain_index(classes) + 1: bg}
        grid_layer = self.panel.overlay.layer if self.panel.overlay is not None else None
        if grid_layer is not None:  # below the grid, so clicks and keys still reach it
            layers = viewer.layers
            layers.move(layers.index(layer), layers.index(grid_layer))
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active

    # -- suggestions ---------------------------------------------------------------------------
    def _on_suggest(self, *_: Any) -> None:
        try:
            if not self.refresh_trained(then=self._on_suggest):
                self.suggest()
        except HistoWSSSError as e:
            self.panel.fail(str(e))

    def _run_stamp(self) -> tuple[Any, Any, str | None]:
        """The project's newest stage-one run, its best checkpoint's (size, mtime) and a note."""
        from napari_histo_wsss.core.runs import checkpoint_file
        from napari_histo_wsss.core.stage1.suggest import project_run

        run, note = project_run(self.session.require_project())
        if run is None:
            return None, None, note
        try:
            st = checkpoint_file(run, "best").stat()
        except OSError:
            return None, None, None  # a run still before its first checkpoint
        return run, (st.st_size, st.st_mtime_ns), None

    def refresh_trained(self, then: Callable[[], Any] | None = None) -> bool:
        """Compute, in the background, the project's newest stage-one run's probabilities for
        every patch of the grid when they are missing or the run changed (the suggestions rank
        patches where it and the live head disagree higher). Returns True when a job started
        (``then`` runs when it is done), False when nothing needs computing."""
        from napari_histo_wsss.core.stage1.suggest import trained_patch_probs

        if not self.ready or not self.compare_box.isChecked():
            return False
        run, stamp, _ = self._run_stamp()
        if run is None or (self._trained is not None and self._trained[:2] == (run, stamp)):
            return False
        task = self.session.task("live-trained", "Trained-run predictions")
        if task.running:  # the job of an older run is still winding down: ask again when it has ended
            self._pending_trained = then
            return True
        project = self.session.require_project()
        sid, _ = self.session.require_slide()
        grid = self.session.require_grid()

        def job(should_stop):
            from napari_histo_wsss.core.device import pick_device

            yield from trained_patch_probs(project, sid, grid, run, "best", device=pick_device("auto"),
                                           should_stop=should_stop)

        def on_event(ev: Any) -> None:
            if ev.kind == "done" and self.session.grid is grid and ev.probs is not None:
                self._trained = (run, stamp, ev.probs)
                self.status.setText(f"suggestions compare the live head with {run.name}")
                if then is not None:
                    then()
            elif ev.message:
                self.status.setText(ev.message)

        self._start(task, job, on_event, f"{run.name} on the patches of {sid}")
        return True

    def _trained_task_ended(self, _outcome: str) -> None:
        """A request that came while the trained-run job was running: made again now."""
        then, self._pending_trained = self._pending_trained, None
        if then is not None:
            try:
                if not self.refresh_trained(then=then):
                    then()
            except HistoWSSSError as e:
                self.panel.fail(str(e))

    def suggest(self) -> list[int]:
        """A new batch of suggestions (grid indices), shown in the list; the first one is selected."""
        from napari_histo_wsss.core.stage1.suggest import suggest
        from napari_histo_wsss.widgets._state import GuiError

        ov = self.panel.overlay
        if not self.ready or ov is None:
            raise GuiError("tick 'Live CAMs' and wait for the slide's features first")
        labelled = np.asarray(ov.labels).any(axis=1)
        head = self.head
        other = (self._trained[2] if self.compare_box.isChecked() and self._trained is not None
                 and len(self._trained[2]) == len(labelled) else None)
        picks = suggest(self._coords, labelled, int(self.n_spin.value()),
                        probs=self.probs if head is not None else None,
                        trainable=head.trainable if head is not None else None, typical=self._typical,
                        other_probs=other)
        self.queue = [p.index for p in picks]
        self._rank = {p.index: r + 1 for r, p in enumerate(picks)}
        self.list.clear()
        names = self.session.require_project().classes.names
        for p in picks:
            guess = ""
            if head is not None and self.probs is not None:
                top = [c for c in np.argsort(-self.probs[p.index])[:2] if np.isfinite(head.bias[c])]
                guess = ", ".join(f"{names[c]} {self.probs[p.index, c]:.2f}" for c in top)
            why = "first batch" if head is None else p.reason
            if other is not None and head is not None:
                guess += f"; trained: {names[int(np.argmax(other[p.index]))]} {float(other[p.index].max()):.2f}"
            self.list.addItem(f"({int(ov.grid.x[p.index])}, {int(ov.grid.y[p.index])})  {why}  {guess}".rstrip())
            self.list.item(self.list.count() - 1).setData(256, p.index)
        if not self.queue:
            self._show_suggestions()
            self.panel.say("every patch is labelled")
            return []
        self.next()
        return list(self.queue)

    def _show_suggestions(self) -> None:
        """The ``suggestions`` layer: a numbered ring on each queued patch (its rank in this batch);
        removed when nothing is queued. The active layer stays active (keys reach the grid)."""
        ov = self.panel.overlay
        viewer = self.session.viewer
        layer = self.session.layer(SUGGEST_LAYER)
        if ov is None or not self.queue:
            if layer is not None:
                viewer.layers.remove(layer)
            return
        g = ov.grid
        idx = np.asarray(self.queue, dtype=np.int64)
        centres0 = np.stack([g.y[idx] + g.size0 / 2, g.x[idx] + g.size0 / 2], axis=1).astype(float)
        world = self.session.translate0 + self.session.scale0 * (centres0 - 0.5)
        ranks = [str(self._rank[i]) for i in self.queue]
        ring = 0.7 * g.size0 * float(np.mean(self.session.scale0))  # ring diameter in world units
        if layer is not None:
            layer.data = world
            layer.features = {"rank": ranks}  # the ring labels follow (text reads the feature)
            layer.size = np.full(len(world), ring)
            return
        active = viewer.layers.selection.active
        layer = viewer.add_points(world, name=SUGGEST_LAYER, size=ring,
                                  face_color="transparent", border_color="#ffd400", border_width=0.12,
                                  text={"string": "{rank}", "color": "#ffd400", "size": 12, "anchor": "center"},
                                  features={"rank": ranks}, blending="translucent_no_depth",
                                  **({"units": self.session.units0} if self.session.units0 is not None else {}))
        layer.editable = False
        layer.metadata["histo_wsss"] = "suggestions"
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active

    def next(self) -> int | None:
        """Select the next suggested patch that is still unlabelled and centre the view on it."""
        ov = self.panel.overlay
        if ov is None:
            return None
        while self.queue and np.asarray(ov.labels)[self.queue[0]].any() and self.queue[0] != self.current:
            self.queue.pop(0)
        self._show_suggestions()
        if not self.queue:
            try:
                # a new or retrained stage-one run: its view of the patches first, then the batch
                if self.refresh_trained(then=self._on_suggest):
                    self.status.setText("the trained run's view of the patches is being computed; the next batch follows")
                    return None
                if not self.suggest():
                    return None
            except HistoWSSSError as e:
                self.panel.fail(str(e))
                return None
        return self.goto(self.queue[0])

    def goto(self, index: int) -> int:
        ov = self.panel.overlay
        self.current = int(index)
        ov.select(np.array([index], dtype=np.int64))
        g = ov.grid
        x0, y0 = float(g.x[index]) + g.size0 / 2, float(g.y[index]) + g.size0 / 2
        world = self.session.translate0 + self.session.scale0 * (np.array([y0, x0]) - 0.5)
        self.session.viewer.scene.camera.center = tuple(world)
        return self.current

    def confirm(self) -> int | None:
        """The current suggestion is done (it must carry a class): move on to the next one."""
        ov = self.panel.overlay
        if ov is None or self.current is None:
            return self.next()
        if not np.asarray(ov.labels)[self.current].any():
            self.panel.say("give the patch a class first (keys 1-9), then Enter")
            return self.current
        if self.queue and self.queue[0] == self.current:
            self.queue.pop(0)
        self.current = None
        return self.next()
