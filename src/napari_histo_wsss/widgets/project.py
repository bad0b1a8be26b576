"""Project panel: create/open a project folder, classes, slides, tissue detection and patch grid.

Everything the panel sets persists in the project folder (:class:`core.data.project.Project`): the
class table and patch settings are fixed when the project is created (labels refer to them), slides
are added by path, the tissue mask and patch grid come from :meth:`Project.grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_histo_wsss.core.data.classes import DEFAULT_COLORS, PRESETS, ClassTable
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.widgets._common import Panel, compact, form_group, guarded, label_colormap
from napari_histo_wsss.widgets._state import GuiError

TISSUE_LAYER = "tissue"
_PLUGIN = "napari-histo-wsss"
_CUSTOM = "custom"
#: Tissue outline: near-black, a colour no class table uses, visible on H&E and on glass
TISSUE_RGBA = (0.08, 0.08, 0.10, 1.0)


def slide_path_of_layer(layer: Any) -> str | None:
    """The file a napari image layer was read from (reader source or metadata), if known."""
    src = getattr(getattr(layer, "source", None), "path", None)
    if src:
        return str(src)
    md = getattr(layer, "metadata", {}) or {}
    for key in ("path", "slide_path", "file"):
        if md.get(key):
            return str(md[key])
    return None


class ClassEditor(QWidget):
    """Preset chooser plus an editable table of class names and colours (custom classes)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS) + [_CUSTOM])
        self.preset.setCurrentText("luad-histoseg")
        self.preset.currentTextChanged.connect(self._on_preset)
        lay.addWidget(self.preset)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["class", "colour"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.cellDoubleClicked.connect(self._pick_colour)
        self.table.setMaximumHeight(150)
        lay.addWidget(self.table)
        row = QHBoxLayout()
        self.add_btn = QPushButton("Add class")
        self.add_btn.clicked.connect(self.add_class)
        self.del_btn = QPushButton("Remove class")
        self.del_btn.clicked.connect(self._remove_class)
        row.addWidget(self.add_btn)
        row.addWidget(self.del_btn)
        lay.addLayout(row)
        self._on_preset(self.preset.currentText())

    def _on_preset(self, name: str) -> None:
        if name != _CUSTOM:
            self.set_table(PRESETS[name])
        self._set_editable(name == _CUSTOM)

    def _set_editable(self, editable: bool) -> None:
        self.add_btn.setEnabled(editable)
        self.del_btn.setEnabled(editable)
        trig = QAbstractItemView.EditTrigger
        self.table.setEditTriggers(trig.DoubleClicked | trig.EditKeyPressed if editable else trig.NoEditTriggers)

    def set_table(self, table: ClassTable) -> None:
        self.table.setRowCount(0)
        for c in table.classes:
            self._append(c.name, c.color)

    def _append(self, name: str, color: tuple[int, int, int]) -> None:
        r = self.table.rowCount()
        self.table.insertRow(r)
        self.table.setItem(r, 0, QTableWidgetItem(name))
        sw = QTableWidgetItem("")
        sw.setBackground(QColor(*color))
        sw.setData(256, tuple(int(v) for v in color))  # Qt.UserRole
        self.table.setItem(r, 1, sw)

    def add_class(self, name: str = "", color: tuple[int, int, int] | None = None) -> None:
        r = self.table.rowCount()
        self._append(name or f"class {r + 1}", color or DEFAULT_COLORS[r % len(DEFAULT_COLORS)])

    def _remove_class(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True) or [self.table.rowCount() - 1]
        for r in rows:
            if r >= 0:
                self.table.removeRow(r)

    def _pick_colour(self, row: int, col: int) -> None:
        if col != 1 or self.preset.currentText() != _CUSTOM:
            return
        current = self.table.item(row, 1).data(256)
        c = QColorDialog.getColor(QColor(*current), self, "Class colour")
        if c.isValid():
            self.table.item(row, 1).setBackground(c)
            self.table.item(row, 1).setData(256, (c.red(), c.green(), c.blue()))

    def class_table(self) -> ClassTable:
        """The chosen preset, or the custom table (raises ClassTableError on bad input)."""
        name = self.preset.currentText()
        if name != _CUSTOM:
            return PRESETS[name]
        names = [(self.table.item(r, 0).text() if self.table.item(r, 0) else "").strip() for r in range(self.table.rowCount())]
        if any(not n for n in names):
            raise GuiError("every class needs a name")
        colors = [tuple(self.table.item(r, 1).data(256)) for r in range(self.table.rowCount())]
        return ClassTable.custom(names, colors)


class ProjectWidget(Panel):
    """Create/open the project, choose classes, add slides, detect tissue and lay the patch grid."""

    heading = "Project and slides"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)

        box, form = form_group("Project folder")
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("folder, e.g. case-12.wsss")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_folder)
        prow = QHBoxLayout()
        prow.addWidget(self.path_edit)
        prow.addWidget(browse)
        form.addRow("Folder", prow)
        self.classes = ClassEditor()
        form.addRow("Classes", self.classes)
        self.patch_size = QSpinBox()
        self.patch_size.setRange(32, 2048)
        self.patch_size.setSingleStep(32)
        self.patch_size.setValue(224)
        self.patch_size.setSuffix(" px")
        form.addRow("Patch size", self.patch_size)
        self.target_mpp = QDoubleSpinBox()
        self.target_mpp.setRange(0.0, 64.0)
        self.target_mpp.setDecimals(3)
        self.target_mpp.setSingleStep(0.25)
        self.target_mpp.setValue(1.0)
        self.target_mpp.setSpecialValueText("level 0 (no resampling)")
        self.target_mpp.setSuffix(" µm/px")
        self.target_mpp.setToolTip("Resolution patches are read at; 1.0 µm/px is about 10x. 0 = the slide's full resolution.")
        form.addRow("Resolution", self.target_mpp)
        self.min_tissue = QDoubleSpinBox()
        self.min_tissue.setRange(0.0, 1.0)
        self.min_tissue.setSingleStep(0.05)
        self.min_tissue.setValue(0.5)
        form.addRow("Min. tissue", self.min_tissue)
        self.apply_btn = QPushButton("Apply settings")
        self.apply_btn.setToolTip("Change patch size / resolution / min. tissue of the open project (the grid is laid again; labels keep their own patch size)")
        self.apply_btn.clicked.connect(self._on_apply)
        form.addRow(self.apply_btn)
        brow = QHBoxLayout()
        self.create_btn = QPushButton("Create project")
        self.create_btn.clicked.connect(self._on_create)
        self.open_btn = QPushButton("Open project")
        self.open_btn.clicked.connect(self._on_open)
        brow.addWidget(self.create_btn)
        brow.addWidget(self.open_btn)
        form.addRow(brow)
        self.main_layout.addWidget(box)

        box, form = form_group("Slides")
        self.slide_list = QListWidget()
        self.slide_list.setMaximumHeight(110)
        self.slide_list.itemDoubleClicked.connect(lambda _i: self._on_show_slide())
        form.addRow(self.slide_list)
        self.layer_combo = compact(QComboBox())
        self.layer_combo.setToolTip("An image layer of the viewer opened from a slide file")
        add_layer = QPushButton("Add open slide")
        add_layer.clicked.connect(self._on_add_layer)
        lrow = QHBoxLayout()
        lrow.addWidget(self.layer_combo, 1)
        lrow.addWidget(add_layer)
        form.addRow(lrow)
        srow = QHBoxLayout()
        open_file = QPushButton("Add slide file...")
        open_file.clicked.connect(self._on_add_file)
        open_folder = QPushButton("Add patch folder...")
        open_folder.setToolTip("A folder of patch images (any sizes): shown and labelled as one contact sheet")
        open_folder.clicked.connect(self._on_add_folder)
        show = QPushButton("Show selected")
        show.clicked.connect(self._on_show_slide)
        srow.addWidget(open_file)
        srow.addWidget(open_folder)
        srow.addWidget(show)
        form.addRow(srow)
        self.grid_btn = QPushButton("Detect tissue and patch grid")
        self.grid_btn.clicked.connect(self._on_grid)
        form.addRow(self.grid_btn)
        self.main_layout.addWidget(box)
        self.finish_layout()

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.session.project_changed.connect(self._refresh_project)
        self.session.slide_changed.connect(self._refresh_slides)
        self._grid_task = self.session.task("grid", "Tissue detection and patch grid")
        self._grid_task.event.connect(self._on_grid_event)
        self._grid_task.finished.connect(lambda _o: self.grid_btn.setEnabled(True))
        self.watch(self._grid_task)
        self._refresh_layers()
        self._refresh_project()

    # -- project -------------------------------------------------------------------------------
    def _browse_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Project folder", self.path_edit.text() or str(Path.home()))
        if d:
            self.path_edit.setText(d)

    def _folder(self) -> Path:
        text = self.path_edit.text().strip()
        if not text:
            raise GuiError("type or choose a project folder first")
        return Path(text).expanduser()

    @guarded
    def _on_create(self, *_: Any) -> None:
        self.create_project(self._folder())

    @guarded
    def _on_open(self, *_: Any) -> None:
        self.open_project(self._folder())

    def create_project(self, path: str | Path, classes: ClassTable | None = None) -> Any:
        """Create a project with the panel's settings (or ``classes``) and make it current."""
        from napari_histo_wsss.core.data.project import Project

        table = classes if classes is not None else self.classes.class_table()
        mpp = self.target_mpp.value() or None
        project = Project.create(Path(path), table, patch_size=self.patch_size.value(), target_mpp=mpp,
                                 min_tissue=self.min_tissue.value(), session=True)
        self.path_edit.setText(str(path))
        self._make_current(project)
        self.say(f"created project {project.root} with classes {', '.join(table.names)}", notify=True)
        return project

    def open_project(self, path: str | Path) -> Any:
        """Open an existing project folder and make it current; warn when another window has it
        open too: saves from both merge, but neither window shows the other's new edits."""
        from napari_histo_wsss.core.data.project import Project

        project = Project.open(Path(path), session=True)
        self.path_edit.setText(str(path))
        self._make_current(project)
        opened = f"opened {project.root}: {len(project.slides)} slide(s), classes {', '.join(project.classes.names)}"
        if project.slides:  # carry on where the project stands: its first slide, grid and patch labels
            sid = next(iter(project.slides))
            try:
                self.show_slide(sid)
                self.detect_grid()
                opened += f"; slide {sid} shown with its patch grid and labels"
            except HistoWSSSError as e:
                opened += f"; slide {sid} not shown: {e}"
        if project.open_elsewhere is not None:
            warning = project.open_elsewhere.message(project.root)
            self.say(f"{opened}. Warning: {warning}")
            show_warning(warning)
        else:
            self.say(opened)
        return project

    def _make_current(self, project: Any) -> None:
        """Make ``project`` current; the previous one stops counting as open in this window."""
        previous = self.session.project
        self.session.set_project(project)
        if previous is not None and previous is not project:
            previous.end_session()

    @guarded
    def _on_apply(self, *_: Any) -> None:
        self.apply_settings()

    def apply_settings(self) -> None:
        """Save the patch settings into the open project and lay the grid again."""
        project = self.session.require_project()
        project.update_settings(patch_size=self.patch_size.value(), target_mpp=self.target_mpp.value() or None,
                                min_tissue=self.min_tissue.value())
        self.say("settings saved")
        if self.session.slide is not None:
            self.session.set_grid(None)
            self.detect_grid()

    def _refresh_project(self) -> None:
        p = self.session.project
        editable = p is None
        self.apply_btn.setEnabled(not editable)
        self.classes.preset.setEnabled(editable)
        if p is not None:
            st = p.settings
            self.patch_size.setValue(int(st.get("patch_size", self.patch_size.value())))
            self.target_mpp.setValue(float(st.get("target_mpp") or 0.0))
            self.min_tissue.setValue(float(st.get("min_tissue", self.min_tissue.value())))
            preset = p.classes.preset if p.classes.preset in PRESETS else _CUSTOM
            self.classes.preset.blockSignals(True)
            self.classes.preset.setCurrentText(preset)
            self.classes.preset.blockSignals(False)
            self.classes.set_table(p.classes)
            self.classes._set_editable(False)
        else:
            self.classes._set_editable(self.classes.preset.currentText() == _CUSTOM)
        self._refresh_slides()

    # -- slides --------------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.clear()
        for layer in self.viewer.layers:
            if layer.__class__.__name__ == "Image" and getattr(layer, "rgb", False) and slide_path_of_layer(layer):
                self.layer_combo.addItem(layer.name)
        if current:
            self.layer_combo.setCurrentText(current)

    def _refresh_slides(self) -> None:
        self.slide_list.clear()
        p = self.session.project
        if p is None:
            return
        for sid, rec in p.slides.items():
            mark = "▶ " if sid == self.session.slide_id else ""
            self.slide_list.addItem(f"{mark}{sid}  ({Path(str(rec.path)).name})")
        ids = list(p.slides)
        if self.session.slide_id in ids:
            self.slide_list.setCurrentRow(ids.index(self.session.slide_id))

    @guarded
    def _on_add_layer(self, *_: Any) -> None:
        name = self.layer_combo.currentText()
        if not name:
            raise GuiError("no slide open in the viewer: open one with File > Open or 'Add slide file...'")
        self.add_slide_layer(self.viewer.layers[name])

    def add_slide_layer(self, layer: Any) -> str:
        """Add the slide shown by ``layer`` to the project and make it the current slide."""
        project = self.session.require_project()
        path = slide_path_of_layer(layer)
        if not path:
            raise GuiError(f"layer {layer.name!r} was not opened from a slide file; use 'Add slide file...'")
        sid = project.add_slide(path)
        self.session.set_slide(sid, project.open_slide(sid), layer)
        self.say(f"slide {sid} added to the project; next: 'Detect tissue and patch grid'")
        return sid

    @guarded
    def _on_add_file(self, *_: Any) -> None:
        self.session.require_project()
        path, _f = QFileDialog.getOpenFileName(self, "Slide", "", "Slides (*.svs *.ndpi *.mrxs *.scn *.tif *.tiff *.vms *.bif *.png *.jpg);;All files (*)")
        if path:
            self.add_slide_file(path)

    @guarded
    def _on_add_folder(self, *_: Any) -> None:
        self.session.require_project()
        path = QFileDialog.getExistingDirectory(self, "Patch folder")
        if path:
            self.add_slide_file(path)

    def add_slide_file(self, path: str | Path) -> str:
        """Open a slide file, or a folder of patches (one contact sheet of its images), in the viewer
        (through the plugin's reader) and add it to the project."""
        project = self.session.require_project()
        sid = project.add_slide(str(path))
        layer = self._show_slide_layer(sid)
        self.session.set_slide(sid, project.open_slide(sid), layer)
        self.say(f"slide {sid} added to the project; next: 'Detect tissue and patch grid'")
        return sid

    @guarded
    def _on_show_slide(self, *_: Any) -> None:
        project = self.session.require_project()
        row = self.slide_list.currentRow()
        ids = list(project.slides)
        if row < 0 or row >= len(ids):
            raise GuiError("select a slide of the project in the list first")
        self.show_slide(ids[row])

    def show_slide(self, slide_id: str) -> None:
        """Make a slide of the project current, opening it in the viewer if needed."""
        project = self.session.require_project()
        layer = self._show_slide_layer(slide_id)
        self.session.set_slide(slide_id, project.open_slide(slide_id), layer)
        self.say(f"slide {slide_id} is current")

    def _show_slide_layer(self, slide_id: str) -> Any:
        """The viewer layer of a project slide: an open one with the same file, else read it."""
        project = self.session.require_project()
        path = project.slide_path(slide_id)  # a moved or deleted file: one line naming it and the project
        for layer in self.viewer.layers:
            lp = slide_path_of_layer(layer)
            if lp and Path(lp).resolve() == path.resolve():
                return layer
        try:
            layers = self.viewer.open(str(path), plugin=_PLUGIN)
        except Exception as e:  # noqa: BLE001 - reader errors carry napari's wrapping; show the cause
            cause = e.__cause__ if isinstance(e.__cause__, HistoWSSSError) else e
            raise GuiError(f"could not open {path}: {cause}") from e
        if not layers:
            raise GuiError(f"the slide reader returned nothing for {path}")
        return layers[0]

    # -- tissue and grid -----------------------------------------------------------------------
    @guarded
    def _on_grid(self, *_: Any) -> None:
        self.detect_grid()

    def detect_grid(self) -> None:
        """Run tissue detection and the patch grid in the background; show both when ready."""
        project = self.session.require_project()
        sid, _slide = self.session.require_slide()
        if self._grid_task.running:
            self.say("the patch grid is being laid; it shows when ready")
            return

        slide = self.session.slide

        def job(should_stop: Any) -> Iterator[Any]:
            from napari_histo_wsss.core.slides.grid import FEW_PATCHES, finer_patch_size

            grid = project.grid(sid)
            tissue = project.tissue(sid)
            finer = None
            if 0 < len(grid) < FEW_PATCHES and slide is not None:  # a small region: offer a finer grid
                st = project.settings
                finer = finer_patch_size(slide, tissue, grid.patch_size, st.get("target_mpp"), float(st["min_tissue"]))
            yield ("grid", sid, grid, tissue, finer)

        self.grid_btn.setEnabled(False)
        self.say("detecting tissue and laying the patch grid...")
        self._grid_task.start(job, f"Tissue and patch grid of {sid}")

    def _on_grid_event(self, item: Any) -> None:
        if not (isinstance(item, tuple) and item and item[0] == "grid"):
            return
        from napari_histo_wsss.core.slides.grid import FEW_PATCHES  # imported by the job already

        _, sid, grid, tissue, finer = item
        if sid != self.session.slide_id:
            return  # the user switched slides meanwhile
        if tissue is not None:
            tf = self.session.overlay_transform(tissue.downsample)
            layer = self.session.replace_layer(
                TISSUE_LAYER, self.viewer.add_labels, data=np.asarray(tissue.mask).astype(np.uint8),
                opacity=0.9, colormap=label_colormap({1: TISSUE_RGBA}), **tf,
            )
            layer.contour = 2  # outline only: the slide stays visible under it
            layer.editable = False
        if len(grid) == 0:
            self.fail(f"no tissue patches found on {sid} (min. tissue {self.min_tissue.value():.2f}); lower 'Min. tissue' and press 'Apply settings', or check the slide")
        else:
            done = f"{len(grid)} tissue patches of {grid.patch_size} px ({grid.size0} px at level 0) on {sid}"
            mpp = self.session.project.settings.get("target_mpp") if self.session.project is not None else None
            slide = self.session.slide
            if mpp and slide is not None and not slide.mpp:
                # the Resolution setting cannot be honoured: say so instead of laying level-0 patches silently
                self.warn(f"{done}: the slide does not state its pixel size, so Resolution {mpp:g} µm/px is "
                          "ignored and patches are read at level 0")
            elif len(grid) < FEW_PATCHES:
                # e.g. the bundled 1.1 x 1.5 mm region with the default 224-px patches: 10 patches
                hint = (f"; {finer[0]}-px patches would give {finer[1]}: set Patch size and press 'Apply settings'"
                        if finer else "; lower 'Patch size' or 'Resolution' and press 'Apply settings'")
                self.warn(f"{done}: few to label several patches per class and keep some to check the model "
                          f"(from {FEW_PATCHES} on){hint}")
            else:
                self.say(done)
        self.session.set_grid(grid)
