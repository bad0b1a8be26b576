"""Stage one through the slide path: does the Review panel / ``histo-wsss cams`` show what the
benchmark measures?

``bench/stage1_quality.py`` scores ``pseudo-masks``' rule image by image. A pathologist sees the
slide path instead: the Review panel (and ``histo-wsss cams``) computes a slide's CAMs in blended
tiles on one canvas and makes the automatic pseudo-mask there (``core/review.py``). Here each
run's 9 test images become one patch folder (a contact sheet, ``core/slides/mosaic.py``) in a
project; ``compute_slide_cams`` with the Review defaults makes the sheet's pseudo-mask, which is
cut back into one mask per image (``export_patch_folder_pngs``) and scored like the benchmark
(MLPS convention: background ground truth ignored), once per ``--refine`` choice (the Review
default ``crf``: a dense CRF over the canvas, and ``none``) and ``--floor`` choice (``run``: the
run's calibration as it is, the ``prob-area`` floor of ``pseudo-masks`` when the run recorded one;
``none``: without the floor, the ``prob-raw`` gating of runs trained before it). Beside it, the
same run's figures from ``results.json`` (the image path's *prob-area* / *prob-raw*, unrefined
and with the CRF).

Nothing is tuned here: the runs, their calibration (gating threshold, offsets) and the Review
defaults are used as they are.

    python bench/stage1_slide_path.py --work /tmp/s1qall --config p128-synth-pix --splits 0,1 --seeds 0,1,2 --refine none,crf --floor run,none
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from napari_histo_wsss.core import review
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.io.export import export_patch_folder_pngs
from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.review import ReviewSettings, compute_slide_cams


@contextlib.contextmanager
def floor_as(choice: str):
    """``run``: the Review's gating as it is; ``none``: the run's prob-raw offsets and no area floor
    (what ``run_presence`` gives a run trained before the floor existed)."""
    if choice == "run":
        yield
        return
    original = review.run_presence

    def without_floor(run_dir, which, num_classes):
        from napari_histo_wsss.core.stage1.train import calibrated_offsets

        off = calibrated_offsets(run_dir, which, "prob-raw")
        return (np.zeros(num_classes, np.float32) if off is None else np.asarray(off, np.float32)), None

    review.run_presence = without_floor
    try:
        yield
    finally:
        review.run_presence = original


def score_folder(pred: Path, gt: Path, classes) -> dict:
    names = classes.names + ["background"]
    cm = ConfusionMatrix(classes.num_classes + 1, classes.background_index)
    for f in sorted(gt.iterdir()):
        cm.update(np.asarray(Image.open(pred / f.name)), np.asarray(Image.open(f)))
    s = cm.scores(names)
    return {"miou": s["miou"], "iou": s["per_class_iou"]}


def slide_path(run: Path, split_dir: Path, classes, refine: str, floor: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp, floor_as(floor):
        root = Path(tmp)
        project = Project.create(root / "p", classes, patch_size=128, target_mpp=None)
        sid = project.add_slide(split_dir / "test" / "img")
        last = None
        for ev in compute_slide_cams(project, sid, run, ReviewSettings(device="cpu", refine=refine)):
            last = ev
        assert last is not None and last.kind == "done", last
        mask, ds = project.read_mask(sid, "pseudo")
        with project.open_slide(sid) as slide:
            regions = slide.regions
        export_patch_folder_pngs(mask, regions, root / "out", classes, downsample=ds)
        out = score_folder(root / "out", split_dir / "test" / "mask", classes)
        out["gating"] = last.metrics["gating"]
        shutil.rmtree(root / "p")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/s1q")
    ap.add_argument("--config", default="p128-synth-pix")
    ap.add_argument("--splits", default="0,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--refine", default="none,crf", help="the Review's refinements to score, comma-separated")
    ap.add_argument("--floor", default="run,none", help="run (the run's prob-area floor, as the Review uses it) "
                                                        "and/or none (without it: prob-raw), comma-separated")
    args = ap.parse_args(argv)
    work = Path(args.work)
    classes = get_preset("wsss4luad")
    results = json.loads((work / "results.json").read_text())["runs"] if (work / "results.json").is_file() else {}
    rows = []
    refines = [x for x in args.refine.split(",") if x]
    floors = [x for x in args.floor.split(",") if x]
    variants = [(f, x) for f in floors for x in refines]
    twins = {("run", "none"): "prob-area", ("run", "crf"): "prob-area-crf", ("none", "none"): "prob-raw",
             ("none", "crf"): "prob-raw-crf"}
    for split in (int(s) for s in args.splits.split(",")):
        split_dir = work / f"patches-p128-s64-split{split}"
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.config}-split{split}-seed{seed}"
            run = work / "runs" / name
            if not (run / "checkpoints").is_dir():
                print(f"{name}: no run, skipped", file=sys.stderr)
                continue
            bench = results.get(args.config, {}).get(f"split{split}-seed{seed}", {})
            r = {"name": name}
            for g in twins.values():
                r[g] = bench.get(g, {}).get("prob", {}).get("miou")
            for v in variants:
                r[v] = slide_path(run, split_dir, classes, v[1], v[0])
                print(f"{name}: slide path, floor {v[0]}, refine {v[1]}: {r[v]['miou']:.3f} (gating {r[v]['gating']:.2f}); "
                      f"image path {twins[v]} {r[twins[v]]}", file=sys.stderr)
            rows.append(r)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"

    def diff(v, b):
        return ms([None if r.get(b) is None else r[v]["miou"] - r[b] for r in rows])

    print("| path | n | prob-gated mIoU | minus image path, run for run | tumor IoU | stroma IoU | normal IoU |\n"
          "|---|---|---|---|---|---|---|")
    for v in variants:
        print(f"| slide path, floor {v[0]}, refine {v[1]} (Review / cams, sheet of the test images) | {len(rows)} | "
              f"{ms([r[v]['miou'] for r in rows])} | {diff(v, twins[v])} (vs {twins[v]}) | "
              + " | ".join(ms([r[v]['iou'].get(c) or 0.0 for r in rows]) for c in classes.names) + " |")
    for g in dict.fromkeys(twins[v] for v in variants):
        print(f"| image path {g} (results.json) | {len(rows)} | {ms([r[g] for r in rows])} | | | | |")
    for f in floors:
        if {"none", "crf"} <= set(refines):
            print(f"\nslide path, floor {f}, crf minus none, run for run: "
                  + ms([r[(f, "crf")]["miou"] - r[(f, "none")]["miou"] for r in rows]))
    for x in refines:
        if {"run", "none"} <= set(floors):
            print(f"slide path, refine {x}, floor run minus none, run for run: "
                  + ms([r[("run", x)]["miou"] - r[("none", x)]["miou"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
