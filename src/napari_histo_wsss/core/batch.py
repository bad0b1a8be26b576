"""Whole-slide prediction for many slides, scheduled with Dask ``distributed``.

:func:`predict_many` turns a list of slides into one Dask task per slide. Each task runs the
ordinary single-slide engine (:func:`~.infer.predict_slide` with the stage-two segmenter of a
run folder) on whatever worker the scheduler picks and writes straight into that slide's
OME-Zarr output ``<out>/<slide name>.ome.zarr``; nothing but a small :class:`SlideResult`
travels back. The cluster is a ``LocalCluster`` on this machine by default (worker processes,
so a crash in a slide decoder costs one worker, not the run) or any running scheduler
(``scheduler="tcp://host:8786"``: an HPC or cloud cluster whose workers see the same files).

Failures are never silent: a task that raises is retried by Dask (``retries``; a worker that
dies is rescheduled by the scheduler) and a slide that still fails is reported with its error in
the results, which the CLI prints as a table and turns into a non-zero exit status.

Resume: an output that is complete (``complete: true``, written last by predict_slide) for the
same slide, model and settings is skipped; an incomplete one (interrupted, crashed, full disk)
is predicted again from scratch; a complete output made from another slide, model or settings
is refused unless ``overwrite`` is set, so a rerun never passes off a stale result.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import HistoWSSSError

__all__ = [
    "PredictSettings",
    "SlideJob",
    "SlideResult",
    "output_path",
    "plan_jobs",
    "predict_one",
    "predict_many",
]

@dataclass(frozen=True)
class PredictSettings:
    """How each slide is predicted (sent to every task, so plain values only).

    ``tile``/``overlap``/``batch_size``/``tta`` as in :func:`~.infer.predict_slide`;
    ``target_mpp`` (microns per pixel the model works at) or ``downsample`` (level-0 pixels
    per working pixel; neither: level 0); ``which`` checkpoint of the run; ``gate``: switch off
    classes the stage-one classifier finds absent; ``device`` per worker (``auto``: a worker
    of a multi-GPU node takes GPU ``worker index % GPUs``); ``torch_threads``: intra-op
    threads per task (None: the worker's default); ``overwrite``: recompute complete outputs.
    """

    tile: int = 512
    overlap: int = 64
    batch_size: int = 8
    target_mpp: float | None = None
    downsample: float | None = None
    tta: bool = False
    which: str = "best"
    gate: bool = False
    device: str = "auto"
    torch_threads: int | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class SlideJob:
    """One slide and the OME-Zarr it is predicted into."""

    slide: Path
    out: Path


@dataclass
class SlideResult:
    """What happened to one slide: ``status`` is ``done``, ``skipped`` (a complete output was
    already there) or ``failed`` (``error`` says why, after all retries)."""

    slide: Path
    out: Path
    status: str
    seconds: float = 0.0
    tiles: int | None = None
    worker: str | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slide"], d["out"] = str(self.slide), str(self.out)
        return d


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------
def output_path(slide: str | Path, out_dir: str | Path) -> Path:
    """``<out_dir>/<slide name>.ome.zarr`` (``x.ome.tiff`` -> ``x.ome.zarr``, ``x.svs`` ->
    ``x.ome.zarr``)."""
    name = Path(slide).name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    return Path(out_dir) / f"{name}.ome.zarr"


def plan_jobs(slides: Iterable[str | Path], out_dir: str | Path) -> list[SlideJob]:
    """One job per distinct slide (absolute paths, first occurrence kept). Two different slides
    that would share an output name are an error naming both, never a silent overwrite."""
    jobs: list[SlideJob] = []
    seen: dict[Path, Path] = {}
    done: set[Path] = set()
    for s in slides:
        slide = Path(s).expanduser().absolute()
        if slide in done:
            continue
        out = output_path(slide, Path(out_dir).expanduser().absolute())
        if out in seen:
            raise HistoWSSSError(f"{slide} and {seen[out]} would both be written to {out}; "
                                 "rename one of them or predict them into different output folders")
        seen[out] = slide
        done.add(slide)
        jobs.append(SlideJob(slide, out))
    if not jobs:
        raise HistoWSSSError("no slides to predict")
    return jobs


# ---------------------------------------------------------------------------------------------
# the task: one slide on one worker
# ---------------------------------------------------------------------------------------------
_MODEL_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _load_predictor(run_dir: str, which: str, gate: bool, device: str, stamp: int) -> tuple[Any, Any, dict]:
    """The run's segmenter as a predict function, its class table and checkpoint meta, cached
    per worker (``stamp``: the checkpoint's mtime, so a retrained run is reloaded)."""
    from .infer import segmenter_predict_fn
    from .train_seg import load_segmenter

    model, classes, _cfg, meta = load_segmenter(run_dir, which, map_location=device)
    gate_model = None
    if gate:
        from .train import load_run

        stage_one = meta.get("stage_one")
        if not stage_one:
            raise HistoWSSSError(f"{meta.get('path')}: the segmenter does not record its stage-one run; cannot gate classes")
        gate_model, gate_classes, _ = load_run(stage_one, map_location=device)
        if gate_classes.names != classes.names:
            raise HistoWSSSError(f"{stage_one}: stage-one classes differ from the segmenter's; cannot gate classes")
    return segmenter_predict_fn(model, classes, device, gate=gate_model), classes, meta


def _checkpoint_path(run_dir: str | Path, which: str) -> Path:
    """The checkpoint file :func:`~.train_seg.load_segmenter` reads for ``which``."""
    run = Path(run_dir)
    if which not in ("best", "last"):
        return Path(which)
    if not (run / "checkpoints").is_dir() and (run / "segmenter").is_dir():
        run = run / "segmenter"
    path = run / "checkpoints" / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run / "checkpoints" / "last.pt"
    return path


def _worker_device(pref: str) -> torch.device:
    """The task's device: :func:`~.device.pick_device`, with a bare CUDA choice spread over the
    node's GPUs by the Dask worker's index (LocalCluster workers are named 0, 1, ...)."""
    from .device import pick_device

    device = pick_device(pref)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            name = None
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            device = torch.device("cuda", int(name) % torch.cuda.device_count())
    return device


def _worker_name() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return None


def _existing_output(job: SlideJob, identity: dict, downsample: float, settings: PredictSettings) -> str:
    """``missing``, ``incomplete`` or ``complete`` (same slide, model and settings); raises
    when a complete output belongs to another slide, model or settings (and no overwrite).
    The model is identified by its checkpoint's save time, so a moved run folder still matches."""
    from .export import open_label_pyramid

    if job.out.is_dir() and not any(job.out.iterdir()):
        job.out.rmdir()  # a run killed before writing anything leaves just the folder
    if not job.out.exists():
        return "missing"
    pyr = open_label_pyramid(job.out, require_complete=False)
    if not pyr.complete:
        return "incomplete"
    if settings.overwrite:
        return "incomplete"
    meta = pyr.meta
    expected = {"slide": str(job.slide), "tile": settings.tile, "overlap": settings.overlap, "tta": settings.tta,
                "model_saved_at": identity["model_saved_at"], "gate": identity["gate"]}
    diff = [k for k, v in expected.items() if k in meta and meta[k] != v]
    if not math.isclose(float(meta.get("downsample", downsample)), downsample, rel_tol=1e-6):
        diff.append("downsample")
    if diff:
        raise HistoWSSSError(f"{job.out}: a complete prediction with a different {', '.join(diff)} is already there; "
                             "use overwrite (--overwrite) or another output folder")
    return "complete"


def predict_one(run_dir: str | Path, job: SlideJob, settings: PredictSettings) -> SlideResult:
    """Predict one slide into ``job.out`` (the Dask task; also usable directly).

    Returns a ``done`` or ``skipped`` :class:`SlideResult`; raises (a :class:`HistoWSSSError`
    naming the file for bad input) on failure, so that Dask can retry it."""
    from .infer import predict_slide, working_downsample
    from .export import open_label_pyramid
    from .slide import open_slide

    t0 = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(int(settings.torch_threads))
    device = _worker_device(settings.device)
    ckpt = _checkpoint_path(run_dir, settings.which)
    if not ckpt.is_file():
        raise HistoWSSSError(f"{run_dir}: no segmenter checkpoint {ckpt.name} (train-seg first)")
    with _MODEL_LOCK:
        predict_fn, classes, meta = _load_predictor(str(run_dir), settings.which, settings.gate, str(device),
                                                    ckpt.stat().st_mtime_ns)
    identity = {"model": str(ckpt.resolve()), "model_saved_at": meta.get("saved_at"), "gate": settings.gate}
    with open_slide(job.slide) as slide:
        ds = working_downsample(slide, settings.target_mpp, settings.downsample)
        state = _existing_output(job, identity, ds, settings)
        if state == "complete":
            return SlideResult(job.slide, job.out, "skipped", time.perf_counter() - t0, worker=_worker_name())
        job.out.parent.mkdir(parents=True, exist_ok=True)
        last = None
        for ev in predict_slide(slide, predict_fn, job.out, tile=settings.tile, overlap=settings.overlap,
                                batch_size=settings.batch_size, tta=settings.tta, classes=classes, downsample=ds,
                                overwrite=state == "incomplete"):
            last = ev
    if last is None or last.kind != "done":
        raise HistoWSSSError(f"{job.out}: prediction of {job.slide} ended without finishing")
    # Stamp which model made the result (read back on resume); predict_slide wrote the rest.
    open_label_pyramid(job.out).update_meta(**identity)
    metrics = dict(last.metrics)
    return SlideResult(job.slide, job.out, "done", time.perf_counter() - t0, tiles=int(metrics.get("tiles", 0)),
                       worker=_worker_name(), metrics=metrics)


# ---------------------------------------------------------------------------------------------
# the scheduler side
# ---------------------------------------------------------------------------------------------
def _error_text(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, HistoWSSSError):
        return str(exc)
    name = type(exc).__name__
    if name == "KilledWorker":
        return f"the worker running it died repeatedly (crash or out of memory): {exc}"
    return f"{name}: {exc}"


def predict_many(
    run_dir: str | Path,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    settings: PredictSettings | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    processes: bool = True,
    retries: int = 2,
    on_result: Callable[[SlideResult], None] | None = None,
) -> list[SlideResult]:
    """Predict every slide of ``slides`` into ``out_dir`` with Dask, one task per slide.

    ``scheduler``: the address of a running Dask scheduler; None starts a ``LocalCluster`` of
    ``workers`` single-threaded workers (``processes=False``: threads of this process, for
    tests and notebooks). Each task runs :func:`predict_one` with up to ``retries`` retries.
    ``on_result`` is called as each slide finishes, in completion order. Returns the results in
    the order of ``slides``; failed slides are in it with their error (nothing is dropped).
    """
    from distributed import Client, LocalCluster, as_completed

    settings = settings or PredictSettings()
    if retries < 0:
        raise HistoWSSSError(f"retries must be >= 0, got {retries}")
    jobs = plan_jobs(slides, out_dir)
    ckpt = _checkpoint_path(run_dir, settings.which)
    if not ckpt.is_file():  # fail once, clearly, instead of once per slide on the workers
        raise HistoWSSSError(f"{run_dir}: no segmenter checkpoint {ckpt.name} found (train-seg first)")
    run = str(Path(run_dir).expanduser().absolute())

    cluster = None
    if scheduler is None:
        if workers < 1:
            raise HistoWSSSError(f"workers must be >= 1, got {workers}")
        if settings.torch_threads is None:  # share this machine's cores between the workers
            settings = replace(settings, torch_threads=max(1, (os.cpu_count() or 1) // workers))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise HistoWSSSError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from e
    results: dict[SlideJob, SlideResult] = {}
    try:
        futures = {client.submit(predict_one, run, job, settings, key=f"predict-slide-{i}-{job.slide.name}",
                                 retries=retries, pure=False): job for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            job = futures[fut]
            if fut.status == "finished":
                res = fut.result()
            else:
                try:
                    error = _error_text(fut.exception())
                except Exception as e:  # noqa: BLE001 - a cancelled future has no exception to fetch
                    error = f"task {fut.status}: {type(e).__name__}: {e}"
                res = SlideResult(job.slide, job.out, "failed", error=error)
            results[job] = res
            if on_result is not None:
                on_result(res)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [results[j] for j in jobs]
