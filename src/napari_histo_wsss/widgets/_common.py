"""Pieces every dock widget uses: a panel with a status line, and a guard for button slots.

A user action that cannot proceed (no slide open, read-only project folder, Start pressed twice...)
must end as a clear sentence in the panel's status line and a napari notification: never a
traceback dialog, never a frozen viewer. :func:`guarded` wraps slots to guarantee that.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from ..core.errors import HistoWSSSError
from ._state import Session

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

    def fail(self, message: str, notify: bool = True) -> None:
        """Show an error in the status line (red) and as a napari error notification."""
        self.status.setStyleSheet("color: #ff6b6b;")
        self.status.setText(message)
        if notify:
            show_error(message)

    def watch(self, task: Any) -> None:
        """Put a background job's failure in this panel's status line (the job already notified)."""
        task.failed.connect(lambda message: self.fail(f"{task.title} failed: {message}", notify=False))


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
