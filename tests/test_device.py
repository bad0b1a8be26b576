"""Device choice, seeding and mixed precision (core/device.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from napari_histo_wsss.core import device as dev
from napari_histo_wsss.core.device import DeviceError, amp_dtype, autocast, grad_scaler, pick_device, seed_everything
from napari_histo_wsss.core.errors import HistoWSSSError


def _fake_machine(monkeypatch, cuda: int = 0, mps: bool = False, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(dev, "_mps_available", lambda: mps)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    _fake_machine(monkeypatch, cuda=2, mps=True)
    assert pick_device("auto") == torch.device("cuda")
    _fake_machine(monkeypatch, cuda=0, mps=True)
    assert pick_device("auto") == torch.device("mps")
    _fake_machine(monkeypatch, cuda=0, mps=False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")


def test_explicit_choices(monkeypatch):
    _fake_machine(monkeypatch, cuda=2)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert pick_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:2'.*2 CUDA device\(s\)"):
        pick_device("cuda:2")
    with pytest.raises(DeviceError, match="index must be a number"):
        pick_device("cuda:x")


def test_unavailable_or_unknown_devices_are_clear_errors(monkeypatch):
    _fake_machine(monkeypatch, cuda=0, mps=False)
    with pytest.raises(DeviceError, match="CUDA is not available.*--device auto or cpu"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        pick_device("mps")
    with pytest.raises(HistoWSSSError, match="unknown device 'tpu'.*auto, cpu, cuda"):
        pick_device("tpu")


def test_this_machine_auto_device_is_usable():
    device = pick_device("auto")
    x = torch.ones(2, device=device)
    assert float(x.sum()) == 2.0


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.nn.Linear(3, 2).weight.tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_amp_only_on_cuda(monkeypatch):
    assert amp_dtype("cpu") is None
    with autocast("cpu"):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32
    scaler = grad_scaler("cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss  # pass-through API on CPU
    _fake_machine(monkeypatch, cuda=1, bf16=True)
    assert amp_dtype("cuda") == torch.bfloat16
    _fake_machine(monkeypatch, cuda=1, bf16=False)
    assert amp_dtype(torch.device("cuda", 0)) == torch.float16
    assert amp_dtype("mps") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autocast_on_cuda_uses_reduced_precision():
    with autocast("cuda"):
        y = torch.nn.Linear(4, 4).cuda()(torch.randn(2, 4, device="cuda"))
    assert y.dtype == amp_dtype("cuda")
    assert grad_scaler("cuda").is_enabled() == (amp_dtype("cuda") == torch.float16)
