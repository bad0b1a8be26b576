"""CPU throughput of the stage-one classifier backbones, measured side by side in one run.

For each backbone and patch size: a CAMClassifier (4 classes, output stride 16 unless --os) is
timed for a training step's forward + backward (multi-label soft-margin loss, batch --batch),
for an inference forward (eval, no grad) and for multi-layer CAMs (``cams(x, "multi")``, which
needs one backward per class). Reports patches/s (median of --repeats timed runs after one
warm-up) and the ratio to the first backbone at the same size.

    python bench/bench_models.py                      # lite0, lite1, resnet18, resnet50 at 224 and 128 px
    python bench/bench_models.py --models efficientnet-lite0 --os 8 16 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from napari_histo_wsss.core.models import CAMClassifier


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, size: int, output_stride: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = CAMClassifier(4, backbone=name, weights="none", output_stride=output_stride)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, 4) > 0.5).float()

    def train_step():
        model.zero_grad(set_to_none=True)
        F.multilabel_soft_margin_loss(model(x), y).backward()

    def infer():
        with torch.no_grad():
            model(x)

    def cams():
        model.cams(x, "multi")

    model.train()
    t_train = _median_time(train_step, repeats)
    model.eval()
    t_infer = _median_time(infer, repeats)
    t_cams = _median_time(cams, repeats)
    return {"model": name, "size": size, "os": output_stride, "train": batch / t_train, "infer": batch / t_infer,
            "cams": batch / t_cams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "efficientnet-lite1", "resnet18", "resnet50"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 128])
    ap.add_argument("--os", nargs="+", type=int, default=[16], dest="strides")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, batch {args.batch}, median of {args.repeats}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    rows = [bench(m, s, o, args.batch, args.repeats) for s in args.sizes for o in args.strides for m in args.models]
    print("| backbone | px | OS | train fwd+bwd patches/s | ratio | inference patches/s | ratio | multi-layer CAMs patches/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(q for q in rows if q["size"] == r["size"])
        print(f"| {r['model']} | {r['size']} | {r['os']} | {r['train']:.1f} | {r['train'] / ref['train']:.2f} | "
              f"{r['infer']:.1f} | {r['infer'] / ref['infer']:.2f} | {r['cams']:.1f} | {r['cams'] / ref['cams']:.2f} |")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
