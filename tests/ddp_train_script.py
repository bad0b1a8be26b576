"""A few steps of CAM-classifier training with :mod:`napari_histo_wsss.core.distributed`, run by
``tests/test_distributed.py`` once as one plain process and once under
``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU) with the same global batch.

It follows the training step of ``core.train`` (``forward_features`` + multi-label soft-margin
loss, SGD with momentum, batch norm in training mode) and writes, from rank 0 only, ``model.pt`` (the
trained weights through ``models.save_model``) and ``log.json`` (global losses per step, the
sample indices every rank used per step, who wrote it).

    python tests/ddp_train_script.py OUT_DIR [--steps 3] [--global-batch 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from napari_histo_wsss.core.atomic import write_json
    from napari_histo_wsss.core.classes import get_preset
    from napari_histo_wsss.core.distributed import DistContext, unwrap_model
    from napari_histo_wsss.core.models import CAMClassifier, save_model

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--no-sync-bn", action="store_true", help="per-rank batch statistics (to see the difference)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with DistContext.from_env("cpu") as ctx:
        classes = get_preset("wsss4luad")
        gen = torch.Generator().manual_seed(1234)  # the same data on every rank and in one process
        images = torch.randn(args.samples, 3, args.size, args.size, generator=gen)
        labels = (torch.rand(args.samples, classes.num_classes, generator=gen) > 0.5).float()
        labels[:, 0] = 1.0
        data = torch.utils.data.TensorDataset(images, labels, torch.arange(args.samples))

        torch.manual_seed(0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
        model = CAMClassifier(classes.num_classes, backbone=args.backbone, weights="none")
        # The projector (PSCL) gets no gradient here, as in core.train with pscl off.
        net = ctx.wrap_model(model, method="forward_features", find_unused_parameters=True,
                             sync_batchnorm=not args.no_sync_bn)
        # SGD: its update is linear in the gradient. (Adam's first steps are about sign(gradient),
        # which turns float rounding on near-zero gradients into full-size, opposite steps.)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sampler = ctx.make_sampler(data, shuffle=True, seed=7)
        loader = torch.utils.data.DataLoader(data, batch_size=ctx.local_batch_size(args.global_batch), sampler=sampler)

        losses: list[float] = []
        seen: list[list[int]] = []
        model.train()
        epoch = 0
        while len(losses) < args.steps:
            sampler.set_epoch(epoch)
            for x, y, idx in loader:
                if len(losses) == args.steps:
                    break
                out = net(x.to(ctx.device), labels=y)
                loss = F.multilabel_soft_margin_loss(out["logits"], y.to(ctx.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(ctx.all_reduce_mean(float(loss.detach()))))
                ids = [None] * ctx.world_size
                if ctx.is_distributed:
                    torch.distributed.all_gather_object(ids, idx.tolist())
                else:
                    ids = [idx.tolist()]
                seen.append(sorted(i for part in ids for i in part))
            epoch += 1
        if ctx.is_main:
            args.out.mkdir(parents=True, exist_ok=True)
            save_model(args.out / "model.pt", unwrap_model(net), {"classes": classes})
            write_json(args.out / "log.json", {"rank": ctx.rank, "world_size": ctx.world_size,
                                               "losses": losses, "samples_per_step": seen})
        ctx.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
