"""Progress bars and Ctrl-C handling shared by the long-running commands.

:func:`drive` shows a core generator of progress events on a tqdm bar; :class:`StopOnSigint`
turns the first Ctrl-C into a stop request the core polls between steps (it then checkpoints),
and a second one into an immediate abort.
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Any, Callable, Iterator

from tqdm import tqdm

__all__ = ["StopOnSigint", "drive", "is_main_process"]


def is_main_process() -> bool:
    """False in the ranks > 0 of a ``torchrun`` job (``RANK`` set by torchrun), True otherwise."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


class StopOnSigint:
    """Context manager: the first Ctrl-C sets a flag polled by the core, a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after the current step (Ctrl-C again to abort)...")

    def __enter__(self) -> StopOnSigint:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


def drive(events: Iterator[Any], bar_desc: str, on_event: Callable[[Any, tqdm], None] | None = None) -> Any:
    """Show a generator of ProgressEvents on a tqdm bar; return the last event. The bar opens
    with the first event, so errors found before any work are printed alone. In a ``torchrun``
    job only rank 0 shows anything (the other ranks run the same loop silently)."""
    if not is_main_process():
        last = None
        for last in events:  # noqa: B007 - runs the job to its end, keeping its last event
            pass
        return last
    first = next(events, None)
    if first is None:
        return None
    last = None
    with tqdm(total=None, desc=bar_desc, unit="step", dynamic_ncols=True) as bar:
        for ev in itertools.chain([first], events):
            last = ev
            if ev.steps:
                total = ev.steps * (ev.epochs or 1)
                done = max(ev.epoch - 1, 0) * ev.steps + ev.step if ev.epochs else ev.step
                if ev.kind in ("epoch", "done"):
                    done = ev.epoch * ev.steps if ev.epochs else ev.steps
                if total != bar.total or done < bar.n:
                    bar.reset(total=total)  # a new phase of the job: its own rate and time left
                bar.n = min(done, total)
            post = {}
            if ev.epochs:
                post["epoch"] = f"{ev.epoch}/{ev.epochs}"
            if ev.loss is not None:
                post["loss"] = f"{ev.loss:.4f}"
            if ev.eta_s is not None:  # the job's own estimate
                post["eta"] = f"{ev.eta_s:.0f}s"
            bar.set_postfix(post, refresh=False)
            bar.set_description(f"{bar_desc} · {ev.message}" if ev.kind == "step" and ev.message else bar_desc,
                                refresh=False)
            bar.refresh()
            if on_event is not None:
                on_event(ev, bar)
            elif ev.kind in ("log", "start", "cancelled") and ev.message:
                tqdm.write(ev.message)
    return last
