"""SegMix: tile-grid shuffle across a batch with soft multi-hot targets, and its feedback curriculum.

The shuffle (:func:`segmix_batch`) cuts every image of a batch into the same grid of square tiles
(side ``tile`` pixels, a multiple of the backbone's feature stride so that tile borders fall on
feature-map cell borders). A share ``share`` of the grid positions is *swapped*: at each swapped
position every image receives the tile of another image of the batch (an independent random
derangement per position), the other positions stay as they are. A tile therefore keeps its place
but moves to another image, so the classifier sees local tissue out of its usual context and
cannot rely on the global layout of a patch.

Targets. The label of a mixed image is the *area-weighted mix* of its sources' multi-hot labels:
``t_b = sum_s M[b, s] * y_s`` where ``M[b, s]`` is the share of image ``b``'s area that came from
source ``s``. ``M`` is doubly stochastic (rows: every pixel has one source; columns: every tile
of every source lands somewhere), so the label mass of the batch is conserved:
``sum_b t_b == sum_b y_b``. We keep the soft targets and do *not* clip them up to 1 by default
(``targets="area"``): a class that covers a quarter of the mixed image asks for a quarter of the
evidence, which matches what GAP over the class activation map measures and keeps the CAM
calibrated to area. ``targets="union"`` (element-wise max over the sources present, i.e. clipped
to 1) is the alternative for callers who prefer hard multi-hot labels; it over-claims classes
whose tissue happened to stay in the unswapped tiles of the source, so it is not the default.

The curriculum (:class:`SegMixScheduler`): after ``warmup_epochs`` unshuffled epochs the shuffle
starts coarse (large tiles, small swapped share) and moves down a ladder of (tile, share) levels.

* ``schedule="time"`` (default): the rung follows elapsed training, as in the CellMix lineage (the
  group's earlier public work), so that the last shuffled epochs reach the finest rung; feedback
  adjusts it: an epoch whose feedback beats the threshold moves one rung further ahead (and
  tightens the threshold by ``decay``), an epoch whose feedback is worse than the previous one's
  holds the rung for one epoch.
* ``schedule="feedback"``: the rung moves only when the feedback beats the threshold (each advance
  tightens it by ``decay``, CellMix: 0.93). In short runs the feedback rarely beats it, so the
  shuffle stays on its coarsest rung (measured: docs/benchmarks/stage1.md).

Feedback is a validation loss (lower is better, ``mode="min"``) or a validation pseudo-mask mIoU
(higher is better, ``mode="max"``; the scheduler then works on the error ``1 - mIoU``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

TargetMode = Literal["area", "union"]


def segmix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    tile: int,
    share: float,
    generator: torch.Generator | None = None,
    target_mode: TargetMode = "area",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle tiles across a batch.

    Args:
        images: ``(B, 3, H, W)`` batch (any dtype). ``H`` and ``W`` need not be multiples of
            ``tile``: the last row/column of tiles is then narrower, and since tiles keep their
            grid position, only tiles of equal size are ever exchanged.
        targets: ``(B, C)`` multi-hot (or already soft) labels of the images.
        tile: tile side in pixels (>= 1).
        share: fraction of grid positions to swap, in ``[0, 1]`` (rounded to whole positions).
        generator: torch random generator (CPU) that makes the shuffle reproducible.
        target_mode: ``"area"`` (area-weighted soft targets, default) or ``"union"`` (max over
            the sources, hard); see the module docstring.

    Returns:
        ``(mixed, new_targets, mixing)`` where ``mixing`` is the ``(B, B)`` matrix whose entry
        ``[b, s]`` is the share of image ``b``'s area taken from image ``s`` (identity when
        nothing was swapped). ``new_targets = mixing @ targets`` for ``"area"``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be (B, C) with B = {images.shape[0]}, got {tuple(targets.shape)}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share}")
    if target_mode not in ("area", "union"):
        raise ValueError(f"target_mode must be 'area' or 'union', got {target_mode!r}")

    b, _, h, w = images.shape
    gh, gw = math.ceil(h / tile), math.ceil(w / tile)
    n_pos = gh * gw
    n_swap = int(round(share * n_pos))
    mixing = torch.eye(b, dtype=torch.float64)
    if b < 2 or n_swap == 0:
        return images, targets.clone(), mixing.to(targets.dtype)

    positions = torch.randperm(n_pos, generator=generator)[:n_swap]
    mixed = images.clone()
    rows = torch.arange(b)
    for p in positions.tolist():
        y0, x0 = (p // gw) * tile, (p % gw) * tile
        y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
        source = _random_derangement(b, generator)
        mixed[:, :, y0:y1, x0:x1] = images[source, :, y0:y1, x0:x1]
        frac = (y1 - y0) * (x1 - x0) / (h * w)
        mixing[rows, rows] -= frac
        mixing[rows, source] += frac
    mixing = mixing.clamp_min(0.0).to(targets.dtype)
    if target_mode == "area":
        new_targets = mixing @ targets
    else:
        present = (mixing > 0).to(targets.dtype)
        new_targets = (present.unsqueeze(-1) * targets.unsqueeze(0)).amax(dim=1)
    return mixed, new_targets, mixing


def _random_derangement(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation without fixed points: a random cyclic order ``o`` mapped to its
    successor, so image ``o[i]`` receives from ``o[i+1]`` (every image gets another's tile)."""
    order = torch.randperm(n, generator=generator)
    source = torch.empty(n, dtype=torch.long)
    source[order] = order.roll(-1)
    return source


def default_tiles(patch_size: int, stride: int = 16) -> tuple[int, ...]:
    """Tile sizes from coarse to fine for a patch size: about 1/2, 1/4 and 1/7 of the side
    (112 -> 56 -> 32 for 224 px in CellMix/PistoSeg terms), each rounded to a multiple of the
    feature ``stride`` and at least one stride; duplicates removed."""
    tiles: list[int] = []
    for frac in (1 / 2, 1 / 4, 1 / 7):
        t = max(stride, int(round(patch_size * frac / stride)) * stride)
        if t < patch_size and t not in tiles:
            tiles.append(t)
    return tuple(tiles) or (stride,)


@dataclass(frozen=True)
class SegMixLevel:
    """One rung of the curriculum: tile side in pixels and share of swapped positions."""

    tile: int
    share: float


class SegMixScheduler:
    """Feedback curriculum of the shuffle (see the module docstring).

    ``level`` 0 means warm-up (no shuffle); levels ``1..len(ladder)`` index the ladder, built
    tile-major from coarse to fine: for each tile size (coarse first) every share (low first).
    Call :meth:`step` once at the end of each epoch with that epoch's feedback value; read
    :meth:`current` before an epoch to know how to shuffle it.
    """

    def __init__(
        self,
        tiles: Sequence[int],
        shares: Sequence[float] = (0.25, 0.5),
        warmup_epochs: int = 1,
        decay: float = 0.93,
        mode: Literal["min", "max"] = "min",
        schedule: Literal["time", "feedback"] = "feedback",
        total_epochs: int | None = None,
    ) -> None:
        if not tiles:
            raise ValueError("SegMix needs at least one tile size")
        if any(t < 1 for t in tiles):
            raise ValueError(f"tile sizes must be positive, got {list(tiles)}")
        if not shares or any(not 0.0 < s <= 1.0 for s in shares):
            raise ValueError(f"swapped shares must be within (0, 1], got {list(shares)}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"threshold decay must be within (0, 1], got {decay}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if schedule not in ("time", "feedback"):
            raise ValueError(f"schedule must be 'time' or 'feedback', got {schedule!r}")
        if schedule == "time" and (total_epochs is None or int(total_epochs) < 1):
            raise ValueError(f"a time schedule needs the run's number of epochs, got {total_epochs!r}")
        self.ladder: tuple[SegMixLevel, ...] = tuple(
            SegMixLevel(int(t), float(s)) for t in sorted(tiles, reverse=True) for s in sorted(shares)
        )
        self.warmup_epochs = max(0, int(warmup_epochs))
        self.decay = float(decay)
        self.mode = mode
        self.schedule = schedule
        self.total_epochs = None if total_epochs is None else int(total_epochs)
        self.level = 0 if self.warmup_epochs > 0 else 1
        self.threshold: float | None = None
        self.feedback: float | None = None
        self.last_error: float | None = None
        self.epochs_seen = 0

    def current(self) -> SegMixLevel | None:
        """The (tile, share) to use for the next epoch, or ``None`` while warming up."""
        return None if self.level == 0 else self.ladder[self.level - 1]

    def _error(self, value: float) -> float:
        return value if self.mode == "min" else 1.0 - value

    def step(self, feedback: float) -> bool:
        """Feed one epoch's feedback value; return True when the shuffle moved one level finer.

        The first value after warm-up (or the first value at all without warm-up) sets the
        threshold to ``decay`` times its error, so the next advance needs a real improvement.
        """
        self.epochs_seen += 1
        self.feedback = float(feedback)
        if self.schedule == "time":
            return self._step_time()
        if not math.isfinite(self.feedback):
            return False
        err = self._error(self.feedback)
        if self.level == 0:
            if self.epochs_seen >= self.warmup_epochs:
                self.level = 1
                self.threshold = err * self.decay
                return True
            return False
        if self.threshold is None:
            self.threshold = err * self.decay
            return False
        if err < self.threshold:
            self.threshold *= self.decay
            if self.level < len(self.ladder):
                self.level += 1
                return True
        return False

    def due_level(self) -> int:
        """The rung elapsed training asks for before the next epoch (time schedule): 0 during the
        warm-up, then 1 rising evenly to the finest rung for the last shuffled epoch."""
        shuffled = self.epochs_seen - self.warmup_epochs  # shuffled epochs done = index of the next one
        if shuffled < 0:
            return 0
        span = max(1, int(self.total_epochs or 1) - self.warmup_epochs - 1)  # shuffled epochs after the first
        return min(len(self.ladder), 1 + -(-shuffled * (len(self.ladder) - 1) // span))

    def _step_time(self) -> bool:
        before = self.level
        due = self.due_level()
        err = self._error(self.feedback) if math.isfinite(self.feedback) else None
        if before == 0:
            self.level = due
            if err is not None and due > 0:
                self.threshold = err * self.decay
        elif err is not None and self.last_error is not None and err > self.last_error:
            self.level = before  # worse than the epoch before: hold this rung one more epoch
        else:
            self.level = max(before, due)
            if err is not None and self.threshold is not None and err < self.threshold:
                self.threshold *= self.decay
                self.level = min(len(self.ladder), self.level + 1)  # learning well: one rung ahead
            elif err is not None and self.threshold is None:
                self.threshold = err * self.decay
        if err is not None:
            self.last_error = err
        return self.level > before

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (saved in checkpoints and logged per epoch). ``threshold`` is
        reported in feedback units (a loss, or an mIoU for ``mode="max"``)."""
        cur = self.current()
        thr = None if self.threshold is None else (self.threshold if self.mode == "min" else 1.0 - self.threshold)
        return {
            "level": self.level,
            "levels": len(self.ladder),
            "tile": cur.tile if cur else None,
            "share": cur.share if cur else 0.0,
            "threshold": thr,
            "feedback": self.feedback,
            "mode": self.mode,
            "epochs_seen": self.epochs_seen,
            "ladder": [[lv.tile, lv.share] for lv in self.ladder],
            "warmup_epochs": self.warmup_epochs,
            "decay": self.decay,
            "schedule": self.schedule,
            "last_error": self.last_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the ladder must match this scheduler's."""
        ladder = [[int(t), float(s)] for t, s in state["ladder"]]
        if ladder != [[lv.tile, lv.share] for lv in self.ladder]:
            raise ValueError(f"saved SegMix ladder {ladder} differs from the configured one")
        self.level = int(state["level"])
        self.epochs_seen = int(state["epochs_seen"])
        self.feedback = state["feedback"]
        thr = state["threshold"]
        self.threshold = None if thr is None else (float(thr) if self.mode == "min" else 1.0 - float(thr))
        # a run keeps the curriculum it started with (checkpoints from before the time schedule: feedback)
        self.schedule = state.get("schedule", "feedback")
        last = state.get("last_error")
        self.last_error = None if last is None else float(last)
