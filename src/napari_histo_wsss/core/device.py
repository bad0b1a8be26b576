"""Device choice, CPU threads, seeding and mixed precision for training and inference.

One place decides where models run (``pick_device``), how many CPU threads torch uses
(``apply_thread_policy``), how runs are made repeatable (``seed_everything``) and how automatic
mixed precision is used (``autocast`` and ``grad_scaler``), so the classifier loop, the segmenter
loop and whole-slide inference behave the same on a laptop CPU, an Apple GPU and a CUDA server.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import ContextManager

import numpy as np
import torch

from napari_histo_wsss.core.errors import HistoWSSSError

__all__ = [
    "DeviceError",
    "pick_device",
    "available_cores",
    "thread_count",
    "apply_thread_policy",
    "seed_everything",
    "amp_dtype",
    "autocast",
    "grad_scaler",
]


class DeviceError(HistoWSSSError):
    """The requested compute device does not exist or is not usable on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(pref: str | torch.device | None = "auto") -> torch.device:
    """Resolve a device preference to a usable ``torch.device``.

    ``"auto"`` (or ``None``) picks CUDA, then Apple MPS, then the CPU. ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` and ``"mps"`` are checked against this machine, so a typo or a missing GPU is
    a clear :class:`DeviceError` at the start of a run instead of a crash deep inside it.
    """
    if isinstance(pref, torch.device):
        pref = str(pref)
    choice = (pref or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' requested but Apple MPS is not available here; use --device auto or cpu")
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {choice!r} requested but CUDA is not available "
                f"(torch {torch.__version__} built {'with' if torch.version.cuda else 'without'} CUDA); "
                "use --device auto or cpu"
            )
        index_text = choice.partition(":")[2]
        if index_text:
            if not index_text.isdigit():
                raise DeviceError(f"device {pref!r}: the CUDA index must be a number, e.g. cuda:0")
            count = torch.cuda.device_count()
            if int(index_text) >= count:
                raise DeviceError(f"device {choice!r} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device(choice)
    raise DeviceError(f"unknown device {pref!r}; choose auto, cpu, cuda, cuda:N or mps")


# ---------------------------------------------------------------------------------------------
# CPU thread policy
# ---------------------------------------------------------------------------------------------
# Why: a pathologist's GUI always competes with training for the cores. With torch's defaults
# (one intra-op thread per core, spinning while they wait for each other) one other busy process
# made a stage-two step of the demo 10x slower on 2 cores. The policy: passive OpenMP waiting
# (set in the environment at package import, see ``napari_histo_wsss.OPENMP_WAIT_ENV``), one
# inter-op thread (the engines never run ops concurrently), and intra-op threads = the cores this
# process may use, minus one for the GUI while a GUI runs. Explicit choices win, in this order: a
# thread count passed by the caller (``--torch-threads``), a ``torch.set_num_threads`` made by the
# caller's own code (a script, a test) since the policy last looked, ``OMP_NUM_THREADS`` or
# ``MKL_NUM_THREADS``. ``HISTO_WSSS_THREAD_POLICY=off`` leaves torch's threads alone.

#: torch's intra-op thread count when this module was first imported: its default (physical
#: cores, or ``OMP_NUM_THREADS``) or what the importing program had already chosen.
_STARTUP_THREADS = torch.get_num_threads()
_gui_mode = False  # set by the GUI entry points; engines keep whatever mode the process is in
_seen_threads = _STARTUP_THREADS  # the count the policy last set or accepted
_caller_owns_threads = False  # True once the caller's own set_num_threads was seen: kept from then on


def _policy_off() -> bool:
    return os.environ.get("HISTO_WSSS_THREAD_POLICY", "").strip().lower() in ("off", "0", "none", "torch")


def _env_threads() -> int | None:
    """A thread count the user set in the environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        text = os.environ.get(name, "").strip().split(",")[0]  # OpenMP allows "4,2" (nested levels)
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``taskset``, cgroups cpusets, batch
    schedulers) where the OS reports one, else all of the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def thread_count(gui: bool = False, threads: int | None = None) -> int:
    """The intra-op thread count of the policy for a fresh process.

    Headless: torch's default (its physical-core count) capped at :func:`available_cores`, divided
    among the ranks of a ``torchrun`` job on this node. With a GUI: one core fewer, at least one,
    so that the viewer stays responsive and the training threads are not descheduled mid-step.
    ``threads`` (``--torch-threads``), then ``OMP_NUM_THREADS``, override both.
    """
    if threads is not None:
        if int(threads) < 1:
            raise DeviceError(f"torch threads must be at least 1, got {threads!r}")
        return int(threads)
    env = _env_threads()
    if env is not None:
        return env
    cores = available_cores()
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    ranks = int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1
    base = max(1, min(_STARTUP_THREADS, cores) // ranks)
    if gui:
        base = max(1, min(base, cores - 1))
    return base


def apply_thread_policy(gui: bool | None = None, threads: int | None = None) -> int:
    """Set torch's CPU threads by the policy and return the intra-op count now in force.

    ``gui``: True in GUI entry points (the dock widgets' background jobs, ``histo-wsss gui``),
    False in headless entry points, None (the engines) keeps the mode the process is in.
    ``threads``: an explicit count (``--torch-threads``). A count the caller's own code set with
    ``torch.set_num_threads`` since the policy last looked is kept. Call it in the thread that
    will run the work: OpenMP keeps the count per calling thread (torch copies its own setting
    into a new thread only the first time that thread runs a parallel op).
    """
    global _gui_mode, _seen_threads, _caller_owns_threads
    if gui is not None:
        _gui_mode = bool(gui)
    current = torch.get_num_threads()
    if threads is None:
        if current != _seen_threads:
            # The caller's own code chose a count: it stays the caller's from now on, so two runs
            # in one process (a script, a test) both run at it instead of the second one being
            # switched back to the policy's count (which changes float reductions between them).
            _caller_owns_threads = True
        if _policy_off() or _caller_owns_threads:
            _seen_threads = current
            return current
    else:
        _caller_owns_threads = False
    n = thread_count(_gui_mode, threads)
    if n != current:
        torch.set_num_threads(n)
    _seen_threads = n
    _single_interop_thread()
    return n


def _single_interop_thread() -> None:
    """One inter-op thread: the engines run one op at a time, so a pool of core-count idle threads
    only adds wake-ups. torch allows this once per process and only before inter-op work began."""
    if torch.get_num_interop_threads() == 1:
        return
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started: keep torch's pool
        pass


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices) so a run with the same seed repeats itself.

    With ``deterministic`` cuDNN picks deterministic kernels and stops autotuning; a few CUDA
    ops (e.g. bilinear upsampling backward) stay non-deterministic, so GPU runs agree closely
    rather than bit for bit. CPU runs repeat exactly.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)  # inherited by data-loader worker processes
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced precision used on ``device``: bfloat16 on CUDA GPUs that support it (no loss
    scaling needed), float16 on older CUDA GPUs, ``None`` (full float32) elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str, enabled: bool = True) -> ContextManager:
    """Mixed-precision context for forward passes: ``torch.autocast`` with :func:`amp_dtype`
    on CUDA, a no-op on CPU and MPS (CPU autocast is slower than float32 for these convnets)."""
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device | str, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active only where :func:`autocast` uses float16; elsewhere it is
    a pass-through with the same API, so the training loop calls ``scale/step/update`` always."""
    active = bool(enabled) and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda", enabled=active)
