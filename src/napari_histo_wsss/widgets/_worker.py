"""Run a core generator of progress events off the GUI thread, with progress, ETA and cancel.

Every long job of the core (training, CAMs, prediction) is a generator of
:class:`~napari_histo_wsss.core.progress.ProgressEvent` that accepts a ``should_stop`` callable and
saves its checkpoint when asked to stop (or when closed). :class:`BackgroundTask` drives such a
generator inside a napari ``GeneratorWorker`` (a thread of Qt's pool) and hands each event to the
GUI thread, where the caller touches layers. It also

* shows a napari progress bar (activity dock) whose description carries the core's ETA and whose
  cancel button cancels the job,
* is cancelled, and waited for, when the viewer's window goes away (:meth:`Session.shutdown`,
  hooked to the panels' ``destroyed`` signal - public Qt, no private napari window API),
* turns every exception of the job into a message (``show_error`` plus the ``failed`` signal),
  never a traceback dialog; unexpected exceptions are logged with their traceback,
* refuses a second start while a job runs (:class:`TaskBusyError`).

Cancellation is cooperative: :meth:`BackgroundTask.cancel` sets a flag the core polls through
``should_stop``; the core then saves its checkpoint, yields a ``"cancelled"`` event and returns.
A core generator that keeps going for more than a few events after the request is closed
(``GeneratorExit`` at its ``yield``), which runs its ``finally`` clauses in the worker thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from napari.qt.threading import GeneratorWorker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from napari_histo_wsss.core.errors import HistoWSSSError

log = logging.getLogger(__name__)

#: A job factory: called in the worker thread with ``should_stop`` and returns the core generator.
JobFactory = Callable[[Callable[[], bool]], Iterator[Any]]

# Events a cancelled core may still yield before honouring ``should_stop`` (it checks between
# steps, so one or two events can already be on their way); after that the generator is closed.
_GRACE_EVENTS = 3


class TaskBusyError(HistoWSSSError):
    """A job of this kind is already running (e.g. Start pressed twice)."""


@dataclass
class _Failure:
    """Sent from the worker thread instead of raising, so Qt never shows a traceback."""

    message: str


class _JobProgress(cancelable_progress):
    """napari progress bar whose activity-dock cancel button cancels the job at once."""

    def __init__(self, on_cancel: Callable[[], None], **kwargs: Any) -> None:
        self._on_cancel = on_cancel
        super().__init__(**kwargs)

    def cancel(self) -> None:
        super().cancel()
        self._on_cancel()


def _drive(factory: JobFactory, stop: threading.Event, done: threading.Event) -> Iterator[Any]:
    """Generator run by the worker thread: yields core events (or one :class:`_Failure`)."""
    gen: Iterator[Any] | None = None
    after_stop = 0
    try:
        from napari_histo_wsss.core.device import apply_thread_policy  # imports torch, so only once a job runs

        apply_thread_policy(gui=True)  # in the thread that runs the job: one core stays with the viewer
        gen = factory(stop.is_set)
        for item in gen:
            yield item
            if stop.is_set():
                after_stop += 1
                if after_stop > _GRACE_EVENTS:
                    break  # the core ignores should_stop: closing it below runs its finally clauses
    except HistoWSSSError as e:
        yield _Failure(str(e))
    except MemoryError:
        yield _Failure("out of memory: try a smaller batch size, patch size or working resolution")
    except Exception as e:  # noqa: BLE001 - any failure of the job becomes a message, not a crash
        log.exception("background job failed")
        yield _Failure(f"unexpected error ({type(e).__name__}): {e}")
    finally:
        if gen is not None and hasattr(gen, "close"):
            try:
                gen.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the background job failed")
        done.set()


class BackgroundTask(QObject):
    """One kind of long job (e.g. "training") of one viewer; at most one runs at a time.

    Signals (all on the GUI thread):
        event(object): each event the core yields.
        finished(str): ``"done"``, ``"cancelled"`` or ``"failed"`` once the job has ended.
        failed(str): the error message when the job failed.
    """

    event = Signal(object)
    finished = Signal(str)
    failed = Signal(str)

    def __init__(self, title: str, parent: QObject | None = None, quiet: bool = False) -> None:
        super().__init__(parent)
        self.title = title
        self.quiet = quiet
        self._worker: GeneratorWorker | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._progress: _JobProgress | None = None
        self._outcome = "done"
        self._queue: collections.deque = collections.deque()
        self._dispatching = False
        self._finish_pending = False
        self.started_at: float | None = None
        self.last_event: Any = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from :meth:`start` until the job's thread has finished."""
        return self._worker is not None

    @property
    def cancel_requested(self) -> bool:
        return self._stop.is_set()

    # -- control -------------------------------------------------------------------------------
    def start(self, factory: JobFactory, description: str = "") -> None:
        """Start ``factory(should_stop)`` in a worker thread; raise :class:`TaskBusyError` if busy."""
        if self.running:
            raise TaskBusyError(f"{self.title} is already running; wait for it or press Cancel first")
        self._stop = threading.Event()
        self._done = threading.Event()
        self._outcome = "done"
        self._queue.clear()
        self._finish_pending = False
        self.last_event = None
        self.started_at = time.monotonic()
        worker = GeneratorWorker(_drive, factory, self._stop, self._done)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        if not self.quiet:
            self._progress = _JobProgress(self.cancel, total=0, desc=description or self.title)
        worker.start()

    def cancel(self, quiet: bool = False) -> None:
        """Ask the job to stop at its next step boundary; the core saves its checkpoint. ``quiet``:
        the progress bar is not touched (its widgets may be being deleted)."""
        if not self.running or self._stop.is_set():
            return
        self._stop.set()
        if self._progress is not None and not quiet:
            self._progress.set_description(f"{self.title}: cancelling...")

    def detach(self, close_progress: bool = True) -> None:
        """Forget a job that has stopped while its window closes: its worker's queued signals are
        no longer delivered here, and its progress bar is closed (``close_progress``, while the
        window still exists) or dropped."""
        worker, self._worker = self._worker, None
        if worker is not None:
            for signal, slot in ((worker.yielded, self._on_yielded), (worker.finished, self._on_finished)):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):  # already disconnected, or the worker is gone
                    pass
        progress, self._progress = self._progress, None
        if progress is not None and close_progress:
            progress.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job's generator has finished (not its Qt signals); True if it did."""
        return self._done.wait(timeout_s)

    # -- worker callbacks (GUI thread) ---------------------------------------------------------
    # Updating napari's progress bar can process pending Qt events, so a queued "finished" (or the
    # next item) may be delivered while an item is still being handled. Items are therefore
    # queued and dispatched in order, and "finished" waits until the queue is empty.
    def _on_yielded(self, item: Any) -> None:
        self._queue.append(item)
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue:
                self._dispatch(self._queue.popleft())
        finally:
            self._dispatching = False
        if self._finish_pending:
            self._finish_pending = False
            self._on_finished()

    def _dispatch(self, item: Any) -> None:
        if isinstance(item, _Failure):
            self._outcome = "failed"
            show_error(f"{self.title} failed: {item.message}")
            self.failed.emit(item.message)
            return
        self.last_event = item
        if getattr(item, "kind", None) == "cancelled":
            self._outcome = "cancelled"
        self.event.emit(item)
        self._update_progress(item)

    def _on_finished(self) -> None:
        if self._dispatching:
            self._finish_pending = True
            return
        if self._outcome == "done" and self._stop.is_set():
            self._outcome = "cancelled"
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._worker = None
        if self._outcome == "cancelled" and not self.quiet:
            show_info(f"{self.title} cancelled" + (f": {self.last_event.message}" if getattr(self.last_event, "message", "") else ""))
        self.finished.emit(self._outcome)

    def _update_progress(self, ev: Any) -> None:
        pbar = self._progress
        if pbar is None:
            return
        total, done = progress_units(ev)
        if total and pbar.total != total:
            pbar.total = total
        if total and done != pbar.n:
            pbar.n = 0
            pbar.update(min(done, total))
        pbar.set_description(describe_event(self.title, ev))


def progress_units(ev: Any) -> tuple[int, int]:
    """(total, done) work units of a progress event: steps over all epochs when known."""
    steps = int(getattr(ev, "steps", 0) or 0)
    epochs = int(getattr(ev, "epochs", 0) or 0)
    step = int(getattr(ev, "step", 0) or 0)
    epoch = int(getattr(ev, "epoch", 0) or 0)
    if steps <= 0:
        return 0, 0
    if epochs <= 0:
        return steps, min(step, steps)
    # epochs are counted from 1 in events; an event of epoch e, step s has done (e-1)*steps + s
    done = max(epoch - 1, 0) * steps + step
    if getattr(ev, "kind", "") in ("epoch", "done"):
        done = max(epoch, 0) * steps
    return epochs * steps, min(done, epochs * steps)


def format_eta(seconds: float | None) -> str:
    """'1h02m', '3m05s', '12s' or '' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def describe_event(title: str, ev: Any) -> str:
    """One line for a progress bar or status label: title, epoch/step, loss and ETA."""
    parts = [title]
    epochs = getattr(ev, "epochs", 0) or 0
    if epochs:
        parts.append(f"epoch {getattr(ev, 'epoch', 0)}/{epochs}")
    steps = getattr(ev, "steps", 0) or 0
    if steps and getattr(ev, "kind", "") == "step":
        parts.append(f"step {getattr(ev, 'step', 0)}/{steps}")
    loss = getattr(ev, "loss", None)
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    eta = format_eta(getattr(ev, "eta_s", None))
    if eta:
        parts.append(f"ETA {eta}")
    msg = getattr(ev, "message", "")
    if msg and getattr(ev, "kind", "") in ("log", "checkpoint", "cancelled", "done", "start", "step"):
        parts.append(msg)
    return " · ".join(parts)
