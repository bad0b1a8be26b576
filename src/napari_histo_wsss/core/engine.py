"""One training skeleton for every training stage.

:func:`run_training` is the loop both stages run (stage one, the CAM classifier of
:mod:`.train`; stage two, the segmenter of :mod:`.train_seg`). It owns everything a training
run does the same way whatever it trains:

* the run folder: ``config.json``, ``classes.json``, ``dataset.json`` (the dataset's
  fingerprint, :mod:`.runs`), ``metrics.jsonl``, ``checkpoints/{last,best}.pt``, all written
  atomically, the folders checked writable before any work, stale temporaries of a killed
  write removed, a failed write (disk full) one line naming the checkpoint to resume from;
* settings checks and resume: the settings validated first (:meth:`~.settings.Settings.validate`),
  a resume needs a run (:func:`~.runs.require_run`) with the same class table, settings (only
  the ``resumable`` ones may change: :meth:`~.settings.Settings.check_resume`) and dataset;
  model, optimiser, gradient scaler, the task's own state, the position, the running loss and
  the global torch RNG restored, so a resumed CPU run computes what the uninterrupted run would;
* data parallelism through :class:`~.distributed.DistContext` (only rank 0 writes; losses,
  NaN checks and stop requests agreed by all ranks);
* the optimiser step: learning rate by :func:`lr_at` (linear warm-up capped at a quarter of the
  run, :func:`warmup_for`, then cosine), mixed precision (:func:`~.device.autocast`, the
  gradient scaler), a non-finite loss stopping the run with the last good checkpoint named;
* cancellation: ``should_stop`` polled before every step and during validation (a stop there
  keeps the epoch's training, records no row without a score and redoes the validation on
  resume); closing the generator checkpoints the position too;
* epoch bookkeeping: the running train loss, one ``metrics.jsonl`` row per validated epoch,
  ``best.pt`` chosen by the task's selection signal.

A stage supplies a :class:`TrainingTask`: its data, model, batches, loss, validation and
selection signal, its rows and records. A new method is a new task, not a new loop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.device import apply_thread_policy, autocast, grad_scaler, seed_everything
from napari_histo_wsss.core.distributed import DistContext
from napari_histo_wsss.core.errors import HistoWSSSError, TrainingError
from napari_histo_wsss.core.io.atomic import remove_temporaries, write_json, write_text
from napari_histo_wsss.core.models import check_classes, load_checkpoint, parameter_groups, save_model
from napari_histo_wsss.core.models.backbones import BACKBONES
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.runs import (
    check_run_place,
    check_same_dataset,
    dataset_fingerprint,
    ensure_run_folders,
    read_metrics,
    record_dataset,
    require_run,
    saving,
    worker_error,
)
from napari_histo_wsss.core.settings import known_backbone, setting

__all__ = ["TrainingTask", "RunContext", "EpochSummary", "run_training", "lr_at", "warmup_for", "build_optimizer",
           "item_seed", "Batches", "make_loader", "common_setting"]


# ---------------------------------------------------------------------------------------------
# settings both stages declare alike
# ---------------------------------------------------------------------------------------------
#: Keyword arguments of :func:`~.settings.setting` for the settings that both training stages
#: have with the same default, rule and help (the stages' config classes declare the others).
#: The section names are those of both classes' ``--help`` and "Advanced" forms.
_COMMON_SETTINGS: dict[str, dict[str, Any]] = {
    "head_lr_mult": dict(default=10.0, range=(0, None), open="lo", group="optimisation", label="Head LR multiplier",
                         help="the new layers learn this many times faster than the backbone"),
    "weight_decay": dict(default=1e-4, range=(0, None), group="optimisation", decimals=6, step=1e-4,
                         help="AdamW weight decay"),
    "warmup_steps": dict(default=20, range=(0, None), group="optimisation",
                         help="steps of linear learning-rate warm-up before the cosine decay"),
    "max_steps_per_epoch": dict(default=None, range=(1, None), none="all", group="optimisation",
                                help="cap the steps of an epoch (default: one pass over the data)"),
    "backbone": dict(default="efficientnet-lite0", choices=BACKBONES, strict=False, check=known_backbone, basic=True,
                     group="training settings", help="efficientnet-lite0/1/2, resnet18/34/50"),
    "weights": dict(default="imagenet", choices=("imagenet", "none"), strict=False, basic=True,
                    group="training settings", browse="PyTorch weights (*.pth *.pt);;All files (*)",
                    help="imagenet, none, or a .pth checkpoint path (e.g. pathology-pretrained)"),
    "device": dict(default="auto", choices=("auto", "cpu", "cuda", "mps"), strict=False, basic=True, resumable=True,
                   group="training settings", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"),
    "seed": dict(default=0, range=(0, 2**32 - 1), basic=True, group="training settings",
                 help="random seed (CPU runs repeat exactly)"),
    "amp": dict(default=True, resumable=True, group="performance", label="Mixed precision on GPUs",
                help="mixed precision on GPUs (off: full precision there too)"),
    "num_workers": dict(default=0, range=(0, None), resumable=True, gui=False, group="performance",
                        help="data-loading worker processes (0 = in the training process)"),
}


def common_setting(name: str) -> Any:
    """A new dataclass field for setting ``name`` as both stages declare it (``device: str =
    common_setting("device")``); each class keeps its own field order."""
    kw = dict(_COMMON_SETTINGS[name])
    return setting(kw.pop("default"), **kw)


# ---------------------------------------------------------------------------------------------
# building blocks shared by the tasks
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at global ``step`` of ``total``: linear warm-up, then cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def warmup_for(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of ``total_steps`` uses: ``warmup_steps``, at most a quarter of the run
    (a short run would otherwise spend all of it warming up and never reach the full rate)."""
    return min(int(warmup_steps), int(total_steps) // 4)


def build_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW with the pretrained backbone at ``cfg.lr`` and the new layers ``head_lr_mult`` faster
    (``cfg``: a TrainConfig or a SegConfig; both have ``lr``, ``head_lr_mult``, ``weight_decay``).
    Each group remembers its base rate in ``"base_lr"`` for :func:`lr_at`."""
    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index`` of ``epoch``: a training item's random augmentation depends on
    ``(seed, epoch, index)`` only, the same in the training process, in any loader worker and
    after a resume."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class Batches:
    """Iterates a DataLoader; an error raised in a worker process comes back as one line
    (:func:`~.runs.worker_error`) instead of torch's message holding the worker's traceback."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (HistoWSSSError, OSError) as e:
                short = worker_error(e)
                if short is None:
                    raise
                raise short from e
            yield batch


def make_loader(dataset: torch.utils.data.Dataset, indices: Sequence[Any] | None = None, batch_size: int = 1,
                num_workers: int = 0, drop_last: bool = False, pin: bool = False,
                batches: Sequence[Sequence[Any]] | None = None) -> Batches:
    """A DataLoader over ``dataset`` in a fixed order: ``indices`` in batches of ``batch_size``,
    or the given ``batches`` (lists of keys). Without workers (``num_workers=0``) the items are
    made in the training process, one batch at a time as the loop asks for it."""
    # A private generator keeps the DataLoader from drawing on the global RNG (drop-connect and
    # stage two's unseeded augmentation use it).
    common = dict(num_workers=num_workers, pin_memory=pin, persistent_workers=False,
                  generator=torch.Generator().manual_seed(0))
    if batches is not None:
        return Batches(torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches], **common))
    return Batches(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=[int(i) for i in (indices if indices is not None else ())], drop_last=drop_last, **common))


# ---------------------------------------------------------------------------------------------
# what a task sees and supplies
# ---------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """The run a task works in: its folder and files, settings, process group and device, what
    the resume found. Built by :func:`run_training`."""

    run: Path
    cfg: Any
    dctx: DistContext
    resume: bool
    should_stop: Callable[[], bool] | None
    notes: list[str] = field(default_factory=list)  # warnings the user must see (panels show them as such)
    info: list[str] = field(default_factory=list)  # what the run does, said once (not a warning)
    resumed: bool = False  # a checkpoint was loaded

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"

    @property
    def last_path(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run / "metrics.jsonl"

    @property
    def device(self) -> torch.device:
        return self.dctx.device

    @property
    def rank(self) -> int:
        return self.dctx.rank

    @property
    def world(self) -> int:
        return self.dctx.world_size

    @property
    def main(self) -> bool:
        return self.dctx.is_main

    @property
    def pin(self) -> bool:
        """Pinned host memory for batches (CUDA only)."""
        return self.device.type == "cuda"

    @property
    def validation_stop(self) -> Callable[[], bool] | None:
        """What validation polls: ``should_stop`` in a single process; None when distributed (every
        rank validates, and ranks must agree on where they stop: at the next step instead)."""
        return self.should_stop if self.world == 1 else None

    def autocast(self) -> ContextManager:
        """Mixed precision for a forward pass, as the run's settings ask (``amp``)."""
        return autocast(self.device, self.cfg.amp)


@dataclass
class EpochSummary:
    """What the skeleton knows at the end of an epoch, for :meth:`TrainingTask.epoch_row`."""

    epoch: int          # counted from 1
    train_loss: float
    val: dict           # the task's validation result ({} without validation data)
    signal: float | None
    improved: bool
    best: float | None
    best_epoch: int
    lr: float
    acc: dict           # running sums: loss, n, data_s, compute_s, samples
    val_s: float        # seconds spent validating
    seconds: float      # seconds since this session of the run started


class TrainingTask:
    """What one training method supplies to :func:`run_training`. Hooks are called in this
    order: :meth:`check_inputs`, :meth:`load`, :meth:`check_resume` (when resuming),
    :meth:`prepare`, :meth:`build_model`, :meth:`setup`, :meth:`load_state` (when resuming),
    :meth:`wrap`, then per epoch :meth:`batches`, :meth:`loss` per step, :meth:`validate`,
    :meth:`signal` and :meth:`epoch_row`.

    After :meth:`load` the task has ``classes`` (the class table trained for), ``spec`` (the
    dataset, fingerprinted in ``dataset.json``) and ``patch_size``; after :meth:`setup`,
    ``steps`` (steps per epoch). ``cfg`` is the run's settings (:meth:`load` may replace it by
    the settings actually used, e.g. a patch size found in the data)."""

    #: what the run is called in messages ("no training run to resume there"), and what a
    #: finished one holds ("already holds a trained run").
    what = "training run"
    trained = "trained run"
    #: the running train loss weighs each step by its items (True) or each step alike (False).
    loss_per_item = True
    #: which way the selection signal improves, and its name in messages.
    higher_is_better = False
    signal_name = "val loss"

    classes: ClassTable
    spec: Any
    patch_size: int
    steps: int

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- before any work ----------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Cheap checks of the inputs, before the run folder is looked at."""

    def load(self, ctx: RunContext) -> None:
        """Read and check the training data; set ``classes``, ``spec`` and ``patch_size``."""
        raise NotImplementedError

    def run_apart_from(self, run: Path) -> tuple[list[Path], list[Path]]:
        """``(inputs, holders)`` for :func:`~.runs.check_run_place` of the run folder ``run``,
        after :meth:`load`: folders it may not be, hold or lie inside, and folders it may lie
        inside but not be or hold. The dataset is an input; a project dataset is a holder (it
        keeps its runs)."""
        root = Path(self.spec.root)
        return ([], [root]) if self.spec.layout == "project" else ([root], [])

    @property
    def classes_source(self) -> str:
        """Where the class table comes from, for the message of a checkpoint with another one."""
        return f"the dataset {self.spec.root}"

    def check_resume(self, saved: dict, where: Path) -> None:
        """Refuse to resume a checkpoint saved with other settings (``saved``: its config): the
        settings' own rule (only those declared resumable may change)."""
        self.cfg.check_resume(saved, where)

    def prepare(self, ctx: RunContext) -> Iterator[ProgressEvent]:
        """Work before the model exists (e.g. making pseudo-masks), after the resume checks; may
        end with a ``cancelled`` event, which ends the run."""
        return iter(())

    # -- model and data -----------------------------------------------------------------------------
    def seed(self, ctx: RunContext) -> int:
        """The seed of the run's global RNGs in this process (ranks draw different dropout masks)."""
        return int(self.cfg.seed) + ctx.rank

    def build_model(self, ctx: RunContext, fresh: bool) -> torch.nn.Module:
        """The model on the run's device; ``fresh`` False when a checkpoint's weights follow."""
        raise NotImplementedError

    def setup(self, ctx: RunContext, model: torch.nn.Module) -> Iterator[ProgressEvent]:
        """Build the data pipelines (and anything the loss needs); set ``steps``. May yield ``log``
        and ``step`` events (shown before ``start``) and end with a ``cancelled`` event, which ends
        the run."""
        return iter(())

    def state_dict(self) -> dict:
        """The task's own state to keep in ``last.pt`` (e.g. a curriculum scheduler)."""
        return {}

    def load_state(self, extra: dict) -> None:
        """Restore :meth:`state_dict` from a checkpoint's ``extra``."""

    def wrap(self, ctx: RunContext, model: torch.nn.Module) -> torch.nn.Module:
        """The module the step calls (DistributedDataParallel when distributed)."""
        return ctx.dctx.wrap_model(model)

    # -- records ------------------------------------------------------------------------------------
    def run_record(self) -> dict:
        """The content of ``config.json``."""
        return self.cfg.to_dict()

    def checkpoint_meta(self) -> dict:
        """Entries of a checkpoint's meta beside classes, config, epoch, patch size and metrics."""
        return {}

    def start_message(self, ctx: RunContext) -> str:
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------------
    def batches(self, ctx: RunContext, epoch: int, first: int) -> Iterable[Any]:
        """The batches of ``epoch`` (0-based) from step ``first`` on (this rank's share)."""
        raise NotImplementedError

    def loss(self, ctx: RunContext, net: torch.nn.Module, batch: Any, epoch: int, step: int) -> tuple[torch.Tensor, int]:
        """The loss of one step and the number of items it saw on this rank."""
        raise NotImplementedError

    def validate(self, ctx: RunContext, model: torch.nn.Module) -> dict | None:
        """Score the model (eval mode) after an epoch: the row entries; ``{}`` without validation
        data; None when :attr:`RunContext.validation_stop` interrupted it."""
        raise NotImplementedError

    def signal(self, val: dict, train_loss: float) -> float | None:
        """The selection signal of an epoch (None: not comparable, best.pt is not updated)."""
        raise NotImplementedError

    def format_signal(self, value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    def epoch_row(self, ctx: RunContext, summary: EpochSummary) -> dict:
        """The epoch's row of ``metrics.jsonl``."""
        raise NotImplementedError

    def done_metrics(self) -> dict:
        """Entries of the ``done`` event's metrics beside ``best`` and ``best_epoch``."""
        return {}


# ---------------------------------------------------------------------------------------------
# the skeleton
# ---------------------------------------------------------------------------------------------
def _new_acc() -> dict:
    return {"loss": 0.0, "n": 0, "data_s": 0.0, "compute_s": 0.0, "samples": 0}


def run_training(task: TrainingTask, cfg: Any, run_dir: str | Path, resume: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[ProgressEvent]:
    """Train ``task`` with settings ``cfg`` into ``run_dir`` (see the module docstring).

    Yields the task's ``log`` events of :meth:`~TrainingTask.prepare` and
    :meth:`~TrainingTask.setup`, then ``start``, ``log`` (notes), ``step`` (every step, with the
    loss, learning rate and ETA), ``epoch`` (with the row written to metrics.jsonl),
    ``checkpoint``, and finally ``done`` or ``cancelled``."""
    cfg.validate()
    task.cfg = cfg
    run = Path(run_dir)
    task.check_inputs()
    if resume:  # a mistyped folder must not start a fresh run
        require_run(run, run / "checkpoints" / "last.pt", task.what)
    dctx = DistContext.from_env(cfg.device).init()
    try:
        yield from _run(task, run, dctx, resume, should_stop)
    finally:
        dctx.shutdown()


def _run(task: TrainingTask, run: Path, dctx: DistContext, resume: bool,
         should_stop: Callable[[], bool] | None) -> Iterator[ProgressEvent]:
    ctx = RunContext(run, task.cfg, dctx, resume, should_stop)
    task.load(ctx)
    cfg = ctx.cfg = task.cfg  # as load() settled it
    check_run_place(run, *task.run_apart_from(run), what=f"{task.what} folder")  # never into its own inputs
    last_path, best_path, metrics_path = ctx.last_path, ctx.best_path, ctx.metrics_path

    # -- resume checks: before any work, so that a bad resume fails in seconds ------------------------
    ckpt = None
    fingerprint = dataset_fingerprint(task.spec)
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        check_classes(ckpt["meta"], task.classes, what=task.classes_source)
        task.check_resume(ckpt["meta"].get("config", {}), last_path)
    elif resume:
        ctx.notes.append(f"{run} has no checkpoint yet: starting from the beginning")
    elif last_path.is_file():
        raise TrainingError(f"{run} already holds a {task.trained} ({last_path}); resume it or choose a new folder")
    if resume:  # the same patches and labels, or metrics.jsonl would mix two datasets
        old_run_note = check_same_dataset(run, task.spec, fingerprint)
        if old_run_note:
            ctx.notes.append(old_run_note)
    if ctx.main:  # a folder that cannot be written fails now, not after an epoch
        ensure_run_folders(run, ctx.checkpoints)
    dctx.local_batch_size(cfg.batch_size)  # refuses a batch that does not split over the ranks
    ctx.resumed = ckpt is not None

    for ev in task.prepare(ctx):
        yield ev
        if ev.kind == "cancelled":
            return

    # -- model, optimiser, data ------------------------------------------------------------------------
    apply_thread_policy()  # CPU threads of this run, set in the thread that trains (GUI: one core left free)
    seed_everything(task.seed(ctx))
    model = task.build_model(ctx, fresh=ckpt is None)
    optimizer = build_optimizer(model, cfg)
    scaler = grad_scaler(ctx.device, cfg.amp)
    for ev in task.setup(ctx, model):
        yield ev
        if ev.kind == "cancelled":
            return
    steps = task.steps
    total_steps = steps * cfg.epochs
    warmup = warmup_for(cfg.warmup_steps, total_steps)

    start_epoch, start_batch, global_step = 0, 0, 0
    best: float | None = None
    best_epoch = 0
    acc = _new_acc()
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        ex = ckpt["extra"]
        optimizer.load_state_dict(ex["optimizer"])
        if ex.get("scaler"):
            scaler.load_state_dict(ex["scaler"])
        task.load_state(ex)
        start_epoch, start_batch, global_step = int(ex["epoch"]), int(ex["batch"]), int(ex["global_step"])
        best, best_epoch = ex.get("best"), int(ex.get("best_epoch", 0))
        if start_batch:  # stopped inside an epoch: its sums so far (at an epoch's end they are the last epoch's)
            acc.update(ex.get("acc", {}))
        torch.set_rng_state(ex["torch_rng"] if ctx.world == 1 else torch.get_rng_state())
        if start_epoch >= cfg.epochs:
            yield ProgressEvent("done", epoch=start_epoch, epochs=cfg.epochs,
                                message=f"{run} already trained for {start_epoch} of {cfg.epochs} epochs; "
                                        "raise epochs to continue")
            return

    if ctx.main:
        remove_temporaries(ctx.checkpoints, ("last.pt", "best.pt"))  # of a checkpoint write a kill cut short
        write_json(run / "config.json", task.run_record())
        write_json(run / "classes.json", task.classes.to_dict())
        record_dataset(run, task.spec, fingerprint)
    history = read_metrics(metrics_path, start_epoch)
    net = task.wrap(ctx, model)
    pos = saved = (start_epoch, start_batch)  # (epoch, steps done in it) now / in last.pt

    def checkpoint(path: Path, epoch_done: int, batch_done: int, metrics: dict | None) -> None:
        meta = {"classes": task.classes, "config": cfg.to_dict(), "epoch": epoch_done, "patch_size": task.patch_size,
                **task.checkpoint_meta(), "metrics": metrics or {}}
        extra = None
        if path == last_path:
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), **task.state_dict(),
                     "epoch": epoch_done, "batch": batch_done, "global_step": global_step,
                     "best": best, "best_epoch": best_epoch, "acc": dict(acc), "torch_rng": torch.get_rng_state(),
                     "world_size": ctx.world}
        with saving(last_path, saved):  # a full disk: one line naming the checkpoint to resume from
            save_model(path, model, meta, extra)

    def eta(done_here: int) -> float:
        return (time.perf_counter() - t_run) / max(done_here, 1) * (total_steps - global_step)

    yield ProgressEvent("start", epoch=start_epoch + 1, epochs=cfg.epochs, step=start_batch, steps=steps,
                        message=task.start_message(ctx))
    for level, notes in (("info", ctx.info), ("warning", ctx.notes)):
        for note in notes:
            yield ProgressEvent("log", epoch=start_epoch + 1, epochs=cfg.epochs, message=note, metrics={"level": level})

    t_run = time.perf_counter()
    steps_here = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch:
                acc = _new_acc()
            model.train()
            batches = iter(task.batches(ctx, epoch, first))
            batch_i = first
            while batch_i < steps:
                if dctx.any(should_stop is not None and should_stop()):
                    if ctx.main:
                        checkpoint(last_path, epoch, batch_i, None)
                    saved = pos
                    yield ProgressEvent("cancelled", epoch=epoch + 1, epochs=cfg.epochs, step=batch_i, steps=steps,
                                        message=f"stopped at epoch {epoch + 1}, step {batch_i}; checkpoint {last_path} "
                                                "(resume to continue)")
                    return
                t_wait = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                t0 = time.perf_counter()
                acc["data_s"] += t0 - t_wait
                factor = lr_at(global_step, total_steps, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                loss, n_items = task.loss(ctx, net, batch, epoch, batch_i)
                value = dctx.all_reduce_mean(float(loss.detach()))
                if not math.isfinite(value):
                    kept = (f"the last good checkpoint {last_path} is kept" if last_path.is_file()
                            else "no checkpoint was written yet")
                    raise TrainingError(f"{run}: the loss became {value} at epoch {epoch + 1}, step {batch_i + 1} "
                                        f"(learning rate {cfg.lr:g}); {kept}. Lower the learning rate or check the data")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                acc["compute_s"] += time.perf_counter() - t0
                weight = n_items if task.loss_per_item else 1
                acc["loss"] += value * weight
                acc["n"] += weight
                acc["samples"] += n_items * ctx.world
                batch_i += 1
                global_step += 1
                steps_here += 1
                pos = (epoch, batch_i)
                yield ProgressEvent("step", epoch=epoch + 1, epochs=cfg.epochs, step=batch_i, steps=steps, loss=value,
                                    eta_s=eta(steps_here), metrics={"lr": cfg.lr * factor})

            # -- end of epoch: validation, selection, metrics, checkpoints ---------------------------
            t_val = time.perf_counter()
            model.eval()
            val = task.validate(ctx, model)
            if val is None:  # stopped during validation: the epoch's training is kept, validation redone on resume
                if ctx.main:
                    checkpoint(last_path, epoch, steps, None)
                saved = pos = (epoch, steps)
                yield ProgressEvent("cancelled", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                    message=f"stopped during validation of epoch {epoch + 1}; checkpoint {last_path} "
                                            "(resume to validate it and continue)")
                return
            train_loss = acc["loss"] / max(acc["n"], 1)
            signal = task.signal(val, train_loss)
            improved = signal is not None and (
                best is None or (signal > best if task.higher_is_better else signal < best))
            if improved:
                best, best_epoch = float(signal), epoch + 1
            row = task.epoch_row(ctx, EpochSummary(
                epoch=epoch + 1, train_loss=train_loss, val=val, signal=signal, improved=improved, best=best,
                best_epoch=best_epoch, lr=optimizer.param_groups[0]["lr"], acc=acc,
                val_s=time.perf_counter() - t_val, seconds=time.perf_counter() - t_run))
            history.append(row)
            if ctx.main:
                with saving(last_path, saved):
                    write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
                if improved:
                    checkpoint(best_path, epoch + 1, 0, row)
                checkpoint(last_path, epoch + 1, 0, row)
            saved = pos = (epoch + 1, 0)
            yield ProgressEvent("epoch", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                loss=train_loss, metrics=row, eta_s=eta(steps_here))
            yield ProgressEvent("checkpoint", epoch=epoch + 1, epochs=cfg.epochs, step=steps, steps=steps,
                                message=f"saved {last_path}" + (f" and {best_path} (best so far)" if improved else ""))
        yield ProgressEvent("done", epoch=cfg.epochs, epochs=cfg.epochs, step=steps, steps=steps,
                            metrics={"best": best, "best_epoch": best_epoch, **task.done_metrics()},
                            message=f"trained {cfg.epochs} epochs; best {task.signal_name} {task.format_signal(best)} "
                                    f"at epoch {best_epoch} -> {best_path}")
    except GeneratorExit:
        # The consumer closed the generator at a yield (e.g. a GUI cancelling hard): keep the position.
        if ctx.main and pos != saved:
            checkpoint(last_path, pos[0], pos[1], None)
        raise
