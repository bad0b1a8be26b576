"""Data-parallel training over ``torch.distributed``, for runs launched with ``torchrun``.

``torchrun --nproc_per_node N -m napari_histo_wsss train-cls ...`` starts N copies of a training
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address) in the
environment. :class:`DistContext` reads them, picks the rank's device (``cuda:LOCAL_RANK`` on
GPU nodes, else the CPU), initialises the process group (NCCL on CUDA, gloo on the CPU) and
offers the few operations a training loop needs:

* :meth:`DistContext.wrap_model`: ``DistributedDataParallel`` around the model, optionally
  calling a method other than ``forward`` (``forward_features`` of the CAM classifier), with
  batch normalisation synchronised across ranks (``SyncBatchNorm`` on CUDA,
  :class:`GlobalBatchNorm` elsewhere), so that N ranks
  with ``B / N`` images each compute exactly what one process computes on a batch of ``B``.
* :meth:`DistContext.make_sampler`: a ``DistributedSampler`` for any world size (also 1), so
  the sample order is a function of ``(seed, epoch)`` only and rank ``r`` of ``N`` takes every
  ``N``-th index: the ranks' local batches ``i`` together are exactly the single-process batch
  ``i`` of the same global batch size.
* :meth:`DistContext.all_reduce_mean`, :meth:`DistContext.any`, :meth:`DistContext.barrier`:
  agree on logged losses, NaN checks and cancel requests (a rank that stopped alone would leave
  the others waiting in a collective forever).
* :attr:`DistContext.is_main`: only rank 0 writes files (config, metrics, checkpoints).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the context is a single process
and every operation is a no-op, so one training loop serves both cases.

Why a batch norm of our own: ``torch.nn.SyncBatchNorm`` only runs on GPUs (DDP refuses it on
CPU modules), and unsynchronised batch statistics make N ranks differ from one process. On CUDA
:meth:`DistContext.wrap_model` uses ``SyncBatchNorm`` (fused kernels); elsewhere
:class:`GlobalBatchNorm` (same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``)
all-reduces per-channel sums and squared deviations with an autograd-aware sum, so gradients
flow through the global statistics as they do in one process.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any, Sized

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from napari_histo_wsss.core.device import pick_device
from napari_histo_wsss.core.errors import HistoWSSSError

__all__ = [
    "DistributedError",
    "DistContext",
    "GlobalBatchNorm",
    "convert_batchnorm",
    "unwrap_model",
]

class DistributedError(HistoWSSSError):
    """The distributed environment is inconsistent (bad torchrun variables, too few GPUs...)."""


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def _rank_device(pref: str | torch.device | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: :func:`~.device.pick_device` of ``pref``, with a bare ``cuda``
    made ``cuda:LOCAL_RANK`` (one GPU per process). MPS serves one process only."""
    device = pick_device(pref)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); "
                                   "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    elif device.type == "mps" and world_size > 1:
        raise DistributedError("Apple MPS cannot be shared by several processes; use --device cpu with torchrun")
    return device


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (see the module doc).

    Build it with :meth:`from_env`; :meth:`init` joins the process group (when ``world_size`` >
    1), :meth:`shutdown` leaves it. Also a context manager doing both.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 1800.0
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls, device: str | torch.device | None = "auto", timeout_s: float = 1800.0) -> DistContext:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` (torchrun) and pick the
        rank's device from ``device`` (``auto``, ``cpu``, ``cuda``...). Nothing is initialised
        yet. Without those variables: a single-process context."""
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        if not 0 <= local_rank < max(local_world, 1):
            raise DistributedError(f"inconsistent torchrun environment: LOCAL_RANK={local_rank}, "
                                   f"LOCAL_WORLD_SIZE={local_world}")
        if world > 1 and not dist.is_available():
            raise DistributedError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
        return cls(rank, world, local_rank, local_world, _rank_device(device, local_rank, world), float(timeout_s))

    # -- facts ------------------------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints progress."""
        return self.rank == 0

    @property
    def backend(self) -> str:
        """NCCL between CUDA devices, gloo otherwise (CPU)."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def local_batch_size(self, global_batch_size: int) -> int:
        """This rank's share of a global batch; the global batch must split evenly, or ranks
        would train on batches of different sizes and no longer match one process."""
        if global_batch_size < self.world_size or global_batch_size % self.world_size:
            raise DistributedError(f"the batch size {global_batch_size} does not split evenly over {self.world_size} "
                                   f"processes; use a multiple of {self.world_size}")
        return global_batch_size // self.world_size

    # -- life cycle -------------------------------------------------------------------------------
    def init(self) -> DistContext:
        """Select the rank's GPU and join the process group (``env://`` rendezvous set up by
        torchrun). Idempotent; a no-op for a single process."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not self.is_distributed or dist.is_initialized():
            return self
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedError(f"WORLD_SIZE={self.world_size} but {var} is not set; launch with torchrun")
        kwargs: dict[str, Any] = {}
        if self.device.type == "cuda":
            kwargs["device_id"] = self.device  # binds NCCL to this GPU up front
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=_dt.timedelta(seconds=self.timeout_s), **kwargs)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {self.rank} of {self.world_size} could not join the {self.backend} process "
                                   f"group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {e}") from e
        self._owns_group = True
        return self

    def shutdown(self) -> None:
        """Leave the process group this context created (others are left alone)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> DistContext:
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def _active(self) -> bool:
        return self.is_distributed and dist.is_available() and dist.is_initialized()

    # -- model and data ---------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, method: str = "forward", find_unused_parameters: bool = False,
                   sync_batchnorm: bool = True) -> nn.Module:
        """Move ``model`` to the rank's device and return the module to call in the training step.

        Distributed: ``DistributedDataParallel`` (gradients averaged across ranks during the
        backward pass) around ``model``, or around a shim calling ``model.<method>`` when the
        loop uses a method other than ``forward`` (DDP only synchronises what runs through its
        own ``forward``). ``sync_batchnorm`` first swaps every batch norm for ``SyncBatchNorm``
        (CUDA) or :class:`GlobalBatchNorm` (CPU) in place (same parameters and state-dict keys,
        so ``model`` is still what gets saved). ``find_unused_parameters``: True when some parameters get no
        gradient in a step (e.g. the PSCL projector with the contrastive term off).

        Single process: ``model`` itself (or the method shim), so the call site is the same.
        """
        model.to(self.device)
        if self.is_distributed and sync_batchnorm:
            if self.device.type == "cuda":
                model = _convert_in_place(model, nn.SyncBatchNorm.convert_sync_batchnorm)
            else:
                model = _convert_in_place(model, convert_batchnorm)
        net: nn.Module = model if method == "forward" else _MethodForward(model, method)
        if not self._active:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Synchronised batch norms keep identical buffers on every rank: no need to re-send them
        # before every forward (they are still synchronised once, here).
        return DistributedDataParallel(net, device_ids=ids, output_device=ids[0] if ids else None,
                                       find_unused_parameters=find_unused_parameters,
                                       forward_sync_buffers=not sync_batchnorm)

    def make_sampler(self, dataset: Sized, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> DistributedSampler:
        """A ``DistributedSampler`` over ``dataset`` for this rank, for every world size (also 1):
        the order is a permutation seeded by ``seed + epoch`` (call ``set_epoch`` each epoch) and
        rank ``r`` takes indices ``r, r + N, ...``, so with a per-rank batch of ``B / N`` the
        ranks' batches together equal the single-process batches of size ``B``. Without
        ``drop_last`` the order is padded by repeating samples to a multiple of the world size."""
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                  seed=int(seed), drop_last=drop_last)

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce_mean(self, value: Tensor | float) -> Tensor | float:
        """The mean of ``value`` over all ranks (a float stays a float; a tensor is averaged
        element-wise and returned detached). Every rank must call it, in the same order."""
        if not self._active:
            return value
        as_float = not isinstance(value, Tensor)
        t = torch.as_tensor(value, dtype=torch.float64 if as_float else None).detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= self.world_size
        return float(t.item()) if as_float else t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one (e.g. a cancel request or a
        non-finite loss), so all ranks leave the loop at the same step."""
        if not self._active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. before other ranks read what rank 0 wrote)."""
        if not self._active:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (a decision only rank 0 can take, e.g. the path
        of a checkpoint it found)."""
        if not self._active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def _convert_in_place(model: nn.Module, convert: Any) -> nn.Module:
    """Apply a batch-norm converter to ``model``'s children so that the caller's ``model``
    object itself holds the converted layers (it is what gets saved)."""
    converted = convert(model)
    if converted is not model:
        raise DistributedError(f"{type(model).__name__} is itself a batch norm layer; wrap a model, not a layer")
    return model


class _MethodForward(nn.Module):
    """``forward`` that calls another method of the wrapped model (for DDP, see ``wrap_model``)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise DistributedError(f"{type(model).__name__} has no method {method!r} to train through")
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


def unwrap_model(net: nn.Module) -> nn.Module:
    """The original model behind :meth:`DistContext.wrap_model`'s result (what gets saved)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel):
        net = net.module
    if isinstance(net, _MethodForward):
        net = net.model
    return net


# ---------------------------------------------------------------------------------------------
# batch normalisation over the global batch, on every device
# ---------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks: every rank's output is the
    same function of all inputs, so each input's gradient collects every rank's output grad."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        g = grad.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for any device and backend (``torch.nn.SyncBatchNorm``
    is GPU-only, and DDP refuses it on CPU modules). In training with an initialised process
    group the input is normalised with the mean and biased variance of the global batch (two
    all-reduced passes: sums, then squared deviations, for the accuracy of a one-process batch
    norm) and the running statistics are updated as ``nn.BatchNorm`` does (unbiased variance,
    momentum or cumulative average). Evaluation and single processes are plain batch norm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - the parent's parameter name
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the parent's parameter name
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_n = input.numel() // max(input.shape[1], 1)
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), input.new_tensor([float(local_n)])]), group)
        n = sums[-1].detach()
        if n.item() < 2:
            raise DistributedError(f"batch norm over a global batch of {int(n.item())} value(s) per channel: "
                                   "use a larger batch")
        mean = sums[:-1] / n
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), group) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch norm inside ``module`` by a :class:`GlobalBatchNorm` sharing its
    parameters and buffers (in place; a batch norm passed as ``module`` itself is returned
    converted). State-dict keys do not change, so checkpoints load into the plain model.
    For CUDA models :meth:`DistContext.wrap_model` uses ``torch.nn.SyncBatchNorm`` instead
    (fused kernels)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, process_group)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        converted = convert_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
