"""Stage-one training throughput: data loading vs compute per step, side by side in one run.

For each (patch size, output stride) it times, on the same make-patches training set,
(1) loading and augmenting one batch exactly as ``train_classifier`` does (PNG decode, resize,
flips/rotations/colour jitter, seeded per item) and (2) one optimisation step of the CAM
classifier (forward, multi-label loss, backward, AdamW) on a ready batch. The ratio says whether
loading could ever be the bottleneck; patches/s is what an epoch achieves when the two run one
after the other (``num_workers=0``, the CPU default).

    python bench/stage1_throughput.py [--patches MAKE_PATCHES_FOLDER]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_histo_wsss.core.data.datasets import WeakLabelDataset, load_dataset
from napari_histo_wsss.core.stage1.train import TrainConfig, _SeededItems, build_model, build_optimizer


def time_loading(ds, batch: int, n_batches: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return (time.perf_counter() - t0) / n_batches


def time_steps(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, n_steps: int) -> float:
    model = build_model(cfg, y.shape[1]).train()
    opt = build_optimizer(model, cfg)
    times = []
    for _ in range(n_steps + 1):  # the first step (allocations) is not counted
        t0 = time.perf_counter()
        loss = F.multilabel_soft_margin_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", default=None,
                   help="a make-patches output folder (default: 128-px patches of the shared WSSS4LUAD images, "
                        "made in a temporary folder)")
    p.add_argument("--sizes", default="128,224")
    p.add_argument("--strides", default="32,16", help="backbone output strides")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        return _run(args, args.patches or _shared_patches(Path(tmp)))


def _shared_patches(tmp: Path) -> Path:
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.data.datasets import make_patches

    data = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    src = data / "wsss4luad-subset" / "val"
    make_patches(src / "img", src / "mask", tmp / "patches", get_preset("wsss4luad"), patch_size=128, stride=64, seed=0)
    return tmp / "patches"


def _run(args: argparse.Namespace, patches: str | Path) -> int:
    spec = load_dataset(patches)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        ds = _SeededItems(WeakLabelDataset(spec.train, size=size, augment=True), seed=0)
        load_s = time_loading(ds, args.batch_size, args.steps)
        x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=args.batch_size)))
        for os_ in (int(s) for s in args.strides.split(",")):
            cfg = TrainConfig(output_stride=os_, weights="imagenet")
            step_s = time_steps(cfg, x, y, args.steps)
            rows.append((size, os_, load_s, step_s))
            print(f"size {size} os {os_}: load {load_s:.3f} s/batch, step {step_s:.3f} s", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores (shared), torch threads {args.threads}, batch {args.batch_size}, "
          f"efficientnet-lite0, median of {args.steps} steps")
    print(f"{'patch':>5} {'os':>3} {'load s/batch':>12} {'step s':>7} {'load/step':>9} {'patches/s':>9}")
    for size, os_, load_s, step_s in rows:
        print(f"{size:>5} {os_:>3} {load_s:>12.3f} {step_s:>7.3f} {load_s / step_s:>9.3f} "
              f"{args.batch_size / (load_s + step_s):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
