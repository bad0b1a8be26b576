"""Pieces every dock widget uses: a panel with a status line, and a guard for button slots.

A user action that cannot proceed (no slide open, read-only project folder, Start pressed twice...)
must end as a clear sentence in the panel's status line and a napari notification: never a
traceback dialog, never a frozen viewer. :func:`guarded` wraps slots to guarantee that.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.widgets._state import Session

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Panel(QWidget):
    """Base of the plugin's dock widgets: the viewer, its :class:`Session`, a status line."""

    #: Shown in bold at the top of the panel.
    heading = ""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = Session.of(napari_viewer)
        self.session.watch_close(self)
        self.main_layout = QVBoxLayout(self)
        self.main_layout.setContentsMargins(6, 6, 6, 6)
        if self.heading:
            title = QLabel(f"<b>{self.heading}</b>")
            title.setWordWrap(True)
            self.main_layout.addWidget(title)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setObjectName("status")

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        self.session.watch_window(self.window())  # docked by now: the viewer's main window
        if not getattr(self, "_tabbed", False):
            self._tabbed = True
            from qtpy.QtCore import QTimer

            QTimer.singleShot(0, self._tab_with_other_panels)

    def _tab_with_other_panels(self) -> None:
        """Dock this panel as a tab beside the plugin's other docked panels, as ``histo-wsss gui``
        does, when it was opened on its own from the Plugins menu (napari would stack the docks
        into one very tall column). Public Qt only: the dock and main window holding the panel."""
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QDockWidget, QMainWindow

        dock = self.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        main = dock.parentWidget() if dock is not None else None
        if not isinstance(main, QMainWindow) or dock.isFloating():
            return
        others = [d for d in main.findChildren(QDockWidget) if d is not dock and not d.isFloating()
                  and d.isVisible() and d.findChild(Panel) is not None]
        suffix = " (napari-histo-wsss)"  # napari's dock title; the tab shows just the panel's name
        if dock.windowTitle().endswith(suffix):
            dock.setWindowTitle(dock.windowTitle()[: -len(suffix)])
        if others and not any(d in main.tabifiedDockWidgets(dock) for d in others):
            main.tabifyDockWidget(others[0], dock)
            dock.raise_()
        QTimer.singleShot(0, lambda: _full_tab_names(main))

    def finish_layout(self) -> None:
        """Append the status line and a stretch; call at the end of a subclass's ``__init__``."""
        self.main_layout.addWidget(self.status)
        self.main_layout.addStretch(1)

    def say(self, message: str, notify: bool = False) -> None:
        """Show ``message`` in the status line (and as a napari info notification)."""
        self.status.setStyleSheet("")
        self.status.setText(message)
        if notify:
            show_info(message)

    def warn(self, message: str, notify: bool = True) -> None:
        """Show a warning in the status line (amber) and as a napari warning notification (kept in
        napari's notification list after the status line moves on)."""
        self.status.setStyleSheet("color: #e0a030;")
        self.status.setText(message)
        if notify:
            show_warning(message)

    def fail(self, message: str, notify: bool = True) -> None:
        """Show an error in the status line (red) and as a napari error notification."""
        self.status.setStyleSheet("color: #ff6b6b;")
        self.status.setText(message)
        if notify:
            show_error(message)

    def watch(self, task: Any) -> None:
        """Put a background job's failure in this panel's status line (the job already notified)."""
        task.failed.connect(lambda message: self.fail(f"{task.title} failed: {message}", notify=False))


def _full_tab_names(main: Any) -> None:
    """Tabs of docked panels show their whole names ("Review and correct", not "Rev..."),
    scrolling when they do not fit."""
    from qtpy.QtWidgets import QTabBar

    for bar in main.findChildren(QTabBar):
        if bar.parentWidget() is main:  # the dock areas' tab bars, not tabs inside widgets
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)


def guarded(slot: F) -> F:
    """Wrap a :class:`Panel` slot: user errors and bugs become a status message + notification."""

    @functools.wraps(slot)
    def wrapper(self: Panel, *args: Any, **kwargs: Any) -> Any:
        try:
            return slot(self, *args, **kwargs)
        except HistoWSSSError as e:
            self.fail(str(e))
        except MemoryError:
            self.fail("out of memory: try a smaller working resolution or batch size")
        except Exception as e:  # noqa: BLE001 - the viewer must survive a bug in a slot
            log.exception("%s failed", slot.__name__)
            self.fail(f"unexpected error ({type(e).__name__}): {e}")
        return None

    return wrapper  # type: ignore[return-value]


def compact(combo: Any, chars: int = 14) -> Any:
    """Let a combo box with long entries (run names, paths) shrink instead of widening the dock."""
    from qtpy.QtWidgets import QComboBox

    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def clear_layout(layout: Any) -> None:
    """Remove and delete every widget of a layout (legends and tables rebuilt for a new project)."""
    while layout.count():
        w = layout.takeAt(0).widget()
        if w is not None:
            w.hide()
            w.setParent(None)
            w.deleteLater()


def same_layer(a: Any, b: Any) -> bool:
    """Whether two references name the same napari layer. Plugin widgets see layers through
    napari's public-API proxies, and two proxies of one layer are different objects."""
    if a is None or b is None:
        return False
    return getattr(a, "__wrapped__", a) is getattr(b, "__wrapped__", b)


def form_group(title: str) -> tuple[QGroupBox, QFormLayout]:
    """A titled group box with a form layout (label: field rows)."""
    box = QGroupBox(title)
    form = QFormLayout(box)
    form.setContentsMargins(6, 6, 6, 6)
    return box, form


def label_colormap(color_dict: dict) -> Any:
    """A napari DirectLabelColormap from ``{value: RGBA in 0..1}`` (e.g. ClassTable.label_colormap()).
    Values missing from the dict are transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    d = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    d.update(color_dict)
    return DirectLabelColormap(color_dict=d)


def color_swatch(rgb: tuple[int, int, int], size: int = 14) -> QLabel:
    """A small square in a class colour, for legends and tables."""
    sw = QLabel()
    sw.setFixedSize(size, size)
    sw.setStyleSheet(f"background-color: rgb({rgb[0]},{rgb[1]},{rgb[2]}); border: 1px solid #222;")
    return sw


# ---------------------------------------------------------------------------------------------
# settings forms
# ---------------------------------------------------------------------------------------------
_INT_MAX = 2**31 - 1  # QSpinBox holds a C int
_OPEN_INT_MAX = 10**6  # widget bound of a whole-number field the core leaves open (keeps the dock narrow)
_OPEN_FLOAT_MAX = 1000.0  # the same for numbers
ADVANCED_MAX_HEIGHT = 360  # px: the "Advanced settings" box scrolls beyond this


class SettingsForm(QWidget):
    """The form of a settings class (:mod:`..core.settings`), generated from its fields'
    metadata: one widget per field with ``gui=True``, its default, limits and choices from the
    declaration and its help as tooltip. ``basic`` fields fill the main group box; the others
    sit under a collapsed "Advanced settings" section, by section (``group``), so a panel is
    not a wall of thirty fields.

    Why not magicgui (a napari dependency): with napari 0.9 / magicgui 0.10 under PyQt6,
    ``create_widget`` rounds a float default of 3e-4 to 0.0 (two decimals unless a step is
    given), shows an ``int | None`` default of None as the minimum (it has no "automatic"
    state), offers no editable choice list (``weights``: "imagenet", "none" or a file path;
    ``device``: also ``cuda:1``) and has no widget for ``tuple[float, ...]`` or
    ``tuple[int, ...] | None``. Plain Qt widgets handle each case in a few lines: number
    fields with the field's decimals, an "auto"/"all" special value for None, editable combo
    boxes, and comma-separated text for lists parsed by the core's
    :func:`~..core.settings.parse_value` (the command line's parser).

    ``widgets[name]`` is the field's editor (QSpinBox, QDoubleSpinBox, QComboBox, QCheckBox or
    QLineEdit); :meth:`values` reads them.
    """

    def __init__(self, config_class: Any, title: str = "Settings", skip: Any = (), parent: QWidget | None = None):
        from qtpy.QtWidgets import QFrame, QScrollArea, QToolButton

        super().__init__(parent)
        self.config_class = config_class
        self.widgets: dict[str, QWidget] = {}
        self._get: dict[str, Callable[[], Any]] = {}
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.box, self.form = form_group(title)
        layout.addWidget(self.box)
        self.advanced_button = QToolButton()
        self.advanced_button.setText("Advanced settings")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_button.setAutoRaise(True)
        self.advanced_button.toggled.connect(self.show_advanced)
        # the advanced fields scroll inside a box of bounded height: opened, the panel stays usable
        # on a laptop screen (napari does not scroll a dock widget)
        inner = QWidget()
        self.advanced_form = QFormLayout(inner)
        # no left margin: the advanced rows span the main form, so their labels start where its labels do
        self.advanced_form.setContentsMargins(0, 0, 6, 6)
        self.advanced = QScrollArea()
        self.advanced.setWidget(inner)
        self.advanced.setWidgetResizable(True)
        self.advanced.setFrameShape(QFrame.Shape.NoFrame)
        self.advanced.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.advanced.setMaximumHeight(ADVANCED_MAX_HEIGHT)
        self.advanced.setVisible(False)

        kinds = config_class.kinds()
        sections: dict[str, list] = {}
        for f in config_class.settings_fields():
            info = f.metadata["setting"]
            if not info.gui or f.name in skip:
                continue
            if info.basic:
                self._add_row(self.form, f, kinds[f.name])
            else:
                sections.setdefault(info.group, []).append(f)
        for group, fields in sections.items():
            if group:
                heading = QLabel(f"<i>{group[:1].upper() + group[1:]}</i>")
                self.advanced_form.addRow(heading)
            for f in fields:
                self._add_row(self.advanced_form, f, kinds[f.name])
        if sections:
            self.form.addRow(self.advanced_button)
            self.form.addRow(self.advanced)
        else:
            self.advanced_button.hide()
        self._align_labels()

    def labels(self) -> list[QLabel]:
        """The row labels of the main and the advanced form, top to bottom."""
        role = QFormLayout.ItemRole.LabelRole
        items = [form.itemAt(row, role) for form in (self.form, self.advanced_form) for row in range(form.rowCount())]
        return [item.widget() for item in items if item is not None and isinstance(item.widget(), QLabel)]

    def _align_labels(self) -> None:
        """One label column for both forms: the advanced rows are a second QFormLayout (inside a
        scroll area), which would size its label column on its own labels; every label gets the
        widest one's width. Done again when the form is shown and when its style or font changes
        (napari's stylesheet, applied when the panel is docked, changes the labels' widths)."""
        labels = self.labels()
        if labels:
            width = max(label.sizeHint().width() for label in labels)
            for label in labels:
                label.setMinimumWidth(width)

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self._align_labels()
        super().showEvent(event)

    def changeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        from qtpy.QtCore import QEvent

        if event.type() in (QEvent.Type.StyleChange, QEvent.Type.FontChange):
            self._align_labels()
        super().changeEvent(event)

    def show_advanced(self, shown: bool) -> None:
        """Open or close the "Advanced settings" section."""
        self.advanced.setVisible(shown)
        self.advanced_button.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        if self.advanced_button.isChecked() != shown:
            self.advanced_button.setChecked(shown)

    def _add_row(self, form: QFormLayout, f: Any, kind: Any) -> None:
        info = f.metadata["setting"]
        editor, get, put, row = _editor(f.name, kind, info, f.default)
        editor.setToolTip(info.help)
        put(f.default)
        if get() != f.default:  # a widget that cannot hold the declared default would be a silent drift
            raise RuntimeError(f"the form field {f.name} shows {get()!r}, not the default {f.default!r}")
        if isinstance(editor, QCheckBox):
            form.addRow(row)
        else:
            form.addRow(info.gui_label(f.name), row)
        self.widgets[f.name], self._get[f.name] = editor, get

    def values(self) -> dict[str, Any]:
        """The fields' values (a list field that does not parse is an error naming it)."""
        return {name: get() for name, get in self._get.items()}


def _editor(name: str, kind: Any, info: Any, default: Any
            ) -> tuple[QWidget, Callable[[], Any], Callable[[Any], None], Any]:
    """(editor, read, write, what the form row holds) for one settings field; an emptied text
    field reads as the ``default``."""
    from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QHBoxLayout, QLineEdit, QPushButton, QSpinBox

    from napari_histo_wsss.core.settings import format_value, parse_value

    if kind.base is bool or info.toggle is not None:  # a check box (a toggle sets a preset value)
        box = QCheckBox(info.gui_label(name))
        if info.toggle is None:
            return box, box.isChecked, lambda v: box.setChecked(bool(v)), box
        on, off = info.toggle, default
        return box, (lambda: on if box.isChecked() else off), (lambda v: box.setChecked(bool(v) and v != off)), box

    if info.choices:  # a list: fixed choices, or offered ones that other values may join (editable)
        combo = QComboBox()
        # an optional single choice offers None first, under the field's word for it ("as trained")
        none_word = info.none or "none" if kind.optional and kind.base is not tuple else None
        combo.addItems(([none_word] if none_word else []) + [format_value(c) for c in info.choices])
        combo.setEditable(not info.strict)
        convert = kind.base if kind.base in (int, float) else str

        def get_choice() -> Any:
            text = combo.currentText().strip()
            if none_word is not None and text == none_word:
                return None
            return convert(text) if text else default

        def put_choice(v: Any) -> None:
            combo.setCurrentText(none_word if v is None and none_word else format_value(v))

        row: Any = combo
        if info.browse:
            button = QPushButton("...")
            button.setMaximumWidth(30)
            button.setToolTip("choose a file")
            button.clicked.connect(lambda: _browse_into(combo, info.gui_label(name), info.browse))
            row = QHBoxLayout()
            row.addWidget(combo, 1)
            row.addWidget(button)
        return combo, get_choice, put_choice, row

    if kind.base is int:
        spin = QSpinBox()
        lo, hi = info.range or (None, None)
        lo = 0 if lo is None else int(lo) + (1 if info.open in ("lo", "both") else 0)
        hi = _OPEN_INT_MAX if hi is None else min(int(hi) - (1 if info.open in ("hi", "both") else 0), _INT_MAX)
        if kind.optional:  # the value below the range stands for None ("auto", "all")
            lo -= 1
            spin.setSpecialValueText(info.none or "none")
        spin.setRange(lo, hi)
        if info.step:
            spin.setSingleStep(int(info.step))

        def get_int() -> Any:
            v = spin.value()
            return None if kind.optional and v == spin.minimum() else v

        return spin, get_int, lambda v: spin.setValue(spin.minimum() if v is None else int(v)), spin

    if kind.base is float:
        spin = QDoubleSpinBox()
        decimals = info.decimals if info.decimals is not None else 3
        spin.setDecimals(decimals)
        eps = 10.0 ** -decimals
        lo, hi = info.range or (None, None)
        lo = -_OPEN_FLOAT_MAX if lo is None else lo + (eps if info.open in ("lo", "both") else 0.0)
        hi = _OPEN_FLOAT_MAX if hi is None else hi - (eps if info.open in ("hi", "both") else 0.0)
        spin.setRange(lo, hi)
        spin.setSingleStep(info.step or (0.1 if hi - lo <= 10 else 1.0))
        return spin, lambda: round(spin.value(), decimals), lambda v: spin.setValue(float(v)), spin

    # text: a list of values, comma-separated (parsed like the command line), or a free string
    edit = QLineEdit()
    if info.none:
        edit.setPlaceholderText(info.none)

    def get_text() -> Any:
        if kind.base is str:
            return edit.text().strip() or default
        try:
            return parse_value(edit.text(), kind, info)
        except ValueError as e:
            from napari_histo_wsss.widgets._state import GuiError

            raise GuiError(f"{info.gui_label(name)}: {e}") from None

    return edit, get_text, lambda v: edit.setText(format_value(v)), edit


def _browse_into(combo: Any, title: str, file_filter: str) -> None:
    from qtpy.QtWidgets import QFileDialog

    path, _f = QFileDialog.getOpenFileName(combo, title, "", file_filter)
    if path:
        combo.setCurrentText(path)
