"""Device choice, seeding and mixed precision for training and inference.

One place decides where models run (``pick_device``), how runs are made repeatable
(``seed_everything``) and how automatic mixed precision is used (``autocast`` and
``grad_scaler``), so the classifier loop, the segmenter loop and whole-slide inference behave
the same on a laptop CPU, an Apple GPU and a CUDA server.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import ContextManager

import numpy as np
import torch

from .errors import HistoWSSSError

__all__ = ["DeviceError", "pick_device", "seed_everything", "amp_dtype", "autocast", "grad_scaler"]


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
