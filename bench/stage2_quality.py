"""Stage two on the stage-one runs of ``bench/stage1_quality.py``: how much the segmenter adds over
its own pseudo-masks, on the same test images, under the same protocol.

For each cached stage-one run (``--config``, ``--splits`` x ``--seeds`` in ``--work``; train them
first with ``stage1_quality.py``) a segmenter is trained exactly as ``histo-wsss train-seg RUN``
does (``train_segmenter`` with no pseudo-mask folder: the MLPS sets made from that classifier on
its training patches, gated by their image labels), with ``SegConfig``'s defaults except the
budget (``--epochs``, ``--max-steps``: CPU time). It then predicts the run's test images (whole
images, ``predict_image``, no labels), ungated and gated by the stage-one classifier at the
threshold its validation chose (``predict --gate``), and is scored with the same scorer as stage one
(MLPS convention: background ground truth ignored). Nothing is chosen on the test images: the
checkpoint is ``best.pt`` by the segmenter's own validation images (the split's val set).

Printed beside each run: the stage-one pseudo-mask mIoU of the same run under the default gating
(``prob-raw``, and ``prob-raw-crf``, the default of ``pseudo-masks`` with the dense CRF, from
``--work/results.json``), so the difference is what stage two adds.

    python bench/stage2_quality.py --config steps-fused-p128 --splits 0,1 --seeds 0,1 --threads 1

Results go to ``--work/stage2.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from stage1_quality import CONFIGS, Scorer, patch_set, summarise

from napari_histo_wsss.core.data.datasets import load_dataset
from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings, cams_for_image, logit_maps, presence_gate
from napari_histo_wsss.core.stage1.train import apply_area_calibration, calibrated_prob_threshold, load_run
from napari_histo_wsss.core.stage2.infer import predict_image, segmenter_predict_fn
from napari_histo_wsss.core.stage2.train import SegConfig, load_segmenter, train_segmenter


def train_and_score(work: Path, name: str, split: int, seed: int, epochs: int, max_steps: int | None,
                    scorer: Scorer, pseudo_sets: tuple[str, ...] | None = None) -> dict:
    patch, stride, _ = CONFIGS[name]
    ps = patch_set(work, patch, stride, split)
    run = work / "runs" / f"{name}-split{split}-seed{seed}"
    if not (run / "bench_train.json").is_file():
        raise SystemExit(f"{run}: no stage-one run; train it with bench/stage1_quality.py first")
    tag = "" if pseudo_sets is None else "-" + "+".join(pseudo_sets)
    out = work / "seg" / f"{name}-split{split}-seed{seed}-e{epochs}-s{max_steps}{tag}"
    done = out / "bench_train.json"
    t0 = time.perf_counter()
    if not done.is_file():
        sets = {} if pseudo_sets is None else {"pseudo_sets": pseudo_sets}
        cfg = SegConfig(epochs=epochs, max_steps_per_epoch=max_steps, seed=seed, device="cpu", **sets)
        for ev in train_segmenter(run, None, cfg, dataset=ps, out_dir=out, resume=(out / "checkpoints").is_dir()):
            if ev.kind == "epoch":
                print(f"  seg {name} split {split} seed {seed} epoch {ev.epoch}/{ev.epochs} "
                      f"loss {ev.metrics['train_loss']:.4f} val mIoU {ev.metrics.get('val_miou')} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        done.write_text(json.dumps({"train_s": time.perf_counter() - t0}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = max(rows, key=lambda r: r.get("val_miou") or -1.0)  # best.pt: the highest validation mIoU
    return score_segmenter(out, run, ps, scorer) | {"train_s": json.loads(done.read_text())["train_s"],
                                                    "val_miou": best.get("val_miou")}


def score_segmenter(out: Path, run: Path, ps: Path, scorer: Scorer) -> dict:
    """The segmenter run ``out``'s ``best.pt`` on the test images of ``ps``: scores ungated, and
    ``gated`` ones by the stage-one run ``run``'s classifier."""
    model, classes, _cfg, _meta = load_segmenter(out, "best")
    # ungated, and gated by the stage-one classifier (MLPS test-time gating, `predict --gate`) at the
    # probability threshold the stage-one run's validation chose
    gate, _, cfg_s1 = load_run(run, "best")
    threshold = calibrated_prob_threshold(run, "best") or 0.5
    fns = {"none": segmenter_predict_fn(model, classes, "cpu"),
           "gate": segmenter_predict_fn(model, classes, "cpu", gate=gate, gate_threshold=threshold)}
    # and gated by stage one's own presence rule, as `pseudo-masks` decides it (probability and area
    # floor, with the threshold, floor and offsets the stage-one run's validation chose)
    presence = PseudoMaskSettings(mode=cfg_s1.cam_mode, window=cfg_s1.patch_size, prob_threshold=threshold)
    apply_area_calibration(presence, run, "best")
    cms = {k: scorer.new() for k in (*fns, "area")}
    for s in load_dataset(ps).test:
        rgb, gt = s.image(), s.mask()
        scores = {k: predict_image(rgb, fn) for k, fn in fns.items()}
        probs = cams_for_image(gate, rgb, mode=presence.mode, window=presence.window)[1]
        allowed = presence_gate(logit_maps(gate, rgb), probs, classes, presence, rgb)
        scores["area"] = scores["none"].copy()
        if allowed is not None:
            scores["area"][:classes.num_classes] *= allowed[:, None, None]
        for k, sc in scores.items():
            cms[k].update(np.argmax(sc, axis=0).astype(np.uint8), gt)
    return scorer.result(cms["none"]) | {"gated": scorer.result(cms["gate"]), "gated_area": scorer.result(cms["area"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="steps-fused-p128", help=f"stage-one configuration, of {', '.join(CONFIGS)}")
    p.add_argument("--splits", default="0,1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=30,
                   help="steps per epoch at most (CPU budget); 0: whole epochs, SegConfig's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/s1q")
    p.add_argument("--pseudo-sets", default=None, metavar="SETS",
                   help="SegConfig.pseudo_sets, comma-separated (default: SegConfig's); named in the run folders")
    args = p.parse_args(argv)
    max_steps = args.max_steps or None
    pseudo_sets = tuple(args.pseudo_sets.split(",")) if args.pseudo_sets else None
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    s1 = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {"runs": {}}
    path = work / "stage2.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    scorer = None
    rows = []
    for split in (int(x) for x in args.splits.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            if scorer is None:
                patch, stride, _ = CONFIGS[args.config]
                scorer = Scorer(load_dataset(patch_set(work, patch, stride, split)).classes)
            key = f"{args.config}-split{split}-seed{seed}-e{args.epochs}-s{args.max_steps}" + (
                "" if pseudo_sets is None else "-" + "+".join(pseudo_sets))
            r = train_and_score(work, args.config, split, seed, args.epochs, max_steps, scorer, pseudo_sets)
            stage1 = s1["runs"].get(args.config, {}).get(f"split{split}-seed{seed}", {}).get("prob-raw", {})
            r["stage1_prob_raw"] = (stage1.get("prob") or {}).get("miou")
            crf = s1["runs"].get(args.config, {}).get(f"split{split}-seed{seed}", {}).get("prob-raw-crf", {})
            r["stage1_prob_raw_crf"] = (crf.get("prob") or {}).get("miou")
            area = s1["runs"].get(args.config, {}).get(f"split{split}-seed{seed}", {}).get("prob-area-crf", {})
            r["stage1_prob_area_crf"] = (area.get("prob") or {}).get("miou")  # pseudo-masks' default since 2026-12-05
            results[key] = r
            path.write_text(json.dumps(results, indent=1))
            rows.append(r)
            print(f"{key}: stage two {r['miou']:.3f} (val {r['val_miou']}), its stage-one pseudo-masks (prob-raw) "
                  f"{r['stage1_prob_raw']}", flush=True)
    names = scorer.classes.names
    print(f"\n| row | n | mIoU | {' | '.join(f'{n} IoU' for n in names)} | tumour/stroma mIoU | train s |")
    print("|---" * (5 + len(names)) + "|")
    print(f"| stage one ({args.config} / prob-raw) | {len(rows)} runs | "
          f"{summarise([r['stage1_prob_raw'] for r in rows])} |" + " |" * (len(names) + 2))
    if any(r.get("stage1_prob_raw_crf") is not None for r in rows):
        print(f"| stage one ({args.config} / prob-raw-crf) | {len(rows)} runs | "
              f"{summarise([r.get('stage1_prob_raw_crf') for r in rows])} |" + " |" * (len(names) + 2))
    if any(r.get("stage1_prob_area_crf") is not None for r in rows):
        print(f"| stage one ({args.config} / prob-area-crf, the default) | {len(rows)} runs | "
              f"{summarise([r.get('stage1_prob_area_crf') for r in rows])} |" + " |" * (len(names) + 2))
    budget = f"{args.epochs} epochs x <= {args.max_steps} steps" if max_steps else f"{args.epochs} whole epochs"
    print(f"| stage two ({budget}) | {len(rows)} runs | "
          f"{summarise([r['miou'] for r in rows])} | "
          + " | ".join(summarise([r['iou'].get(n) for r in rows]) for n in names)
          + f" | {summarise([r['ts_miou'] for r in rows])} | {summarise([r['train_s'] for r in rows])} |")
    print(f"| stage two, gated by the stage-one classifier | {len(rows)} runs | "
          f"{summarise([r['gated']['miou'] for r in rows])} | "
          + " | ".join(summarise([r['gated']['iou'].get(n) for r in rows]) for n in names)
          + f" | {summarise([r['gated']['ts_miou'] for r in rows])} | |")
    if all("gated_area" in r for r in rows):
        print(f"| stage two, gated by stage one's presence rule (prob-area) | {len(rows)} runs | "
              f"{summarise([r['gated_area']['miou'] for r in rows])} | "
              + " | ".join(summarise([r['gated_area']['iou'].get(n) for r in rows]) for n in names)
              + f" | {summarise([r['gated_area']['ts_miou'] for r in rows])} | |")
    for k, label in (("miou", "ungated"), ("gated", "gated"), ("gated_area", "gated by prob-area")):
        if not all(k == "miou" or k in r for r in rows):
            continue
        gain = [(r[k]["miou"] if k != "miou" else r[k]) - r["stage1_prob_raw"] for r in rows
                if r["stage1_prob_raw"] is not None]
        print(f"\nstage two ({label}) minus its stage-one pseudo-masks, per run: {summarise(gain)}")
        gain = [(r[k]["miou"] if k != "miou" else r[k]) - r["stage1_prob_raw_crf"] for r in rows
                if r.get("stage1_prob_raw_crf") is not None]
        if gain:
            print(f"stage two ({label}) minus its stage-one pseudo-masks with the dense CRF, per run: {summarise(gain)}")
        gain = [(r[k]["miou"] if k != "miou" else r[k]) - r["stage1_prob_area_crf"] for r in rows
                if r.get("stage1_prob_area_crf") is not None]
        if gain:
            print(f"stage two ({label}) minus its stage-one default pseudo-masks (prob-area-crf), per run: "
                  f"{summarise(gain)} (better in {sum(g > 1e-9 for g in gain)} of {len(gain)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
