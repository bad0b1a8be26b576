"""Stage two against a correction budget (issue 13): the weak-to-full gap, measured.

For each cached stage-one run of ``bench/stage1_quality.py`` (``--config``, ``--splits`` x
``--seeds`` in ``--work``):

1. the stage-one pseudo-masks of every training patch are made as ``histo-wsss pseudo-masks RUN
   TRAIN_DIR OUT`` makes them (core ``generate_pseudo_masks``, default gating: ``prob-raw`` at the
   probability threshold and offsets the run's validation images chose; the file-name labels are
   not used), once, into ``--out/pseudo/<run>``;
2. each patch's pseudo-mask is scored against its ground truth (cut from the source WSSS4LUAD
   mask at the patch's ``patches.csv`` coordinates, as ``--full-supervision`` cuts it): the mIoU
   over the classes present in either, on the ground truth's tissue pixels;
3. for each budget ``K`` of ``--budgets`` (percent of the training patches), an oracle corrects
   the ``round(K% x n)`` patches with the lowest such IoU: the whole patch gets its ground-truth
   mask with every pixel flagged as corrected, so stage two overrides the pseudo-mask there and
   weights those pixels ``SegConfig.corrected_weight`` - the product's handling of a
   pathologist's corrections (``SegSample.corrected``, as ``_project_samples`` gives it for a
   project); ``K = 0`` is the same pseudo-mask folder uncorrected (the baseline of this curve);
4. stage two is trained as ``bench/stage2_quality.py`` trains it (``SegConfig`` defaults, the
   budget ``--epochs`` x ``--max-steps``, the run's seed, ``best.pt`` by the split's validation
   images) but on that one pseudo-mask folder, and scored on the test images with the same
   ``Scorer`` (MLPS convention: background ground truth ignored), ungated and gated by the
   stage-one classifier (``predict --gate``) at its validation threshold.

Nothing is chosen on the test images. The oracle's pick needs the training patches' ground
truth only. Beside the curve: the baselines of ``stage1_quality.py`` (one class, per-image
majority oracle) on the same test images.

    python bench/stage2_corrections.py --splits 0 --seeds 0,1,2 --budgets 0,10,30,100 --threads 1

Everything is cached under ``--out`` (results in ``--out/results.json``); a Markdown table goes to
stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from stage1_quality import CONFIGS, Scorer, baselines, patch_set, summarise
from stage2_quality import score_segmenter

from napari_histo_wsss.core.data.datasets import load_dataset, read_index_mask
from napari_histo_wsss.core.engine import run_training
from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings, generate_pseudo_masks
from napari_histo_wsss.core.stage1.train import calibrated_offsets, calibrated_prob_threshold, load_run
from napari_histo_wsss.core.stage2.train import SegConfig, SegmenterTask, SegSample, _source_masks


def make_pseudo_masks(run: Path, images_dir: Path, out: Path) -> Path:
    """``histo-wsss pseudo-masks RUN IMAGES_DIR OUT`` with its defaults, through the core functions."""
    if out.is_dir() and any(out.glob("*.png")):
        return out
    model, classes, cfg = load_run(run, "best")
    threshold = calibrated_prob_threshold(run, "best")
    settings = PseudoMaskSettings(mode=cfg.cam_mode, window=cfg.patch_size,
                                  prob_threshold=0.5 if threshold is None else threshold)
    if settings.gating != "prob" and settings.offsets is None:
        found = calibrated_offsets(run, "best", settings.gating)
        settings.offsets = tuple(found) if found is not None else None
    settings.validate()
    for _ev in generate_pseudo_masks(model, classes, images_dir, out, settings, device="cpu", overwrite=True):
        pass
    return out


def patch_iou(pred: np.ndarray, gt: np.ndarray, bg: int) -> float:
    """mIoU of one patch's mask against its ground truth over the tissue classes present in either,
    on the ground truth's tissue pixels (background ground truth ignored and no background IoU, as
    the scorer does; a tissue pixel the mask leaves background counts against its class); 1.0 for a
    patch without tissue in its ground truth (nothing to correct)."""
    tissue = gt != bg
    if not tissue.any():
        return 1.0
    p, g = pred[tissue], gt[tissue]
    ious = []
    for c in np.setdiff1d(np.union1d(np.unique(p), np.unique(g)), [bg]):
        inter = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def worst_patches(ious: dict[str, float], percent: float) -> list[str]:
    """The oracle's pick: the ``round(percent% x n)`` names with the lowest IoU (ties by name)."""
    k = int(round(len(ious) * percent / 100.0))
    return [name for name, _ in sorted(ious.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


class CorrectedTask(SegmenterTask):
    """Stage two on one pseudo-mask folder with the oracle's corrections on the patches it picked:
    their ground truth overrides the pseudo-mask on every pixel, flagged as corrected."""

    def __init__(self, run: Path, pseudo_masks: Path, cfg: SegConfig, dataset: Path,
                 corrected: dict[str, object]):
        super().__init__(run, pseudo_masks, cfg, dataset)
        self.corrected = corrected  # patch name -> loader of its ground-truth mask

    def prepare(self, ctx):
        yield from super().prepare(ctx)
        correct_samples(self.samples, self.corrected)
        self.source += f" + {len(self.corrected)} patches corrected to ground truth"


def correct_samples(samples: list[SegSample], corrected: dict) -> None:
    """Give each sample named in ``corrected`` (name -> loader of its ground-truth mask) that mask
    as a correction flagged on every pixel, as a pathologist's corrections reach stage two."""
    for s in samples:
        load = corrected.get(s.name)
        if load is not None:
            s.corrected = lambda load=load: (lambda m: (m, np.ones(m.shape, dtype=bool)))(load())


def run_one(work: Path, out_root: Path, name: str, split: int, seed: int, budgets: list[float], epochs: int,
            max_steps: int | None, scorer: Scorer, results: dict, save) -> None:
    patch, stride, _ = CONFIGS[name]
    ps = patch_set(work, patch, stride, split)
    run = work / "runs" / f"{name}-split{split}-seed{seed}"
    if not (run / "bench_train.json").is_file():
        raise SystemExit(f"{run}: no stage-one run; train it with bench/stage1_quality.py first")
    spec = load_dataset(ps)
    bg = spec.classes.background_index
    tag = f"{name}-split{split}-seed{seed}"
    t0 = time.perf_counter()
    pm = make_pseudo_masks(run, spec.train[0].path.parent, out_root / "pseudo" / tag)
    gts = dict(zip((s.name for s in spec.train), _source_masks(spec)))
    ious_path = out_root / "pseudo" / f"{tag}-ious.json"
    if ious_path.is_file():
        ious = json.loads(ious_path.read_text())
    else:
        ious = {n: patch_iou(read_index_mask(pm / f"{n}.png", spec.classes), load(), bg) for n, load in gts.items()}
        ious_path.write_text(json.dumps(ious, indent=0))
        print(f"  {tag}: pseudo-masks of {len(ious)} training patches, mean patch IoU "
              f"{np.mean(list(ious.values())):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for k in budgets:
        key = f"{tag}-k{k:g}-e{epochs}-s{max_steps}"
        if key in results:
            continue
        chosen = worst_patches(ious, k)
        out = out_root / "seg" / key
        done = out / "bench_train.json"
        t1 = time.perf_counter()
        if not done.is_file():
            cfg = SegConfig(epochs=epochs, max_steps_per_epoch=max_steps, seed=seed, device="cpu")
            task = CorrectedTask(run, pm, cfg, ps, {n: gts[n] for n in chosen})
            for ev in run_training(task, cfg, out, (out / "checkpoints").is_dir(), None):
                if ev.kind == "epoch":
                    print(f"  {key} epoch {ev.epoch}/{ev.epochs} loss {ev.metrics['train_loss']:.4f} "
                          f"val mIoU {ev.metrics.get('val_miou')} {time.perf_counter() - t1:.0f}s", flush=True)
            done.write_text(json.dumps({"train_s": time.perf_counter() - t1}))
        r = score_segmenter(out, run, ps, scorer)
        corrected_iou = [ious[n] for n in chosen]
        r |= {"k_percent": k, "n_corrected": len(chosen), "n_train": len(ious),
              "pseudo_patch_iou": float(np.mean(list(ious.values()))),
              "corrected_patch_iou": float(np.mean(corrected_iou)) if corrected_iou else None,
              "train_s": json.loads(done.read_text())["train_s"]}
        results[key] = r
        save()
        print(f"{key}: {len(chosen)} patches corrected, mIoU {r['miou']:.3f}, gated {r['gated']['miou']:.3f}, "
              f"train {r['train_s']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="steps-fused-p128", help=f"stage-one configuration, of {', '.join(CONFIGS)}")
    p.add_argument("--splits", default="0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0,10,30,100", help="percent of the training patches the oracle corrects")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=30, help="steps per epoch at most (CPU budget)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/s1qall", help="stage1_quality.py's work folder (runs, patch sets)")
    p.add_argument("--out", default="/tmp/s1qcorr", help="this benchmark's cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out_root = Path(args.work), Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    budgets = [float(b) for b in args.budgets.split(",")]
    splits = [int(x) for x in args.splits.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    patch, stride, _ = CONFIGS[args.config]

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    scorer = Scorer(load_dataset(patch_set(work, patch, stride, splits[0])).classes)
    base = {}
    for split in splits:
        base[split] = baselines(patch_set(work, patch, stride, split), scorer)
    # budgets outermost: every run's K=0 first, so a cut-short benchmark still has whole rows
    for k in budgets:
        for split in splits:
            for seed in seeds:
                run_one(work, out_root, args.config, split, seed, [k], args.epochs, args.max_steps, scorer,
                        results, save)
    s2 = json.loads((work / "stage2.json").read_text()) if (work / "stage2.json").is_file() else {}
    print(table(results, base, s2, args.config, splits, seeds, budgets, args.epochs, args.max_steps))
    return 0


def table(results: dict, base: dict, s2: dict, name: str, splits: list[int], seeds: list[int], budgets: list[float],
          epochs: int, max_steps: int | None) -> str:
    lines = ["| row | n | patches corrected | their mean pseudo-mask IoU | mIoU | tumour/stroma mIoU | gated mIoU | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(budgets):
        rows = [results[key] for split in splits for seed in seeds
                if (key := f"{name}-split{split}-seed{seed}-k{k:g}-e{epochs}-s{max_steps}") in results]
        if not rows:
            continue
        lines.append(f"| K = {k:g}% | {len(rows)} runs | {np.mean([r['n_corrected'] for r in rows]):.0f} | "
                     f"{summarise([r['corrected_patch_iou'] for r in rows])} | {summarise([r['miou'] for r in rows])} | "
                     f"{summarise([r['ts_miou'] for r in rows])} | "
                     f"{summarise([r['gated']['miou'] for r in rows])} | {seconds([r['train_s'] for r in rows])} |")
    ref = [s2[key] for split in splits for seed in seeds
           if (key := f"{name}-split{split}-seed{seed}-e{epochs}-s{max_steps}") in s2]
    if ref:
        lines.append(f"| reference: stage2_quality.py (three MLPS sets, label-gated; stage2.json) | {len(ref)} runs | | | "
                     f"{summarise([r['miou'] for r in ref])} | {summarise([r['ts_miou'] for r in ref])} | "
                     f"{summarise([r['gated']['miou'] for r in ref])} | "
                     f"{seconds([r['train_s'] for r in ref])} |")
    for b in ("one class", "majority oracle"):
        rows = [base[s][b] for s in splits]
        lines.append(f"| baseline: {b} | {len(rows)} splits | | | {summarise([r['miou'] for r in rows])} | "
                     f"{summarise([r['ts_miou'] for r in rows])} | | |")
    # paired: each budget minus K = 0 of the same run (same stage-one classifier, same seed)
    for k in sorted(budgets):
        diffs = {m: [] for m in ("miou", "ts_miou", "gated")}
        for split in splits:
            for seed in seeds:
                at, zero = (results.get(f"{name}-split{split}-seed{seed}-k{x:g}-e{epochs}-s{max_steps}") for x in (k, 0))
                if k and at is not None and zero is not None:
                    diffs["miou"].append(at["miou"] - zero["miou"])
                    diffs["ts_miou"].append(at["ts_miou"] - zero["ts_miou"])
                    diffs["gated"].append(at["gated"]["miou"] - zero["gated"]["miou"])
        if diffs["miou"]:
            lines.append(f"\nK = {k:g}% minus K = 0, run for run ({len(diffs['miou'])} runs): mIoU "
                         f"{summarise(diffs['miou'])}, tumour/stroma mIoU {summarise(diffs['ts_miou'])}, "
                         f"gated mIoU {summarise(diffs['gated'])}")
    return "\n".join(lines)


def seconds(values: list) -> str:
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


if __name__ == "__main__":
    sys.exit(main())
