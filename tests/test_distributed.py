"""Data-parallel plumbing (core/distributed.py): two gloo ranks on the CPU train exactly what one
process trains with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from napari_histo_wsss.core.distributed import (
    DistContext,
    DistributedError,
    GlobalBatchNorm,
    convert_batchnorm,
    unwrap_model,
)
from napari_histo_wsss.core.models import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_train_script.py")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=240)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def _run_single_process(out: Path, *args: str) -> None:
    """The reference run, in this process (saves starting an interpreter and importing torch)."""
    spec = importlib.util.spec_from_file_location("ddp_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main([str(out), *args]) == 0
    finally:
        torch.set_num_threads(threads)


def test_two_gloo_ranks_equal_one_process_with_same_global_batch(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run_single_process(single, "--steps", "3", "--global-batch", "8")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(SCRIPT), str(ddp), "--steps", "3", "--global-batch", "8"])

    # Only rank 0 wrote, and nothing else (no stray temporaries from a second writer).
    assert sorted(p.name for p in ddp.iterdir()) == ["log.json", "model.pt"]
    log1 = json.loads((single / "log.json").read_text())
    log2 = json.loads((ddp / "log.json").read_text())
    assert (log1["rank"], log1["world_size"]) == (0, 1)
    assert (log2["rank"], log2["world_size"]) == (0, 2)

    # The two ranks' local batches together are exactly the single-process batches.
    assert log2["samples_per_step"] == log1["samples_per_step"]
    assert all(len(set(step)) == 8 for step in log2["samples_per_step"])

    # Same losses (averaged over ranks) and same weights and batch-norm statistics.
    assert log2["losses"] == pytest.approx(log1["losses"], rel=1e-5)
    a = load_checkpoint(single / "model.pt")["state_dict"]
    b = load_checkpoint(ddp / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert moved < 1e-5


def test_single_process_context_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = DistContext.from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed, ctx.backend) == (0, 1, True, False, "gloo")
    with ctx:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        assert ctx.wrap_model(model) is model
        assert isinstance(model[1], nn.BatchNorm2d) and not isinstance(model[1], GlobalBatchNorm)
        shim = ctx.wrap_model(model, method="forward")
        assert unwrap_model(shim) is model
        assert ctx.all_reduce_mean(2.5) == 2.5
        assert ctx.any(False) is False and ctx.any(True) is True
        assert ctx.broadcast_object({"a": 1}) == {"a": 1}
        ctx.barrier()
        assert ctx.local_batch_size(8) == 8


def test_method_shim_calls_the_named_method():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def features(self, x, scale=1.0):
            return {"out": self.lin(x) * scale}

    net = Net()
    ctx = DistContext()
    shim = ctx.wrap_model(net, method="features")
    x = torch.ones(1, 2)
    torch.testing.assert_close(shim(x, scale=2.0)["out"], net.lin(x) * 2.0)
    assert unwrap_model(shim) is net
    with pytest.raises(DistributedError, match="no method 'nope'"):
        ctx.wrap_model(net, method="nope")


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK=2, WORLD_SIZE=2"):
        DistContext.from_env("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="RANK='x'"):
        DistContext.from_env("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    ctx = DistContext.from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (1, 2, 1, False)
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        ctx.init()
    with pytest.raises(DistributedError, match="does not split evenly over 2"):
        ctx.local_batch_size(7)
    assert ctx.local_batch_size(8) == 4


def test_samplers_of_two_ranks_interleave_the_single_process_order():
    data = list(range(12))
    one = list(DistContext().make_sampler(data, shuffle=True, seed=3))
    r0 = list(DistContext(rank=0, world_size=2).make_sampler(data, shuffle=True, seed=3))
    r1 = list(DistContext(rank=1, world_size=2).make_sampler(data, shuffle=True, seed=3))
    assert sorted(one) == data and one != data  # shuffled
    assert r0 == one[0::2] and r1 == one[1::2]
    s = DistContext().make_sampler(data, shuffle=True, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # a new order each epoch, a function of (seed, epoch)


def test_global_batchnorm_keeps_state_dict_and_is_plain_bn_without_a_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, momentum=None))
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, momentum=None))
    ref.load_state_dict(model.state_dict())
    weight = model[1].weight
    keys = list(model.state_dict())
    assert convert_batchnorm(model) is model
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[3], GlobalBatchNorm)
    assert model[1].weight is weight and model[3].momentum is None
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
