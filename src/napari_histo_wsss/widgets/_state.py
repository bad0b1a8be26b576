"""The per-viewer session shared by all dock widgets of the plugin.

Each widget is docked on its own (npe2 creates them independently), yet they work on the same
project, slide and patch grid. :meth:`Session.of` returns the one :class:`Session` of a viewer;
widgets read it and listen to its signals instead of talking to each other.

The session holds only references and view geometry: the durable state (classes, slides, labels,
masks, runs) lives in the project folder through :class:`~napari_histo_wsss.core.data.project.Project`.

Geometry. The slide layer shows level-0 pixels with the ``scale``/``translate`` napari got from the
reader (micrometres where the slide's mpp is known). Overlays (patch grid, CAMs, masks) computed at a
downsample ``d`` of level 0 use ``scale = s0 * d`` and a translate that puts the centre of their
pixel ``j`` at the centre of the level-0 block it covers (:meth:`Session.overlay_transform`).
Mouse positions go back with :meth:`Session.world_to_level0`.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Signal

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.widgets._worker import BackgroundTask

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.slides.grid import PatchGrid
    from napari_histo_wsss.core.slides.slide import Slide

log = logging.getLogger(__name__)


class GuiError(HistoWSSSError):
    """A user action cannot proceed (no project, no slide, nothing labelled...): shown, not raised."""


class Session(QObject):
    """Project, slide, patch grid and background jobs of one napari viewer.

    Signals:
        project_changed: a project was opened/created/closed or its classes changed.
        slide_changed: the current slide changed (or was cleared).
        grid_changed: the patch grid of the current slide is ready (or was cleared).
        labels_changed: patch labels were edited (by the labelling widget or an import).
        runs_changed: a training run was created, finished or removed.
        mask_saved(str): a mask of the current slide was written to the project (its name).
    """

    project_changed = Signal()
    slide_changed = Signal()
    grid_changed = Signal()
    labels_changed = Signal()
    runs_changed = Signal()
    mask_saved = Signal(str)

    _sessions: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__()
        self._viewer_ref = weakref.ref(viewer)
        self.project: Project | None = None
        self.slide_id: str | None = None
        self.slide: Slide | None = None
        self.slide_layer_name: str | None = None
        self.grid: PatchGrid | None = None
        self.dataset_dir: str | None = None  # an imported labelled patch folder (training source)
        self.scale0 = np.ones(2)
        self.translate0 = np.zeros(2)
        self.units0: tuple | None = None
        self._tasks: dict[str, BackgroundTask] = {}

    # -- lookup ----------------------------------------------------------------------------------
    @classmethod
    def of(cls, viewer: napari.Viewer) -> Session:
        """The session of ``viewer`` (created on first use)."""
        s = cls._sessions.get(viewer)
        if s is None:
            s = cls(viewer)
            cls._sessions[viewer] = s
        return s

    @property
    def viewer(self) -> napari.Viewer:
        v = self._viewer_ref()
        if v is None:
            raise GuiError("the napari viewer of this panel was closed")
        return v

    # -- project and slide -------------------------------------------------------------------------
    def set_project(self, project: Project | None) -> None:
        """Make ``project`` current; the slide and grid are cleared (they belong to a project)."""
        self.project = project
        self.set_slide(None, None)
        self.project_changed.emit()

    def set_slide(self, slide_id: str | None, slide: Slide | None, layer: Any = None) -> None:
        """Make a slide of the project current; ``layer`` (the napari layer showing it) sets the geometry."""
        if self.slide is not None and self.slide is not slide:
            try:
                self.slide.close()
            except Exception:  # noqa: BLE001 - closing a reader must never break the GUI
                log.debug("closing the previous slide failed", exc_info=True)
        self.slide_id = slide_id
        self.slide = slide
        self.grid = None
        if layer is not None:
            self.slide_layer_name = layer.name
            self.scale0 = np.asarray(layer.scale[-2:], dtype=float)
            self.translate0 = np.asarray(layer.translate[-2:], dtype=float)
            units = getattr(layer, "units", None)
            self.units0 = tuple(units[-2:]) if units is not None else None
        elif slide is None:
            self.slide_layer_name = None
            self.scale0 = np.ones(2)
            self.translate0 = np.zeros(2)
            self.units0 = None
        self.slide_changed.emit()
        self.grid_changed.emit()

    def set_grid(self, grid: PatchGrid | None) -> None:
        self.grid = grid
        self.grid_changed.emit()

    def require_project(self) -> Project:
        if self.project is None:
            raise GuiError("no project open: create or open one in the Project panel first")
        return self.project

    def require_slide(self) -> tuple[str, Slide]:
        self.require_project()
        if self.slide is None or self.slide_id is None:
            raise GuiError("no slide open: open a slide and add it to the project in the Project panel first")
        return self.slide_id, self.slide

    def require_grid(self) -> PatchGrid:
        self.require_slide()
        if self.grid is None:
            raise GuiError("the patch grid of this slide is not ready: press 'Detect tissue and grid' in the Project panel")
        return self.grid

    # -- geometry ----------------------------------------------------------------------------------
    def overlay_transform(self, downsample: float | tuple[float, float], origin: tuple[float, float] = (0.0, 0.0)) -> dict:
        """``scale``/``translate`` for a layer whose pixel (r, c) covers the level-0 box starting at
        ``origin + (c, r) * downsample`` (origin as level-0 (x, y)); ``downsample`` may be (dy, dx).
        The slide layer's units (e.g. micrometres) are passed on so that napari does not mix them."""
        d = np.broadcast_to(np.asarray(downsample, dtype=float), (2,))
        oy_ox = np.array([origin[1], origin[0]], dtype=float)
        scale = self.scale0 * d
        translate = self.translate0 + self.scale0 * (oy_ox + d / 2 - 0.5)
        out: dict[str, Any] = {"scale": tuple(scale), "translate": tuple(translate)}
        if self.units0 is not None:
            out["units"] = self.units0
        return out

    def layer_geometry(self, layer: Any) -> tuple[float, tuple[float, float]]:
        """(level-0 pixels per layer pixel, level-0 (x, y) origin) of a layer placed over the slide
        with :meth:`overlay_transform` (the inverse of it; rows and columns share one downsample)."""
        scale = np.asarray(layer.scale[-2:], dtype=float) / self.scale0
        translate = (np.asarray(layer.translate[-2:], dtype=float) - self.translate0) / self.scale0
        oy_ox = translate - scale / 2 + 0.5
        return float(scale[0]), (float(oy_ox[1]), float(oy_ox[0]))

    def world_to_level0(self, position: Any) -> tuple[float, float]:
        """A world position (napari order, last two axes row/col) -> level-0 (x, y), continuous
        coordinates in which level-0 pixel i spans [i, i + 1)."""
        p = np.asarray(position, dtype=float)[-2:]
        rc = (p - self.translate0) / self.scale0 + 0.5
        return float(rc[1]), float(rc[0])

    # -- layers ------------------------------------------------------------------------------------
    def layer(self, name: str | None) -> Any:
        """The viewer's layer called ``name`` or None (it may have been deleted by the user)."""
        if not name:
            return None
        try:
            return self.viewer.layers[name]
        except (KeyError, ValueError):
            return None

    def replace_layer(self, name: str, add: Any, **kwargs: Any) -> Any:
        """Remove a layer called ``name`` if present, then ``add(name=name, **kwargs)``."""
        old = self.layer(name)
        if old is not None:
            self.viewer.layers.remove(old)
        return add(name=name, **kwargs)

    # -- background jobs ---------------------------------------------------------------------------
    def task(self, key: str, title: str, quiet: bool = False) -> BackgroundTask:
        """The background job slot ``key`` of this viewer (one job per key at a time); ``quiet``
        jobs (short redraws) show no progress bar."""
        t = self._tasks.get(key)
        if t is None:
            t = BackgroundTask(title, parent=self, quiet=quiet)
            self._tasks[key] = t
        return t

    def running_tasks(self) -> list[BackgroundTask]:
        return [t for t in self._tasks.values() if t.running]

    def shutdown(self, timeout_s: float = 60.0, window_alive: bool = True) -> None:
        """Cancel every job and wait for it to save and stop (the viewer is closing). With
        ``window_alive`` False (the window's widgets are being deleted) no widget is touched: the
        jobs are only told to stop and waited for."""
        tasks = self.running_tasks()
        for t in tasks:
            t.cancel(quiet=not window_alive)
        for t in tasks:
            if not t.wait(timeout_s):
                log.warning("%s did not stop within %.0f s", t.title, timeout_s)
            t.detach(close_progress=window_alive)
        if self.slide is not None:
            try:
                self.slide.close()
            except Exception:  # noqa: BLE001
                log.debug("closing the slide failed", exc_info=True)

    def watch_close(self, widget: Any) -> None:
        """Stop the jobs when the viewer's window closes: on the window's Close event, before any
        widget is deleted (:meth:`watch_window`, installed when a panel is first shown), and, as a
        fallback, when ``widget`` (a docked panel) is destroyed (public Qt: the panel's own
        ``destroyed`` signal; the widgets are then being deleted, so none is touched)."""
        ref = weakref.ref(self)

        def on_destroyed(*_: Any) -> None:
            s = ref()
            if s is not None:
                s.shutdown(window_alive=False)

        widget.destroyed.connect(on_destroyed)

    def watch_window(self, window: Any) -> None:
        """Stop the jobs when ``window`` (the top-level window holding the panels) gets its Close
        event: the jobs stop and save while every widget still exists (stopping them while Qt
        deletes the docks crashed the viewer). Public Qt: an event filter on the window."""
        watched = getattr(self, "_watched_window", None)
        if window is None or (watched is not None and watched() is window):
            return
        self._watched_window = weakref.ref(window)  # never keep the window (and the viewer) alive
        self._close_filter = _CloseFilter(self)
        window.installEventFilter(self._close_filter)


class _CloseFilter(QObject):
    """Event filter of the viewer's main window: its Close event stops the session's jobs."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self._session = weakref.ref(session)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Close:
            s = self._session()
            if s is not None and s.running_tasks():
                s.shutdown()
        return False  # the window goes on closing
