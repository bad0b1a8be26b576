"""Stage-two mIoU vs its stage-one pseudo-masks on held-out images (split by image): the shared
WSSS4LUAD images (``--dataset wsss4luad``) or GlaS test A (``--dataset glas``: instance masks as the
2-class gland / other-tissue ``glas`` preset, converted as in ``stage1_experiments.py``).

Steps (all through core/, as the CLI does them):
1. ``make_patches`` of the data set's images: ``--test-fraction`` of the images held out
   (by image), the rest cut into weakly labelled ``--patch`` px patches every ``--stride`` px;
2. a CAM classifier (``--cls-epochs``) -> stage-one pseudo-masks of the held-out images (gated by
   the predicted probabilities: no labels at test time) -> mIoU;
3. segmenters from the classifier's pseudo-masks of the training patches, one per variant
   (``--variants``: ``mlps`` = three sets 0.6/0.2/0.2, ``single`` = the fused set only,
   ``synth`` = MLPS + Mosaic/Bezier synthesis: half of each batch synthetic, the same number of
   batches), each ``--seg-epochs`` -> predictions of the held-out images -> mIoU (background
   ignored, MLPS convention, core.metrics).

Stage one is scored twice on the held-out images: gated by predicted probabilities (what a
test image without labels gets) and gated by the image labels (the pseudo-mask setting of the
WSSS literature, an upper reference for stage one). Stage two never sees the labels.

Run: ``python bench/exp_stage2_miou.py OUT [--dataset glas] [--variants mlps,single,synth]``;
prints a table with each variant's training time. Variants already trained in OUT are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from stage1_experiments import source_folders

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import make_patches
from napari_histo_wsss.core.metrics import evaluate_folders
from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings, generate_pseudo_masks
from napari_histo_wsss.core.stage1.train import TrainConfig, load_run, train_classifier
from napari_histo_wsss.core.stage2.infer import predict_folder, segmenter_predict_fn
from napari_histo_wsss.core.stage2.train import SegConfig, load_segmenter, train_segmenter


def _drain(events, label: str) -> None:
    t0 = time.perf_counter()
    for ev in events:
        if ev.kind in ("epoch", "done", "cancelled"):
            extra = ev.metrics.get("val_miou") if ev.kind == "epoch" else ""
            print(f"  [{label} {time.perf_counter() - t0:6.0f}s] {ev.kind} {ev.message[:90]} {extra}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--dataset", default="wsss4luad", choices=["wsss4luad", "glas"])
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--cls-epochs", type=int, default=6)
    p.add_argument("--seg-epochs", type=int, default=4)
    p.add_argument("--variants", default="mlps,single,synth")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    src_img, src_mask, preset = source_folders(args.dataset, out)
    patches = out / "patches"
    if not (patches / "patches.csv").is_file():
        stats = make_patches(src_img, src_mask, patches, get_preset(preset), patch_size=args.patch, stride=args.stride,
                             test_fraction=args.test_fraction, seed=0)
        print(f"patches: {stats['n_patches']} from {stats['n_images']['train']} images; "
              f"held out: {stats['images']['test']}")
    test_img, test_mask = patches / "test" / "img", patches / "test" / "mask"
    run = out / "run"
    if not (run / "checkpoints" / "best.pt").is_file():
        cfg = TrainConfig(method="cam", epochs=args.cls_epochs, batch_size=16, patch_size=args.patch, seed=0)
        _drain(train_classifier(patches, run, cfg), "classifier")
    model, classes, _ = load_run(run)
    results = {}
    settings = PseudoMaskSettings(window=args.patch)
    _drain(generate_pseudo_masks(model, classes, test_img, out / "stage1_test", settings, overwrite=True),  # a rerun refreshes
           "stage-one masks")
    results["stage one pseudo-masks (CAM, prob-gated)"] = evaluate_folders(out / "stage1_test", test_mask, classes)
    # the WSSS pseudo-mask setting: classes gated by the image labels (here read from the masks)
    _drain(generate_pseudo_masks(model, classes, test_img, out / "stage1_test_lab", settings, labels=test_mask, overwrite=True),
           "stage-one masks, label-gated")
    results["stage one pseudo-masks (CAM, label-gated)"] = evaluate_folders(out / "stage1_test_lab", test_mask, classes)
    variants = {
        "mlps": SegConfig(epochs=args.seg_epochs, batch_size=8, seed=0),
        "single": SegConfig(epochs=args.seg_epochs, batch_size=8, seed=0),
        "synth": SegConfig(epochs=args.seg_epochs, batch_size=8, seed=0, synthesis=("mosaic", "bezier"),
                           synthesis_count=128, filter_steps=100),
    }
    seconds = {}
    pseudo = out / "seg-mlps" / "pseudo"
    for name in args.variants.split(","):
        seg_dir = out / f"seg-{name}"
        masks = None if name == "mlps" else ([pseudo / "fused"] if name == "single" else [pseudo / s for s in ("fused", "last", "shallow")])
        if not (seg_dir / "checkpoints" / "last.pt").is_file():
            t0 = time.perf_counter()
            _drain(train_segmenter(run, masks, variants[name], dataset=patches, out_dir=seg_dir), f"seg {name}")
            wall = time.perf_counter() - t0  # synthesis and realness filter included
            print(f"  seg {name}: {wall:.0f} s")
            (seg_dir / "bench_wall_s.txt").write_text(f"{wall:.1f}\n")
        wall_file = seg_dir / "bench_wall_s.txt"
        seconds[f"stage two: {name}"] = float(wall_file.read_text()) if wall_file.is_file() else None
        seg, classes, _, _ = load_segmenter(seg_dir, "last")
        pred = out / f"pred-{name}"
        _drain(predict_folder(test_img, pred, segmenter_predict_fn(seg, classes), classes, tile=512, overlap=64, overwrite=True),
               f"predict {name}")
        results[f"stage two: {name}"] = evaluate_folders(pred, test_mask, classes)
    print(f"\n{args.dataset}: {len(list(test_img.iterdir()))} held-out images")
    print("| method | mIoU | fwIoU | " + " | ".join(f"IoU {n}" for n in classes.names) + " | train s |")
    print("|---|---|---|" + "---|" * classes.num_classes + "---|")
    for k, r in results.items():
        per = " | ".join("n/a" if r["per_class_iou"][n] is None else f"{r['per_class_iou'][n]:.4f}" for n in classes.names)
        sec = seconds.get(k)
        print(f"| {k} | {r['miou']:.4f} | {r['fwiou']:.4f} | {per} | {'' if sec is None else f'{sec:.0f}'} |")
    (out / "results.json").write_text(json.dumps({k: {**{m: r[m] for m in ("miou", "fwiou", "per_class_iou", "n_images")},
                                                      "train_s": seconds.get(k)} for k, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
