"""GPU check: the pipeline's CLI on a CUDA device with AMP, and its throughput beside the CPU's.

Run through ``bash bench/gpu_check.sh`` (which sets up a Python with torch first); on its own:

    python bench/gpu_check.py --device cuda --out OUT     # the real check (a few minutes)
    python bench/gpu_check.py --device cpu --tiny --out OUT  # dry run of every step, tiny sizes

Steps, each timed and its log kept in ``OUT/logs``:

1. training data: ``make-patches`` over the shared WSSS4LUAD images (``HISTO_WSSS_DATA``) as the
   demo does, or, when they are absent (a bare GPU machine), over image/mask pairs cut from the
   bundled slide ``CMU-1-Small-Region.svs`` (masks from a colour rule: haematoxylin-dense,
   eosin-dense, other tissue, white glass; enough to train and measure, not to score);
2. ``train-cls`` (SegMix) and ``train-seg`` (MLPS + Mosaic/Bezier synthesis), two short epochs
   each, on the device with AMP (the default);
3. ``predict`` of the bundled slide into an OME-Zarr label pyramid;
4. throughput of the same model steps in this process: on the device, and on this machine's CPU.

Writes ``OUT/gpu_check.md`` (a section to paste into ``docs/benchmarks.md``, with the 2-core dev
machine's CPU figures beside) and ``OUT/gpu_check.json``. Exits 0 when every step ran, 1 if
one failed (the report says which and why).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SLIDE = ROOT / "src" / "napari_histo_wsss" / "data" / "CMU-1-Small-Region.svs"

#: CPU figures of the 2-core dev machine (AMD EPYC, 2 logical CPUs, torch 2.13.0+cpu), from
#: docs/benchmarks.md: bench_models.py (2026-11-23) and bench_threads.py (issue 11). Keys as in
#: :func:`throughput`.
DEV_CPU = {
    "s1_train": ("4.9", "bench_models.py, 2 threads"),
    "s1_infer": ("27.0", "bench_models.py, 2 threads"),
    "s2_step": ("2.7", "bench_threads.py, new policy alone: 2.91 s per batch of 8"),
    "tiles": ("1.3", "bench_infer.py bare predict_fn, batch 4, 1 thread"),
}


class Budget:
    """Wall-clock budget of the whole check: later steps are skipped (and say so) when it runs out."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _cli(args: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m napari_histo_wsss ARGS``; returns status, seconds and the output tail."""
    cmd = [sys.executable, "-m", "napari_histo_wsss", *map(str, args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0), env=env)
        status, out = ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    secs = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("$ histo-wsss " + " ".join(map(str, args)) + "\n" + out)
    tail = [ln for ln in re.split(r"[\r\n]+", out) if ln.strip()][-3:]
    print(f"[gpu_check] histo-wsss {args[0]}: {status} in {secs:.1f} s", flush=True)
    if status != "ok":
        print("\n".join(tail), flush=True)
    return {"command": "histo-wsss " + " ".join(map(str, args)), "status": status, "seconds": secs, "tail": tail}


def slide_dataset(dest: Path, n: int, size: int, block: int) -> tuple[Path, Path]:
    """``n`` image/mask pairs of ``size`` px cut from the bundled slide where it holds tissue.

    The masks are made up from the stain, block by block (``block`` = the training patch size):
    each block's tissue takes one of WSSS4LUAD's three classes by the tertile of its mean
    haematoxylin-minus-eosin density over all blocks, white glass is background (3). So patches
    on the block grid are single-label and the others mixed, as the MLPS pseudo-masks and the
    synthesis pools need; enough to train and time the pipeline, not to score it."""
    import numpy as np
    from PIL import Image
    from skimage.color import rgb2hed

    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.slides.tissue import white_background_mask

    img_dir, mask_dir = dest / "img", dest / "mask"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    pairs = []
    with open_slide(SLIDE) as slide:
        w, h = slide.dimensions
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                rgb = np.ascontiguousarray(slide.read_region((x, y), 0, (size, size))[..., :3])
                white = white_background_mask(rgb)
                if white.mean() > 0.5:
                    continue
                hed = rgb2hed(rgb)
                score = (hed[..., 0] - hed[..., 1]).reshape(size // block, block, size // block, block).mean(axis=(1, 3))
                pairs.append((x, y, rgb, white, score))
                if len(pairs) == n:
                    break
            if len(pairs) == n:
                break
    if len(pairs) < 4:
        raise SystemExit(f"the bundled slide gave only {len(pairs)} tissue images of {size} px")
    lo, hi = np.quantile(np.concatenate([p[4].ravel() for p in pairs]), [1 / 3, 2 / 3])
    for x, y, rgb, white, score in pairs:
        cls = np.where(score > hi, 0, np.where(score < lo, 1, 2)).astype(np.uint8)  # tumour / stroma / normal
        mask = np.kron(cls, np.ones((block, block), np.uint8))
        mask[white] = 3
        Image.fromarray(rgb).save(img_dir / f"cmu_{x}_{y}.png")
        Image.fromarray(mask).save(mask_dir / f"cmu_{x}_{y}.png")
    return img_dir, mask_dir


def throughput(device: str, tiny: bool, repeats: int) -> dict:
    """Median throughput of the model steps the pipeline runs, with AMP where the device has it:
    stage-one classifier (train fwd+bwd, inference; EfficientNet-Lite0, output stride 16, batch
    16 of 224 px), stage-two step (Segmenter with the image-level head + AdamW, batch 8 of 224 px)
    and segmenter inference on 512-px tiles (batch 8)."""
    import torch
    import torch.nn.functional as F

    from napari_histo_wsss.core.device import apply_thread_policy, autocast, grad_scaler
    from napari_histo_wsss.core.models import CAMClassifier, Segmenter, parameter_groups

    apply_thread_policy(gui=False)
    dev = torch.device(device)
    s, tile, b1, b2 = (64, 128, 2, 2) if tiny else (224, 512, 16, 8)

    def timed(fn, n_items: int) -> float:
        fn()
        fn()  # warm-up: allocator, cuDNN/oneDNN kernel choice
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return n_items / statistics.median(times)

    torch.manual_seed(0)
    out: dict = {"device": device, "threads": torch.get_num_threads()}
    cls = CAMClassifier(4, "efficientnet-lite0", weights="none", output_stride=16).to(dev)
    x1, y1 = torch.randn(b1, 3, s, s, device=dev), (torch.rand(b1, 4, device=dev) > 0.5).float()
    scaler = grad_scaler(dev)

    def s1_train():
        cls.zero_grad(set_to_none=True)
        with autocast(dev):
            loss = F.multilabel_soft_margin_loss(cls(x1).float(), y1)
        scaler.scale(loss).backward()

    def s1_infer():
        with torch.no_grad(), autocast(dev):
            cls(x1)

    cls.train()
    out["s1_train"] = timed(s1_train, b1)
    cls.eval()
    out["s1_infer"] = timed(s1_infer, b1)
    cls = None  # frees the model before stage two (the closures above are done with it)
    seg = Segmenter(4, "efficientnet-lite0", weights="none", output_stride=16, aux_head=True).to(dev).train()
    opt = torch.optim.AdamW(parameter_groups(seg, 3e-4), weight_decay=1e-4)
    x2 = torch.randn(b2, 3, s, s, device=dev)
    y2 = torch.randint(0, 4, (b2, s, s), device=dev)
    labels = (torch.rand(b2, 4, device=dev) > 0.5).float()
    scaler = grad_scaler(dev)

    def s2_step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev):
            logits, aux_logits, _cam = seg(x2, return_aux=True)
            loss = F.cross_entropy(logits.float(), y2) + 0.1 * F.multilabel_soft_margin_loss(aux_logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    out["s2_step"] = timed(s2_step, b2)
    seg.eval()
    xt = torch.randn(b2, 3, tile, tile, device=dev)

    def tiles():
        with torch.no_grad(), autocast(dev):
            seg(xt).softmax(1)

    out["tiles"] = timed(tiles, b2)
    if dev.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    out["sizes"] = {"patch": s, "tile": tile, "batch_s1": b1, "batch_s2": b2}
    return out


def _metrics_line(path: Path) -> dict:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (dry run)")
    ap.add_argument("--out", required=True, help="folder for gpu_check.md, gpu_check.json and logs/")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run of every step on the CPU)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the whole check")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()

    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t_start = time.perf_counter()
    import torch

    from napari_histo_wsss.core.io.atomic import write_json, write_text

    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": args.device, "tiny": args.tiny,
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    }
    print(f"[gpu_check] {info}", flush=True)
    steps: dict[str, dict] = {}
    tiny = args.tiny
    env = dict(os.environ)

    # 1. training data ----------------------------------------------------------------------------
    data = Path(os.environ.get("HISTO_WSSS_DATA", ROOT.parent / "shared" / "data")) / "wsss4luad-subset" / "val"
    patches = work / "patches"
    patch = 64 if tiny else 224
    if (data / "img").is_dir() and not tiny:
        img_dir, mask_dir, source = data / "img", data / "mask", f"shared WSSS4LUAD images ({data})"
    else:
        size = 128 if tiny else 448
        img_dir, mask_dir = slide_dataset(work / "slide_pairs", 8 if tiny else 16, size, patch)
        source = f"{len(list(img_dir.glob('*.png')))} image/mask pairs of {size} px cut from {SLIDE.name} (stain-rule masks)"
    steps["make-patches"] = _cli(["make-patches", img_dir, mask_dir, patches, "--classes", "wsss4luad", "--patch-size", patch,
                                  "--stride", patch // 2, "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "0"],
                                 out / "logs" / "make-patches.log", budget.left(), env)
    n_patches = len(list((patches / "train").glob("*.png"))) if (patches / "train").is_dir() else 0
    steps["make-patches"]["figure"] = f"{n_patches} training patches of {patch} px from {source}"

    # 2. training on the device (AMP is the default) --------------------------------------------------
    run = work / "run"
    dev_args = ["--device", args.device]
    cls_steps, seg_steps, epochs = (2, 2, 1) if tiny else (40, 40, 2)
    if steps["make-patches"]["status"] == "ok":
        steps["train-cls"] = _cli(["train-cls", patches, run, "--method", "segmix", "--epochs", epochs, "--batch-size", 4 if tiny else 16,
                                   "--max-steps-per-epoch", cls_steps, "--weights", "none", "--seed", "0", *dev_args],
                                  out / "logs" / "train-cls.log", min(budget.left(), 150), env)
        m = _metrics_line(run / "metrics.jsonl")
        if m:
            steps["train-cls"]["figure"] = (f"{m.get('patches_per_s', 0):.1f} patches/s (compute {m.get('compute_s', 0):.1f} s, "
                                            f"data {m.get('data_s', 0):.1f} s, validation {m.get('val_s', 0):.1f} s)")
    if steps.get("train-cls", {}).get("status") == "ok":
        steps["train-seg"] = _cli(["train-seg", run, "--dataset", patches, "--epochs", epochs, "--max-steps-per-epoch", seg_steps,
                                   "--synthesis", "mosaic,bezier", "--weights", "none", "--batch-size", 4 if tiny else 8, *dev_args],
                                  out / "logs" / "train-seg.log", min(budget.left(), 180), env)
        m = _metrics_line(run / "segmenter" / "metrics.jsonl")
        if m:
            steps["train-seg"]["figure"] = (f"{m.get('epoch')} epochs of at most {seg_steps} steps in {m.get('seconds', 0):.1f} s incl. validation "
                                            f"(train loss {m.get('train_loss', float('nan')):.3f})")
    if steps.get("train-seg", {}).get("status") == "ok":
        zarr = work / "slide.ome.zarr"
        pred = ["predict", run, SLIDE, zarr, *dev_args] + (["--downsample", "8", "--tile", "128", "--overlap", "16"] if tiny else [])
        steps["predict"] = _cli(pred, out / "logs" / "predict.log", min(budget.left(), 90), env)
        found = re.findall(r"(\d+) tiles in ([\d.]+) s", "\n".join(steps["predict"]["tail"]) + "\n" +
                           (out / "logs" / "predict.log").read_text())
        if found:
            n, secs = int(found[-1][0]), float(found[-1][1])
            steps["predict"]["figure"] = f"{n} tissue tiles in {secs:.1f} s = {n / max(secs, 1e-9):.2f} tiles/s (end to end, written to zarr)"

    # 3. throughput of the model steps: the device, then this machine's CPU -----------------------------
    rates: dict[str, dict] = {}
    for dev in dict.fromkeys([args.device, "cpu"]):
        if budget.left() < (10 if tiny else 60):
            rates[dev] = {"skipped": f"time budget spent ({budget.left():.0f} s left)"}
            continue
        t0 = time.perf_counter()
        try:
            rates[dev] = throughput(dev, tiny, 1 if tiny or dev == "cpu" else 10)
        except Exception as e:  # noqa: BLE001 - reported in the results, the other figures still count
            rates[dev] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[gpu_check] throughput on {dev}: {rates[dev]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    total = time.perf_counter() - t_start
    failed = [k for k, v in steps.items() if v["status"] != "ok"] + [k for k, v in rates.items() if "error" in v]
    report = _report(info, steps, rates, total, args, work)
    write_text(out / "gpu_check.md", report)
    write_json(out / "gpu_check.json", {"info": info, "steps": steps, "throughput": rates, "seconds": total, "failed": failed})
    print(report, flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or len(steps) < 4 else 0


def _report(info: dict, steps: dict, rates: dict, total: float, args: argparse.Namespace, work: Path) -> str:
    dev = args.device
    where = f"{info['gpu']} (CUDA {info['cuda_build']}, AMP {'bfloat16' if info['bf16'] else 'float16'})" if info["gpu"] else "no GPU"
    lines = [
        f"## gpu: the CLI on {'a CUDA GPU with AMP' if dev != 'cpu' else 'the CPU (dry run)'} and throughput beside the CPU",
        "",
        f"`bash bench/gpu_check.sh{' --cpu' if dev == 'cpu' else ''}` ({total:.0f} s), {info['date']}: {where}; "
        f"{info['cpus']} CPUs; torch {info['torch']}, Python {info['python']}{'; TINY sizes (dry run)' if info['tiny'] else ''}.",
        "",
        "| step | status | seconds | figure |",
        "|---|---|---|---|",
    ]
    for name in ("make-patches", "train-cls", "train-seg", "predict"):
        s = steps.get(name)
        if s is None:
            lines.append(f"| {name} | not run (an earlier step failed) | | |")
        else:
            lines.append(f"| `{s['command'].replace(str(work), '$WORK').replace(str(ROOT) + '/', '')}` | {s['status']} | "
                         f"{s['seconds']:.1f} | {s.get('figure', '')} |")
    d, c = rates.get(dev, {}), rates.get("cpu", {})
    sizes = d.get("sizes") or c.get("sizes") or {}

    def cell(r: dict, key: str) -> str:
        if "error" in r:
            return "error"
        if "skipped" in r:
            return "skipped"
        return f"{r[key]:.1f}" if key in r else ""

    what = {
        "s1_train": f"stage-one classifier train fwd+bwd, Lite0 OS16, batch {sizes.get('batch_s1')} of {sizes.get('patch')} px (patches/s)",
        "s1_infer": "stage-one classifier inference, same (patches/s)",
        "s2_step": f"stage-two step (Segmenter + image head + AdamW), batch {sizes.get('batch_s2')} of {sizes.get('patch')} px (patches/s)",
        "tiles": f"segmenter inference on {sizes.get('tile')}-px tiles, batch {sizes.get('batch_s2')} (tiles/s)",
    }
    lines += [
        "",
        f"| model step | {dev} | CPU, same machine ({c.get('threads', '?')} threads) | {'/'.join(['GPU', 'CPU']) if dev != 'cpu' else 'ratio'} "
        f"| CPU, 2-core dev machine (docs) |",
        "|---|---|---|---|---|",
    ]
    for key, label in what.items():
        ratio = ""
        if key in d and key in c and c[key] > 0:
            ratio = f"{d[key] / c[key]:.1f}x"
        ref, src = DEV_CPU[key]
        lines.append(f"| {label} | {cell(d, key)} | {cell(c, key)} | {ratio} | {ref} ({src}) |")
    if "peak_gpu_mib" in d:
        lines += ["", f"Peak GPU memory of the throughput steps: {d['peak_gpu_mib']:.0f} MiB."]
    for k, r in rates.items():
        if "error" in r or "skipped" in r:
            lines += ["", f"Throughput on {k}: {r.get('error') or r.get('skipped')}."]
    failed = [f"{k}: {v['status']} ({' / '.join(v['tail'])})" for k, v in steps.items() if v["status"] != "ok"]
    if failed:
        lines += ["", "Failures: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
