"""Data-parallel training (core/distributed.py, used by core/stage1/train.py and core/stage2/train.py): the
real `train-cls` under torchrun with two gloo ranks on the CPU trains exactly what one process
trains with the same global batch, `train-seg` trains under torchrun, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import make_dataset  # the generated WSSS4LUAD-style folder of the training tests
from torch import nn

from napari_histo_wsss.core.device import seed_everything
from napari_histo_wsss.core.distributed import (
    DistContext,
    DistributedError,
    GlobalBatchNorm,
    convert_batchnorm,
    unwrap_model,
)
from napari_histo_wsss.core.models import load_checkpoint
from napari_histo_wsss.core.stage1.train import TrainConfig, build_model, train_classifier
from napari_histo_wsss.core.stage2.train import load_segmenter


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m napari_histo_wsss ARGS``: the documented way."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "napari_histo_wsss", *args], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert r.returncode == 0, f"torchrun {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


# ResNet-18 has no stochastic depth, so the ranks draw nothing from the global RNG that one process
# would draw differently
# synthesis off: with 2 images per rank a quarter rounds to none (tests/test_stage1_synthesis.py runs it under torchrun)
TINY = dict(method="cam", epochs=2, batch_size=4, weights="none", device="cpu", seed=3, lr=1e-3,
            output_stride=32, max_steps_per_epoch=3, cam_mode="last", backbone="resnet18", synth_share=0.0)


def _cli_options(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() for a in ("--" + k.replace("_", "-"), str(v))]


def _no_torchrun_env(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_train_cls_under_torchrun_matches_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    """Two gloo ranks of the real `train-cls` command train exactly what one process trains:
    same losses (averaged over ranks), same validation scores, same weights and batch-norm
    statistics, and only rank 0 writes the run folder."""
    _no_torchrun_env(monkeypatch)
    data = make_dataset(tmp_path / "data", n_train=16, size=48)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        list(train_classifier(data, single, TrainConfig(**TINY)))
    finally:
        torch.set_num_threads(threads)
    r = _torchrun("train-cls", str(data), str(ddp), *_cli_options(TINY), "--json")
    assert "x 2 processes" in r.stdout + r.stderr

    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert json.loads((ddp / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    rows1 = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows2] == [1, 2]
    for r1, r2 in zip(rows1, rows2):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
        # the argmax of an untrained model's CAMs is full of near-ties: float summation order
        # (all-reduce vs one batch) moves a few pixels, so only roughly equal
        assert r2["val_miou"] == pytest.approx(r1["val_miou"], abs=0.03)
    a = load_checkpoint(single / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(ddp / "checkpoints" / "last.pt")["state_dict"]
    assert load_checkpoint(ddp / "checkpoints" / "last.pt")["extra"]["world_size"] == 2
    assert a.keys() == b.keys()
    seed_everything(TINY["seed"])
    init = build_model(TrainConfig(**TINY), 3).state_dict()  # the weights both runs started from
    floats = [k for k in a if a[k].is_floating_point()]
    moved = max(float((a[k] - init[k]).abs().max()) for k in floats)
    apart = max(float((a[k] - b[k]).abs().max()) for k in floats)
    # AdamW divides by the root of the squared gradients, which magnifies the float noise of
    # near-zero gradients (all-reduced halves vs one batch): equal up to a small share of the step
    assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k  # batch counters


def test_train_seg_under_torchrun_trains_and_only_rank0_writes(tmp_path, monkeypatch):
    """Stage two under torchrun: rank 0 makes the pseudo-mask sets while rank 1 waits, both train
    on their halves of each batch, and the run folder holds one writer's files. The stage-one run
    records its dataset, so `train-seg RUN_DIR` needs no --dataset."""
    _no_torchrun_env(monkeypatch)
    data = make_dataset(tmp_path / "data", n_train=12, size=48)
    run = tmp_path / "run"
    list(train_classifier(data, run, TrainConfig(**dict(TINY, epochs=1, max_steps_per_epoch=1))))
    assert json.loads((run / "dataset.json").read_text())["path"] == str(data.resolve())
    r = _torchrun("train-seg", str(run), "--epochs", "1", "--batch-size", "4", "--weights", "none",
                  "--device", "cpu", "--max-steps-per-epoch", "2")
    assert "x 2 processes" in r.stdout + r.stderr
    seg = run / "segmenter"
    assert sorted(p.name for p in seg.iterdir()) == ["checkpoints", "classes.json", "config.json", "dataset.json",
                                                     "metrics.jsonl", "pseudo"]
    assert sorted(p.name for p in (seg / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    (row,) = [json.loads(line) for line in (seg / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(row["train_loss"])
    _, _, _, meta = load_segmenter(run)
    assert meta["epoch"] == 1


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
