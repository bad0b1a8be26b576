"""Stage-one measurements (issue 3): pseudo-mask mIoU of plain CAM vs SegMix vs SegMix + multi-layer
fusion on held-out images, the effect of make-patches' patch size and stride, and training
throughput split into data loading and compute time.

Every experiment: ``make_patches`` splits the fully annotated images BY IMAGE (seeded) into
training images, cut into weakly labelled patches, and held-out validation images; the
classifier trains on the patches only (``train_classifier``); the best checkpoint's CAMs on the
held-out images become pseudo-masks that are scored against their masks (MLPS convention,
background ignored). Each pseudo-mask is made twice: gated by the image's labels (the WSSS
pseudo-mask setting, labels known) and gated by the predicted probabilities (labels unknown).
A trivial baseline - every tissue pixel of an image gets the labelled class that is most
frequent in the training labels, white glass background - is scored beside them.

Usage (2 CPU cores; one experiment at a time)::

    python bench/stage1_experiments.py methods --dataset wsss4luad --epochs 6
    python bench/stage1_experiments.py methods --dataset glas --epochs 6 --patch-size 128 --stride 128
    python bench/stage1_experiments.py patches --dataset wsss4luad --epochs 6
    python bench/stage1_experiments.py gating --dataset wsss4luad   # re-score the runs in --work

``gating`` trains nothing: it re-scores the best checkpoint of every run already in ``--work``
for the data set on its held-out images, gated by predicted probabilities at each threshold of
``core.stage1.train.PROB_THRESHOLDS`` (the values validation calibrates among), beside the label-gated
score.

Results are appended as JSON lines to ``--results`` (default ``/tmp/histo-wsss-stage1/results.jsonl``)
and printed as a table. Work files (patch sets, runs) go to ``--work`` (never the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_histo_wsss.core.data.datasets import list_images, load_dataset, make_patches
from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.cams import cams_for_image, pseudo_mask
from napari_histo_wsss.core.stage1.train import PROB_THRESHOLDS, TrainConfig, load_run, train_classifier

DATA = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = {  # name -> (method, cam_mode used for feedback/selection during training)
    "cam": ("cam", "last"),
    "segmix": ("segmix", "last"),
    "segmix+multi": ("segmix", "multi"),
}


def source_folders(dataset: str, work: Path) -> tuple[Path, Path, str]:
    """(images, masks, class preset) of a shared data set; GlaS instance masks are converted to
    the 2-class semantic masks of the ``glas`` preset (0 gland, 1 other tissue) in ``work``."""
    if dataset == "wsss4luad":
        root = DATA / "wsss4luad-subset" / "val"
        return root / "img", root / "mask", "wsss4luad"
    if dataset == "glas":
        root = DATA / "glas-testA"
        out = work / "glas-semantic-masks"
        if not out.is_dir():
            tmp = work / ".glas-semantic-masks"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for stem, p in list_images(root / "mask_instance").items():
                inst = np.array(Image.open(p))
                Image.fromarray(np.where(inst > 0, 0, 1).astype(np.uint8)).save(tmp / f"{stem}.png")
            tmp.rename(out)
        return root / "img", out, "glas"
    raise SystemExit(f"unknown dataset {dataset!r}")


def patch_set(dataset: str, work: Path, patch: int, stride: int, val_fraction: float, seed: int) -> tuple[Path, dict]:
    img, mask, preset = source_folders(dataset, work)
    out = work / f"{dataset}-p{patch}-s{stride}-v{val_fraction}-seed{seed}"
    if not (out / "patches.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        make_patches(img, mask, out, preset, patch_size=patch, stride=stride, val_fraction=val_fraction, seed=seed)
    stats = json.loads((out / "make_patches.json").read_text())["statistics"]
    return out, stats


def score(model, spec, patch: int, mode: str, white_background: bool, prior: np.ndarray) -> dict:
    """Pseudo-mask scores of ``model`` on the held-out images: label-gated, probability-gated,
    and the trivial label-only baseline (every tissue pixel gets the image's labelled class with
    the largest training ``prior``)."""
    classes = spec.classes
    k, bg = classes.num_classes + 1, classes.background_index
    cms = {name: ConfusionMatrix(k, bg) for name in ("labels", "probs", "baseline")}
    by_t = {t: ConfusionMatrix(k, bg) for t in PROB_THRESHOLDS}
    t0 = time.perf_counter()
    for s in spec.val:
        rgb, gt = s.image(), s.mask()
        cams, probs = cams_for_image(model, rgb, mode=mode, window=patch)
        cms["labels"].update(pseudo_mask(cams, classes, rgb=rgb, labels=s.labels, white_background=white_background), gt)
        cms["probs"].update(pseudo_mask(cams, classes, rgb=rgb, probs=probs, white_background=white_background), gt)
        for t, cm_t in by_t.items():
            cm_t.update(pseudo_mask(cams, classes, rgb=rgb, probs=probs, prob_threshold=t,
                                    white_background=white_background), gt)
        base = np.full(gt.shape, np.argmax(np.where(s.labels > 0, prior, -1.0)), dtype=np.uint8)
        if white_background:
            base[white_background_mask(rgb)] = bg
        cms["baseline"].update(base, gt)
    names = classes.names + ["background"]
    out = {f"miou_{n}": cm.scores(names)["miou"] for n, cm in cms.items()}
    out["iou_labels"] = cms["labels"].scores(names)["per_class_iou"]
    out["miou_probs_by_threshold"] = {str(t): cm_t.scores(names)["miou"] for t, cm_t in by_t.items()}
    out["cam_s_per_image"] = (time.perf_counter() - t0) / max(len(spec.val), 1)
    return out


def run_one(args, dataset: str, patch: int, stride: int, name: str, epochs: int) -> dict:
    work = Path(args.work)
    ps_dir, stats = patch_set(dataset, work, patch, stride, args.val_fraction, args.seed)
    method, mode = METHODS[name]
    run = work / "runs" / f"{dataset}-p{patch}-s{stride}-{name}-e{epochs}-seed{args.seed}"
    shutil.rmtree(run, ignore_errors=True)
    # the earlier protocol: epochs of one pass over whole patches, nothing frozen, head on the last map
    # (bench/stage1_quality.py measures the step-budgeted defaults)
    cfg = TrainConfig(method=method, epochs=epochs, cam_mode=mode, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, backbone=args.backbone, output_stride=args.output_stride, device="cpu",
                      steps=None, crop_size=None, freeze_bn=False, freeze_stages=0, head="last")
    t0 = time.perf_counter()
    rows = []
    for ev in train_classifier(ps_dir, run, cfg):
        if ev.kind == "epoch":
            rows.append(ev.metrics)
            seg = ev.metrics.get("segmix") or {}
            print(f"  epoch {ev.epoch}/{ev.epochs} loss {ev.metrics['train_loss']:.4f} val mIoU {ev.metrics.get('val_miou')} "
                  f"tile {seg.get('tile')} share {seg.get('share')} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    model, classes, _ = load_run(run, "best")
    spec = load_dataset(ps_dir)
    prior = np.array([stats["class_counts"][n] for n in classes.names], dtype=np.float64)
    wb = dataset != "glas"  # GlaS ground truth has no background: every pixel is gland or other tissue
    res = {"dataset": dataset, "patch": patch, "stride": stride, "method": name, "epochs": epochs,
           "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size, "backbone": args.backbone,
           "output_stride": args.output_stride, "n_patches": stats["n_patches"], "n_train_images": stats["n_images"]["train"],
           "n_val_images": stats["n_images"]["val"], "train_s": train_s,
           "best_epoch": rows[-1]["best_epoch"] if rows else None,
           "data_s": sum(r["data_s"] for r in rows), "compute_s": sum(r["compute_s"] for r in rows),
           "val_s": sum(r["val_s"] for r in rows),
           "patches_per_s": float(np.mean([r["patches_per_s"] for r in rows])) if rows else None,
           "segmix_tiles": [(r["segmix"] or {}).get("tile") for r in rows]}
    for mode_eval in ("last", "multi"):
        res[mode_eval] = score(model, spec, patch, mode_eval, wb, prior)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")
    return res


RUN_NAME = re.compile(r"^(?P<dataset>[a-z0-9]+)-p(?P<patch>\d+)-s(?P<stride>\d+)-(?P<method>.+)-e(?P<epochs>\d+)-seed(?P<seed>\d+)$")


def gating(args) -> str:
    """Re-score the best checkpoint of every finished run of ``args.dataset`` in ``--work``:
    probability-gated pseudo-masks at each of ``PROB_THRESHOLDS`` vs label-gated, with the CAM
    mode the run trained with; a Markdown table (no training)."""
    work = Path(args.work)
    rows = []
    for run in sorted((work / "runs").glob(f"{args.dataset}-p*")):
        m = RUN_NAME.match(run.name)
        if m is None or not (run / "checkpoints" / "best.pt").is_file():
            continue
        patch, stride, seed = int(m["patch"]), int(m["stride"]), int(m["seed"])
        ps_dir, stats = patch_set(args.dataset, work, patch, stride, args.val_fraction, seed)
        model, classes, cfg = load_run(run, "best")
        prior = np.array([stats["class_counts"][n] for n in classes.names], dtype=np.float64)
        r = score(model, load_dataset(ps_dir), patch, cfg.cam_mode, args.dataset != "glas", prior)
        rows.append(f"| {patch}/{stride} {m['method']} {m['epochs']} ep ({cfg.cam_mode}) | "
                    + " | ".join(f"{r['miou_probs_by_threshold'][str(t)]:.3f}" for t in PROB_THRESHOLDS)
                    + f" | {r['miou_labels']:.3f} |")
        print(rows[-1], flush=True)
    head = ("| run (patch/stride, method, epochs, CAM) | " + " | ".join(f"probs > {t}" for t in PROB_THRESHOLDS)
            + " | label-gated |\n|---|" + "---|" * (len(PROB_THRESHOLDS) + 1))
    return head + "\n" + "\n".join(rows)


def table(results: list[dict]) -> str:
    head = (f"{'dataset':<10} {'patch/stride':>12} {'method':<13} {'ep':>3} {'patches':>7} {'train s':>7} "
            f"{'last(lab)':>9} {'multi(lab)':>10} {'last(prob)':>10} {'multi(prob)':>11} {'baseline':>8} {'patch/s':>7} {'data%':>6}")
    lines = [head]
    for r in results:
        frac = r["data_s"] / max(r["data_s"] + r["compute_s"], 1e-9)
        lines.append(
            f"{r['dataset']:<10} {str(r['patch']) + '/' + str(r['stride']):>12} {r['method']:<13} {r['epochs']:>3} "
            f"{r['n_patches']:>7} {r['train_s']:>7.0f} {r['last']['miou_labels']:>9.4f} {r['multi']['miou_labels']:>10.4f} "
            f"{r['last']['miou_probs']:>10.4f} {r['multi']['miou_probs']:>11.4f} {r['last']['miou_baseline']:>8.4f} "
            f"{r['patches_per_s']:>7.1f} {100 * frac:>5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["methods", "patches", "gating"],
                   help="methods: cam vs segmix vs segmix+multi; patches: patch size/stride sweep (plain CAM); "
                        "gating: re-score the runs in --work at each probability threshold")
    p.add_argument("--dataset", default="wsss4luad", choices=["wsss4luad", "glas"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=48)
    p.add_argument("--methods", default="cam,segmix,segmix+multi")
    p.add_argument("--sweep", default="224/224,128/128,128/48,96/32", help="patch/stride pairs for 'patches'")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/histo-wsss-stage1")
    p.add_argument("--results", default="/tmp/histo-wsss-stage1/results.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.what == "gating":
        print(f"\n{args.dataset}: mIoU of the held-out images' pseudo-masks by gating\n" + gating(args))
        return 0
    results = []
    if args.what == "methods":
        jobs = [(args.patch_size, args.stride, m) for m in args.methods.split(",")]
    else:
        jobs = [(int(a), int(b), "cam") for a, b in (s.split("/") for s in args.sweep.split(","))]
    for patch, stride, name in jobs:
        print(f"== {args.dataset} patch {patch} stride {stride} {name} ({args.epochs} epochs)", flush=True)
        results.append(run_one(args, args.dataset, patch, stride, name, args.epochs))
        print(table(results[-1:]).splitlines()[1], flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch threads {args.threads}, torch {torch.__version__}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
