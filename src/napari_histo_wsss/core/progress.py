"""Progress events: what every long job of the core yields.

Long work (training, CAMs, pseudo-masks, prediction, export) is a generator of
:class:`ProgressEvent` that polls a ``should_stop`` callable between steps, so that the CLI's
progress bar (``cli/_progress.py::drive``) and the napari background worker
(``widgets/_worker.py``) drive the same code. Jobs whose events carry a payload for the GUI (a
finished tile, a written file) subclass :class:`ProgressEvent` and add fields; the progress bars
only read the fields defined here.

This module imports nothing of the package, so any core module can use it at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from napari_histo_wsss.core.errors import Cancelled

__all__ = ["EVENT_KINDS", "ProgressEvent", "run_to_end"]

#: ``kind`` of an event: ``step`` (one unit of work done), ``epoch``, ``checkpoint``, ``log`` (a
#: message), ``start``, and the last event of a job, ``done`` or ``cancelled``.
EVENT_KINDS = ("start", "step", "epoch", "checkpoint", "done", "cancelled", "log")


@dataclass
class ProgressEvent:
    """One report of a long job. ``epoch`` counts from 1, ``step`` is the step within the epoch
    (or the item, for jobs without epochs), ``eta_s`` the estimated seconds left."""

    kind: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    eta_s: float | None = None
    message: str = ""


def run_to_end(events: Iterator[ProgressEvent]) -> ProgressEvent | None:
    """Consume a generator of progress events and return the last one; a ``cancelled`` end
    raises :class:`~.errors.Cancelled`."""
    last = None
    for ev in events:
        last = ev
    if last is not None and last.kind == "cancelled":
        raise Cancelled(last.message)
    return last
