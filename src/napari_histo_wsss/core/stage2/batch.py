"""Whole-slide prediction for many slides, scheduled with Dask ``distributed``.

:func:`predict_many` turns a list of slides into one Dask task per slide. Each task runs the
ordinary single-slide engine (:func:`~.infer.predict_slide` with the stage-two segmenter of a
run folder) on whatever worker the scheduler picks and writes straight into that slide's
OME-Zarr output ``<out>/<slide name>.ome.zarr``; nothing but a small :class:`SlideResult`
travels back. The cluster is a ``LocalCluster`` on this machine by default (worker processes,
so a crash in a slide decoder costs one worker, not the run) or any running scheduler
(``scheduler="tcp://host:8786"``: an HPC or cloud cluster whose workers see the same files).

Failures are never silent: a slide that fails is reported with its one-line error in the
results, which the CLI prints as a table and turns into a non-zero exit status. Only transient
I/O errors (an ``OSError`` such as a stale NFS handle) are retried by Dask (``retries``); a bad
or missing slide (a :class:`~.errors.HistoWSSSError`) fails the same way on every try and is
reported at once. A worker that dies is rescheduled by the scheduler. distributed's own log
lines (task errors with tracebacks) are silenced while it runs.

A scheduler must be trusted: it runs the code it is sent and unpickles what workers return, and
so can anyone who can reach it. :func:`connect_scheduler` gives up after a short timeout with one
clear line (a wrong address, or a port that is not a Dask scheduler) and speaks TLS with
:func:`tls_security` (``tls://`` addresses; certificates required).

Resume: an output that is complete (``complete: true``, written last by predict_slide) for the
same slide, model and settings is skipped; an incomplete one (interrupted, crashed, full disk)
is predicted again from scratch; a complete output made from another slide, model or settings
is refused unless ``overwrite`` is set, so a rerun never passes off a stale result.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from napari_histo_wsss.core.device import apply_thread_policy, available_cores
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.io.atomic import check_apart, check_writable
from napari_histo_wsss.core.runs import checkpoint_file
from napari_histo_wsss.core.settings import Settings, setting

__all__ = [
    "PredictSettings",
    "SlideJob",
    "SlideResult",
    "output_path",
    "plan_jobs",
    "predict_one",
    "predict_many",
    "connect_scheduler",
    "tls_security",
    "CONNECT_TIMEOUT_S",
]

#: Seconds to wait for a scheduler to answer (Dask's own default is 30 s, and a port that accepts
#: a connection but never answers would make ``Client()`` wait for ever).
CONNECT_TIMEOUT_S = 10.0
#: errno values of OSErrors that a retry cannot cure (missing or forbidden file, full disk).
_LASTING_ERRNOS = {getattr(errno, n) for n in ("ENOENT", "EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "EISDIR",
                                                "ENOTDIR", "ENAMETOOLONG") if hasattr(errno, n)}

@dataclass(frozen=True)
class PredictSettings(Settings):
    """How each slide is predicted (sent to every task, so plain values only). The options of
    ``histo-wsss predict-many`` and the Segmenter panel's "Predict the slide" form are generated
    from these declarations (:mod:`~..settings`).

    ``tile``/``overlap``/``batch_size``/``tta`` as in :func:`~.infer.predict_slide`;
    ``target_mpp`` or ``downsample`` (neither: level 0; not both); ``device`` ``auto``: a worker
    of a multi-GPU node takes GPU ``worker index % GPUs``; ``torch_threads`` None:
    :func:`~..device.apply_thread_policy`'s choice.
    """

    what = "prediction setting"

    tile: int = setting(512, range=(1, None), basic=True, step=64, label="Tile (px)",
                        help="tile side in working pixels")
    overlap: int = setting(64, range=(0, None), basic=True, label="Overlap (px)", help="tile overlap in working pixels")
    batch_size: int = setting(8, range=(1, None), gui=False, help="tiles per forward pass")
    target_mpp: float | None = setting(None, range=(0, None), open="lo", gui=False,
                                       help="microns per pixel the model works at (the slide is resampled to it; "
                                            "not with --downsample)")
    downsample: float | None = setting(None, range=(0, None), open="lo", gui=False,
                                       help="level-0 pixels per working pixel (default: 1, full resolution)")
    tta: bool = setting(False, basic=True, label="flip test-time augmentation", help="flip test-time augmentation")
    which: str = setting("best", option="checkpoint", gui=False, help="best, last, or a checkpoint path")
    gate: bool = setting(False, basic=True, label="gate classes with the stage-one classifier",
                         help="switch off classes the stage-one classifier finds absent (MLPS test-time gating)")
    device: str = setting("auto", choices=("auto", "cpu", "cuda", "mps"), strict=False, gui=False,
                          help="auto, cpu, cuda, cuda:N, mps (per worker)")
    torch_threads: int | None = setting(None, range=(1, None), gui=False,
                                        help="torch threads per worker (default: local cluster cores / workers; "
                                             "remote: the worker's own)")
    overwrite: bool = setting(False, gui=False, help="recompute outputs that are already complete")

    def problems(self) -> list[str]:
        both = self.target_mpp is not None and self.downsample is not None
        return super().problems() + ([f"{self.what}: give target_mpp or downsample, not both"] if both else [])


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
    from napari_histo_wsss.core.stage2.infer import segmenter_predict_fn
    from napari_histo_wsss.core.stage2.train import load_segmenter

    model, classes, _cfg, meta = load_segmenter(run_dir, which, map_location=device)
    gate_model = None
    if gate:
        from napari_histo_wsss.core.stage1.train import load_run

        stage_one = meta.get("stage_one")
        if not stage_one:
            raise HistoWSSSError(f"{meta.get('path')}: the segmenter does not record its stage-one run; cannot gate classes")
        gate_model, gate_classes, _ = load_run(stage_one, map_location=device)
        if gate_classes.names != classes.names:
            raise HistoWSSSError(f"{stage_one}: stage-one classes differ from the segmenter's; cannot gate classes")
    return segmenter_predict_fn(model, classes, device, gate=gate_model), classes, meta


def _worker_device(pref: str) -> torch.device:
    """The task's device: :func:`~.device.pick_device`, with a bare CUDA choice spread over the
    node's GPUs by the Dask worker's index (LocalCluster workers are named 0, 1, ...)."""
    from napari_histo_wsss.core.device import pick_device

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
    from napari_histo_wsss.core.io.export import open_label_pyramid

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
    from napari_histo_wsss.core.io.export import open_label_pyramid
    from napari_histo_wsss.core.slides.grid import working_downsample
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.stage2.infer import predict_slide

    t0 = time.perf_counter()
    apply_thread_policy(threads=settings.torch_threads)  # in the worker thread that runs the model
    device = _worker_device(settings.device)
    ckpt = checkpoint_file(Path(run_dir), settings.which, subrun="segmenter")  # what load_segmenter reads
    if not ckpt.is_file():
        raise HistoWSSSError(f"{run_dir}: no segmenter checkpoint {ckpt.name} (train-seg first)")
    with _MODEL_LOCK:
        predict_fn, classes, meta = _load_predictor(str(run_dir), settings.which, settings.gate, str(device),
                                                    ckpt.stat().st_mtime_ns)
    identity = {"model": str(ckpt.resolve()), "model_saved_at": meta.get("saved_at"), "gate": settings.gate}
    with open_slide(job.slide) as slide:
        ds = working_downsample(slide, settings.target_mpp, settings.downsample, strict=True)
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
def _is_transient(exc: BaseException) -> bool:
    """Worth a retry: an I/O error that may pass (a stale NFS handle, a network share that
    hiccups). A :class:`HistoWSSSError` (bad or missing input) or a bug fails the same way on
    every try."""
    return isinstance(exc, OSError) and not isinstance(exc, HistoWSSSError) and exc.errno not in _LASTING_ERRNOS


def _slide_task(run_dir: str, job: SlideJob, settings: PredictSettings) -> SlideResult:
    """The Dask task: :func:`predict_one`, with a lasting failure returned as a ``failed`` result
    rather than raised. Dask retries whatever a task raises and logs each failure with its
    traceback, so a bad slide would be read ``retries + 1`` times; only transient I/O errors are
    raised (and so retried)."""
    t0 = time.perf_counter()
    try:
        return predict_one(run_dir, job, settings)
    except Exception as e:  # noqa: BLE001 - every failure becomes the slide's one-line error
        if _is_transient(e):
            raise
        return SlideResult(job.slide, job.out, "failed", time.perf_counter() - t0, worker=_worker_name(),
                           error=_error_text(e))


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Silence distributed's log lines in this process while a run lasts (task errors with
    tracebacks, connection retries): every failure reaches the caller as a one-line result.
    Both the ``distributed`` logger (its records also reach the root logger's handlers when the
    application configured logging) and its own stderr handler (for loggers with a level of
    their own) are raised to CRITICAL, and restored after."""
    import logging

    import distributed  # noqa: F401 - its import sets these levels and adds the handler: first

    logger = logging.getLogger("distributed")
    handlers = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    levels = [logger.level] + [h.level for h in handlers]
    for item in [logger, *handlers]:
        item.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for item, level in zip([logger, *handlers], levels):
            item.setLevel(level)


def tls_security(ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> Any:
    """A ``distributed.security.Security`` for a ``tls://`` scheduler: the CA certificate that
    signed the cluster's certificates, and this client's certificate and private key (PEM);
    encryption required. Missing or unusable files are one :class:`HistoWSSSError` line."""
    from distributed.security import Security

    files = {"CA certificate": ca_file, "client certificate": cert_file, "client key": key_file}
    for what, f in files.items():
        if not Path(f).expanduser().is_file():
            raise HistoWSSSError(f"{f}: TLS {what} not found")
    ca, cert, key = (str(Path(f).expanduser()) for f in files.values())
    security = Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    try:
        security.get_connection_args("client")  # loads the files: a bad PEM fails here, clearly
    except (OSError, ValueError) as e:
        raise HistoWSSSError(f"TLS files {ca}, {cert}, {key} cannot be used: {e}") from e
    return security


def _probe_scheduler(address: str, timeout: float, security: Any | None) -> None:
    """Ask ``address`` who it is, within ``timeout`` seconds: ``Client()`` waits for ever on a
    port that accepts but never answers, and may try to allocate exabytes for a non-Dask reply."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    args = security.get_connection_args("client") if security is not None else {}

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    # asyncio.run in a thread of its own: the caller may be inside a running loop (a notebook).
    with ThreadPoolExecutor(1, thread_name_prefix="histo-dask-probe") as pool:
        try:
            # a second more than connect's own timeout, so that its clearer error comes first
            answer = pool.submit(lambda: asyncio.run(asyncio.wait_for(identity(), timeout + 1.0))).result()
        except asyncio.TimeoutError as e:
            raise HistoWSSSError(f"{address}: no Dask scheduler answered within {timeout:g} s "
                                 "(wrong host or port, or not a Dask scheduler)") from e
        except OSError as e:
            raise HistoWSSSError(f"cannot reach the Dask scheduler at {address}: {e}") from e
        except Exception as e:  # noqa: BLE001 - whatever a non-Dask server makes the protocol do
            raise HistoWSSSError(f"{address}: did not answer like a Dask scheduler ({type(e).__name__}: {e})") from e
    kind = answer.get("type") if isinstance(answer, dict) else None
    if kind != "Scheduler":
        hint = " (give the scheduler's address, not a worker's)" if kind == "Worker" else ""
        raise HistoWSSSError(f"{address}: answers as {kind or 'something else'}, not as a Dask scheduler{hint}")


def connect_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S, security: Any | None = None) -> Any:
    """A ``distributed.Client`` of the running scheduler at ``address``, or one
    :class:`HistoWSSSError` line within about ``timeout`` seconds: an unknown scheme, a ``tls://``
    address without certificates (``security``, see :func:`tls_security`), certificates with an
    unencrypted address, nothing listening, or a server that is not a Dask scheduler.

    The scheduler must be trusted: it runs the code it is sent and unpickles the results."""
    from distributed import Client
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    if not timeout > 0:
        raise HistoWSSSError(f"the connect timeout must be positive, got {timeout}")
    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
    except ValueError as e:
        raise HistoWSSSError(f"{address}: not a Dask scheduler address ({e}); expected tcp://host:port "
                             "or tls://host:port") from e
    if scheme in ("tls", "wss") and security is None:
        raise HistoWSSSError(f"{address}: a TLS scheduler needs certificates: the CA certificate, a client "
                             "certificate and its key (--tls-ca, --tls-cert, --tls-key)")
    if security is not None and getattr(security, "require_encryption", False) and scheme not in ("tls", "wss", "inproc"):
        raise HistoWSSSError(f"{address}: TLS certificates were given for an unencrypted {scheme}:// address; "
                             f"use tls://{location}")
    if scheme != "inproc":  # in-process schedulers (tests) answer at once
        _probe_scheduler(address, timeout, security)
    try:
        return Client(address, timeout=f"{timeout}s", security=security)
    except Exception as e:  # noqa: BLE001 - a network failure between the probe and here
        raise HistoWSSSError(f"cannot reach the Dask scheduler at {address}: {type(e).__name__}: {e}") from e


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
    security: Any | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> list[SlideResult]:
    """Predict every slide of ``slides`` into ``out_dir`` with Dask, one task per slide.

    ``scheduler``: the address of a running, trusted Dask scheduler (:func:`connect_scheduler`,
    with ``security`` and ``connect_timeout``); None starts a ``LocalCluster`` of ``workers``
    single-threaded workers (``processes=False``: threads of this process, for tests and
    notebooks). Each task runs :func:`predict_one`; a transient I/O error is retried up to
    ``retries`` times, any other failure is reported at once.
    ``on_result`` is called as each slide finishes, in completion order. Returns the results in
    the order of ``slides``; failed slides are in it with their error (nothing is dropped).
    """
    settings = settings or PredictSettings()
    if retries < 0:
        raise HistoWSSSError(f"retries must be >= 0, got {retries}")
    jobs = plan_jobs(slides, out_dir)
    # fail once, clearly, before any slide instead of once per slide on the workers: an output
    # folder holding slides or the run, one that cannot be written, a run without a segmenter,
    # a damaged checkpoint (loaded here as each worker loads it)
    check_apart(out_dir, inputs=[job.slide for job in jobs], protect=[run_dir], what="output folder")
    ckpt = checkpoint_file(Path(run_dir), settings.which, subrun="segmenter")  # what load_segmenter reads
    if not ckpt.is_file():
        raise HistoWSSSError(f"{run_dir}: no segmenter checkpoint {ckpt.name} found (train-seg first)")
    run = str(Path(run_dir).expanduser().absolute())
    with _MODEL_LOCK:
        _load_predictor(run, settings.which, settings.gate, "cpu", ckpt.stat().st_mtime_ns)
    check_writable(out_dir, "output folder")  # created by the first task, so a failure now leaves nothing

    with _quiet_dask_logs():
        return _run_jobs(run, jobs, settings, scheduler, workers, processes, retries, on_result, security,
                         connect_timeout)


def _run_jobs(run: str, jobs: list[SlideJob], settings: PredictSettings, scheduler: str | None, workers: int,
              processes: bool, retries: int, on_result: Callable[[SlideResult], None] | None, security: Any | None,
              connect_timeout: float) -> list[SlideResult]:
    """:func:`predict_many` once its inputs are checked: start or reach the cluster, run the tasks."""
    import logging

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        if workers < 1:
            raise HistoWSSSError(f"workers must be >= 1, got {workers}")
        if settings.torch_threads is None:  # share this machine's cores between the workers
            settings = replace(settings, torch_threads=max(1, available_cores() // workers))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    else:
        client = connect_scheduler(scheduler, connect_timeout, security)
    results: dict[SlideJob, SlideResult] = {}
    try:
        futures = {client.submit(_slide_task, run, job, settings, key=f"predict-slide-{i}-{job.slide.name}",
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
