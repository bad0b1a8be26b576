"""Patch labelling panel: the patch grid over the slide, legend, counts, autosave, folder import.

The grid itself (one napari image layer, mouse selection, number keys, undo) is
:class:`~._patch_grid.PatchGridOverlay`; this panel connects it to the project: it loads the slide's
labels, writes every edit through :meth:`Project.set_patch_labels` / ``remove_patch_labels``
(atomic), keeps edits that could not be written (read-only disk...) pending and retries them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.widgets._common import Panel, clear_layout, color_swatch, form_group, guarded, same_layer
from napari_histo_wsss.widgets._live import LiveLabelling
from napari_histo_wsss.widgets._patch_grid import GRID_LAYER, PatchGridOverlay, grid_labels_from_table
from napari_histo_wsss.widgets._state import GuiError


class LabellingWidget(Panel):
    """Select patches on the grid and give them (multi-label) tissue classes."""

    heading = "Patch labelling"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.overlay: PatchGridOverlay | None = None
        self._pending: set[int] = set()

        self.info = QLabel("Open a project and a slide, then detect the patch grid (Project panel).")
        self.info.setWordWrap(True)
        self.main_layout.addWidget(self.info)

        row = QHBoxLayout()
        self.select_box = QCheckBox("Select with mouse")
        self.select_box.setChecked(True)
        self.select_box.setToolTip("Click: one patch; drag: rectangle; Shift: add. Hold Space (or untick) to pan.")
        self.select_box.toggled.connect(self._on_select_mode)
        self.show_btn = QPushButton("Show grid")
        self.show_btn.setToolTip("Re-add the patch grid layer (e.g. after deleting it)")
        self.show_btn.clicked.connect(self._on_show)
        row.addWidget(self.select_box)
        row.addWidget(self.show_btn)
        self.main_layout.addLayout(row)

        box, form = form_group("Classes (key: toggle on selection)")
        self.legend = QGridLayout()
        self.legend.setHorizontalSpacing(6)
        form.addRow(self.legend)
        self.main_layout.addWidget(box)

        self.selection_label = QLabel("0 selected")
        self.main_layout.addWidget(self.selection_label)
        row = QHBoxLayout()
        self.clear_btn = QPushButton("Clear labels (0)")
        self.clear_btn.clicked.connect(self._on_clear)
        self.undo_btn = QPushButton("Undo (Ctrl+Z)")
        self.undo_btn.clicked.connect(self._on_undo)
        self.none_btn = QPushButton("Deselect (Esc)")
        self.none_btn.clicked.connect(self._on_deselect)
        row.addWidget(self.clear_btn)
        row.addWidget(self.undo_btn)
        row.addWidget(self.none_btn)
        self.main_layout.addLayout(row)

        self.progress_label = QLabel("0 of 0 patches labelled")
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(8)
        self.main_layout.addWidget(self.progress_label)
        self.main_layout.addWidget(self.progress)
        row = QHBoxLayout()
        self.save_label = QLabel("")
        self.save_btn = QPushButton("Save now")
        self.save_btn.clicked.connect(self._on_save)
        row.addWidget(self.save_label, 1)
        row.addWidget(self.save_btn)
        self.main_layout.addLayout(row)

        box, form = form_group("Labelled patch folder")
        self.import_btn = QPushButton("Import labelled patch folder...")
        self.import_btn.setToolTip("A folder of patches with labels in their names (LUAD-HistoSeg, BCSS-WSSS, WSSS4LUAD) to train on")
        self.import_btn.clicked.connect(self._on_import)
        self.import_label = QLabel("")
        self.import_label.setWordWrap(True)
        form.addRow(self.import_btn)
        form.addRow(self.import_label)
        self.main_layout.addWidget(box)
        self.live = LiveLabelling(self)  # live CAMs and "label this next" suggestions
        self.main_layout.addWidget(self.live.box)
        self.finish_layout()
        # number keys act on the patch grid (label) and the pseudo-mask (pick the paint class);
        # pressed with another layer active they reach the viewer: say why nothing happened
        for key in range(10):
            self.viewer.bind_key(str(key), self._on_stray_key, overwrite=True)
        self.session.slide_changed.connect(self._bind_slide_keys)

        self.session.project_changed.connect(self._rebuild_legend)
        self.session.grid_changed.connect(self._on_grid_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._rebuild_legend()
        self._on_grid_changed()

    def _bind_slide_keys(self) -> None:
        """The slide layer (the one most often selected) answers number keys with the same
        message (napari's image layer would take them as its own tool shortcuts)."""
        layer = self.session.layer(self.session.slide_layer_name)
        if layer is not None:
            for key in range(10):
                layer.bind_key(str(key), lambda _l: self._on_stray_key(self.viewer), overwrite=True)

    def _on_stray_key(self, viewer: Any) -> None:
        active = viewer.layers.selection.active
        name = f"'{active.name}'" if active is not None else "no layer"
        self.say(f"number keys label the selected patches on the 'patch grid' layer and pick the paint class on "
                 f"the 'pseudo-mask' layer; {name} is selected: select one of those in the layer list", notify=True)

    # -- grid and overlay ----------------------------------------------------------------------
    def _on_grid_changed(self) -> None:
        if self._pending:
            self._flush()  # never drop edits of the previous slide
        self.overlay = None
        self._pending.clear()
        grid = self.session.grid
        if grid is None or self.session.project is None:
            old = self.session.layer(GRID_LAYER)
            if old is not None:
                self.viewer.layers.remove(old)
            self.info.setText("Open a project and a slide, then detect the patch grid (Project panel).")
            self._update_counts()
            return
        try:
            self.load_overlay()
        except HistoWSSSError as e:
            self.fail(str(e))

    def load_overlay(self) -> PatchGridOverlay:
        """Build the grid overlay of the current slide from the project's labels and show it."""
        project = self.session.require_project()
        sid, _slide = self.session.require_slide()
        grid = self.session.require_grid()
        labels, missing = grid_labels_from_table(grid, project.patch_labels(sid), project.classes.num_classes)
        self.overlay = PatchGridOverlay(
            self.session, grid, project.classes, labels,
            on_edit=self._on_edit, on_change=self._update_counts, on_message=self.say,
        )
        self.overlay.select_mode = self.select_box.isChecked()
        self.overlay.show()
        self.live.attach(self.overlay)
        mpp = self.session.project.settings.get("target_mpp")
        res = f" at {mpp:g} µm/px" if mpp else ""
        self.info.setText(f"Slide {sid}: {len(grid)} tissue patches of {grid.patch_size} px{res}.")
        if missing:
            self.say(f"{missing} labelled patches of this slide lie on another grid (other patch size) and are not shown")
        self._update_counts()
        return self.overlay

    def _require_overlay(self) -> PatchGridOverlay:
        """The shown grid overlay; edits are refused while its layer is deleted (they would be invisible)."""
        if self.overlay is None or self.overlay.layer is None:
            self.session.require_grid()
            raise GuiError("the patch grid is not shown: press 'Show grid'")
        return self.overlay

    @guarded
    def _on_show(self, *_: Any) -> None:
        if self.overlay is None:
            self.load_overlay()
        else:
            self.overlay.show()
            self.live.attach(self.overlay)
        self.say("patch grid shown")

    def _on_layer_removed(self, event: Any) -> None:
        ov = self.overlay
        if ov is not None and same_layer(event.value, ov.layer):
            ov.forget_layer()
            self.say("the patch grid layer was deleted; your labels are kept. Press 'Show grid' to bring it back.")

    def _on_select_mode(self, on: bool) -> None:
        if self.overlay is not None:
            self.overlay.select_mode = on

    # -- legend and counts ---------------------------------------------------------------------
    def _rebuild_legend(self) -> None:
        clear_layout(self.legend)
        self._count_labels: list[QLabel] = []
        p = self.session.project
        if p is None:
            self.legend.addWidget(QLabel("no project open"), 0, 0)
            return
        for i, c in enumerate(p.classes.classes):
            key = QPushButton(str(i + 1) if i < 9 else "·")
            key.setFixedWidth(30)
            key.setStyleSheet("padding: 0px;")
            key.setToolTip(f"toggle '{c.name}' on the selected patches" + (f" (key {i + 1})" if i < 9 else ""))
            key.clicked.connect(lambda _c=False, k=i: self._on_toggle(k))
            name = QLabel(c.name + (f" ({c.abbrev})" if c.abbrev else ""))
            count = QLabel("0")
            self.legend.addWidget(key, i, 0)
            self.legend.addWidget(color_swatch(c.color), i, 1)
            self.legend.addWidget(name, i, 2)
            self.legend.addWidget(count, i, 3)
            self._count_labels.append(count)
        self._update_counts()

    def _update_counts(self) -> None:
        ov = self.overlay
        if ov is None:
            self.selection_label.setText("0 selected")
            self.progress_label.setText("no patch grid")
            self.progress.setValue(0)
            for lab in getattr(self, "_count_labels", []):
                lab.setText("0")
            return
        per_class, n_lab = ov.counts()
        for lab, n in zip(self._count_labels, per_class):
            lab.setText(str(int(n)))
        n = len(ov.grid)
        self.progress_label.setText(f"{n_lab} of {n} patches labelled")
        self.progress.setMaximum(max(n, 1))
        self.progress.setValue(n_lab)
        self.selection_label.setText(f"{int(ov.selected.sum())} selected")
        self.undo_btn.setEnabled(ov.can_undo)

    # -- editing -------------------------------------------------------------------------------
    @guarded
    def _on_toggle(self, class_index: int) -> None:
        self._require_overlay().toggle_class(class_index)

    @guarded
    def _on_clear(self, *_: Any) -> None:
        self._require_overlay().clear_labels()

    @guarded
    def _on_undo(self, *_: Any) -> None:
        self._require_overlay().undo()

    @guarded
    def _on_deselect(self, *_: Any) -> None:
        self._require_overlay().select(np.array([], dtype=np.int64))

    def _on_edit(self, idx: np.ndarray) -> None:
        """Autosave: write the edited patches (plus any still pending) to the project."""
        self._pending.update(int(i) for i in idx)
        self._flush()
        self.session.labels_changed.emit()
        self.live.labels_changed()

    @guarded
    def _on_save(self, *_: Any) -> None:
        if self._flush():
            self.say("all labels saved")

    def _flush(self) -> bool:
        """Write pending label rows; on failure keep them pending and say so. True if all saved."""
        ov = self.overlay
        if ov is None or not self._pending:
            self._show_save_state()
            return True
        project = self.session.require_project()
        sid = self.session.slide_id
        idx = np.fromiter(sorted(self._pending), dtype=np.int64)
        lab = ov.labels[idx]
        has = lab.any(axis=1)
        x = np.asarray(ov.grid.x)[idx]
        y = np.asarray(ov.grid.y)[idx]
        try:
            if has.any():
                project.set_patch_labels(sid, x[has], y[has], int(ov.grid.size0), lab[has])
            if (~has).any():
                project.remove_patch_labels(sid, x[~has], y[~has], int(ov.grid.size0))
        except HistoWSSSError as e:
            self._show_save_state()
            self.fail(f"{len(self._pending)} label edit(s) NOT saved yet (kept in memory, retried on the next edit or 'Save now'): {e}")
            return False
        self._pending.clear()
        self._show_save_state()
        return True

    def _show_save_state(self) -> None:
        if self._pending:
            self.save_label.setText(f"<span style='color:#ff6b6b'>{len(self._pending)} unsaved</span>")
        else:
            self.save_label.setText("all labels saved" if self.overlay is not None else "")

    @property
    def unsaved_count(self) -> int:
        return len(self._pending)

    # -- import a labelled patch folder --------------------------------------------------------
    @guarded
    def _on_import(self, *_: Any) -> None:
        d = QFileDialog.getExistingDirectory(self, "Labelled patch folder")
        if d:
            self.import_folder(d)

    def import_folder(self, folder: str | Path) -> Any:
        """Check a labelled patch folder against the project's classes and make it the training source."""
        from napari_histo_wsss.core.data.datasets import load_dataset

        project = self.session.require_project()
        spec = load_dataset(Path(folder), classes=project.classes)
        if not spec.train:
            raise GuiError(f"{folder}: no labelled training patches found")
        counts = np.sum([s.labels for s in spec.train], axis=0)
        self.session.dataset_dir = str(folder)
        parts = ", ".join(f"{n} {int(c)}" for n, c in zip(project.classes.names, counts))
        self.import_label.setText(f"{Path(folder).name} ({spec.layout}): {len(spec.train)} patches ({parts}); "
                                  f"{len(spec.val)} validation images. Choose it as training data in the Training panel.")
        self.session.labels_changed.emit()
        self.say(f"imported {len(spec.train)} labelled patches from {folder}")
        return spec
