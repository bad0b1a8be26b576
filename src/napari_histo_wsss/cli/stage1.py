"""``histo-wsss train-cls`` and ``histo-wsss pseudo-masks``: stage one from the command line.

Both are thin: they build a :class:`~..core.stage1.train.TrainConfig` / pseudo-mask settings from the
options, drive the core generators and show their events on a tqdm progress bar. Ctrl-C asks the
trainer to stop at the next step (it checkpoints, and ``--resume`` continues); a second Ctrl-C
aborts at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from napari_histo_wsss.cli._progress import StopOnSigint, drive
from napari_histo_wsss.cli._settings import add_run_settings, add_settings_lazily, run_settings, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-cls",
        help="train the stage-one CAM classifier on weakly labelled patches",
        description=(
            "Train a multi-label CAM classifier on DATASET (any supported layout: make-patches output, "
            "LUAD-HistoSeg, BCSS-WSSS, WSSS4LUAD, a project folder) into RUN_DIR (config.json, classes.json, "
            "metrics.jsonl, checkpoints/last.pt and best.pt). Validation images with masks (DATASET/val) drive "
            "the SegMix curriculum and the choice of best.pt by pseudo-mask mIoU; without them a share of the "
            "patches is held out for a validation loss. Ctrl-C stops after the current step with a checkpoint; "
            "--resume continues it with its saved settings ({resumable} may change). "
            "Unset options take core.stage1.train.TrainConfig's defaults, recorded in RUN_DIR/config.json."
        ),
    )
    p.add_argument("dataset", help="dataset folder (or a project folder / project.json)")
    p.add_argument("run_dir", help="run folder to create (or to continue with --resume)")
    p.add_argument("--classes", default=None, help="class preset or classes JSON (default: from the dataset)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON line per epoch instead of a progress bar")
    # one option per TrainConfig field, from its declaration (names, types, choices, help, default)
    add_run_settings(p, _train_config_class)
    p.set_defaults(func=run_train)

    q = subparsers.add_parser(
        "pseudo-masks",
        help="CAMs -> pseudo-masks (palette PNGs) for a folder of images with a trained classifier",
        description=(
            "For every image of IMAGES_DIR write OUT_DIR/<same stem>.png, a palette PNG of class indices in the "
            "class colours (index C = background). Classes are gated by the labels in the file names "
            "(--labels names), by the classes present in masks of the same names (--labels MASK_DIR), or by the "
            "predicted probabilities (default). --cams also writes the float CAMs. OUT_DIR (and a --cams folder "
            "outside it) must not exist yet or be empty unless --overwrite is given, and may never be, hold or lie "
            "inside IMAGES_DIR or the --labels mask folder, nor be or hold RUN_DIR. The folder appears only once "
            "complete (written beside it, then renamed); with --overwrite it replaces the old one as a whole."
        ),
    )
    q.add_argument("run_dir", help="a train-cls run folder")
    q.add_argument("images_dir", help="folder of images (any size; large ones are tiled)")
    q.add_argument("out_dir", help="output folder for the palette PNGs")
    q.add_argument("--cams", nargs="?", const="", default=None, metavar="DIR",
                   help="also write float16 CAM arrays (C, H, W) as .npy (default folder: OUT_DIR/cams)")
    q.add_argument("--labels", default=None, help="'names' or a folder of masks; default: gate by predicted probability")
    q.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path (default best)")
    q.add_argument("--mode", choices=["last", "multi"], default=None, help="CAM type (default: the run's cam_mode)")
    q.add_argument("--prob-threshold", type=float, default=None,
                   help="probability that switches a class on when gating by predictions (default: the threshold "
                        "the run's validation chose, see metrics.jsonl 'prob_threshold', else 0.5)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_DIR (and --cams folder) as a whole once the new one is complete")
    # --tile, --flip, --bg-threshold: from PseudoMaskSettings' declarations
    add_settings_lazily(q, _pseudo_mask_settings_class)
    q.set_defaults(func=run_pseudo_masks)


def _train_config_class() -> Any:
    from napari_histo_wsss.core.stage1.train import TrainConfig

    return TrainConfig


def _pseudo_mask_settings_class() -> Any:
    from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings

    return PseudoMaskSettings


def _config(args: argparse.Namespace) -> Any:
    """The TrainConfig of the options (a resumed run's saved settings with the options given)."""
    from napari_histo_wsss.core.stage1.train import TrainConfig

    return run_settings(TrainConfig, args, args.run_dir, args.resume)


def run_train(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.data.datasets import load_dataset
    from napari_histo_wsss.core.stage1.train import train_classifier

    spec = load_dataset(args.dataset, classes=args.classes)
    cfg = _config(args)

    def show(ev: Any, bar: tqdm) -> None:
        if ev.kind == "epoch":
            m = ev.metrics
            if args.json:
                tqdm.write(json.dumps(m))
                return
            parts = [f"epoch {ev.epoch}/{ev.epochs}", f"train loss {m['train_loss']:.4f}"]
            if m.get("val_miou") is not None:
                parts.append(f"val mIoU {m['val_miou']:.4f}")
            if m.get("val_loss") is not None:
                parts.append(f"val loss {m['val_loss']:.4f}")
            seg = m.get("segmix")
            if seg:
                parts.append(f"segmix tile {seg['tile'] or '-'} share {seg['share']:.2f} -> tile {seg['next_tile'] or '-'}")
            parts.append(f"{m['patches_per_s']:.1f} patches/s (data {100 * m['data_s'] / max(m['data_s'] + m['compute_s'], 1e-9):.0f}%)")
            tqdm.write(" | ".join(parts))
        elif ev.kind in ("log", "start", "cancelled", "done") and ev.message:
            tqdm.write(ev.message)

    with StopOnSigint() as stop:
        last = drive(train_classifier(spec, args.run_dir, cfg, resume=args.resume, should_stop=stop), "train-cls", show)
    if last is not None and last.kind == "cancelled":
        print(f"cancelled; continue with: histo-wsss train-cls {args.dataset} {args.run_dir} --resume")
        return 130
    return 0


def run_pseudo_masks(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.device import apply_thread_policy, pick_device
    from napari_histo_wsss.core.io.atomic import check_output
    from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings, generate_pseudo_masks
    from napari_histo_wsss.core.stage1.train import (
        apply_area_calibration,
        calibrated_offsets,
        calibrated_prob_threshold,
        load_run,
    )

    # the destination before the model is loaded (generate_pseudo_masks checks it again, with --cams)
    labels_dir = args.labels if args.labels not in (None, "names") else None
    check_output(args.out_dir, inputs=[args.images_dir, labels_dir], overwrite=args.overwrite, protect=[args.run_dir],
                 what="output folder", folder=True)
    cams_dir = None
    if args.cams is not None:
        cams_dir = Path(args.cams) if args.cams else Path(args.out_dir) / "cams"
        if not cams_dir.resolve().is_relative_to(Path(args.out_dir).resolve()):
            check_output(cams_dir, inputs=[args.images_dir, labels_dir, args.out_dir], overwrite=args.overwrite,
                         protect=[args.run_dir], what="CAM folder", folder=True)
    device = pick_device(args.device)
    apply_thread_policy(gui=False)
    model, classes, cfg = load_run(args.run_dir, args.checkpoint, map_location=device)
    which = args.checkpoint if args.checkpoint == "last" else "best"
    threshold = args.prob_threshold
    if threshold is None and args.labels is None:
        threshold = calibrated_prob_threshold(args.run_dir, which)
        if threshold is not None:
            print(f"gating by predicted probabilities at {threshold:g} (chosen on the run's validation images)")
    run_own = PseudoMaskSettings(mode=args.mode or cfg.cam_mode, window=cfg.patch_size,
                                 prob_threshold=0.5 if threshold is None else threshold)
    settings = settings_from_args(PseudoMaskSettings, args, run_own)
    if settings.gating == "prob-area":  # the area floor and its offsets, chosen on the run's validation images
        note = apply_area_calibration(settings, args.run_dir, which)
        if note:
            print(note)
        elif args.labels is None and getattr(args, "min_area", None) is None:
            print(f"area floor {settings.min_area:g}: a probable class covering less of an image's tissue is dropped "
                  f"(the floor the run's validation set)")
    if settings.gating != "prob" and settings.offsets is None:  # offsets chosen on the run's validation images
        found = calibrated_offsets(args.run_dir, which, settings.gating)
        settings.offsets = tuple(found) if found is not None else None
    settings.validate()
    with StopOnSigint() as stop:
        last = drive(generate_pseudo_masks(model, classes, args.images_dir, args.out_dir, settings, cams_dir=cams_dir,
                                            labels=args.labels, device=device, should_stop=stop,
                                            overwrite=args.overwrite), "pseudo-masks")
    if last is not None and last.kind == "cancelled":
        return 130
    if last is not None:
        print(last.message)
    return 0
