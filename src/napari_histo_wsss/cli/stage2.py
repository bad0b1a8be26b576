"""``histo-wsss train-seg`` and ``histo-wsss predict``: stage two over ``core.train_seg`` and
``core.infer``, with the same progress bars and Ctrl-C handling as stage one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ._progress import StopOnSigint, drive


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _kinds(text: str) -> tuple[str, ...]:
    from ..core.synthesis import SYNTHESIS_KINDS

    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SYNTHESIS_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown synthesis kind(s) {', '.join(bad)}; choose from {', '.join(SYNTHESIS_KINDS)}")
    return kinds


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-seg",
        help="train the stage-two segmenter on pseudo-masks (MLPS sets, corrections, optional synthesis)",
        description=(
            "Train a DeepLabV3+ segmenter for the stage-one run RUN_DIR into RUN_DIR/segmenter (or --out). "
            "Without --pseudo-masks the three MLPS pseudo-mask sets are made from the run's classifier on "
            "the training patches (or, for a project, its pseudo-mask and corrections are used). Give one "
            "or more --pseudo-masks folders (masks named like the training images) to use your own; a folder "
            "of ground-truth masks, or --full-supervision on a make-patches dataset, trains the fully "
            "supervised reference. Ctrl-C stops after the current step with a checkpoint; --resume continues."
        ),
    )
    p.add_argument("run_dir", help="stage-one run folder (from train-cls)")
    p.add_argument("--dataset", default=None, help="training dataset folder (default: the one the run records)")
    p.add_argument("--pseudo-masks", action="append", default=None, metavar="DIR",
                   help="folder of masks named like the training images; repeat for several MLPS sets")
    p.add_argument("--full-supervision", action="store_true",
                   help="train on ground truth cropped from a make-patches dataset's source masks (reference)")
    p.add_argument("--synthesis", type=_kinds, default=None, metavar="KINDS",
                   help="HisynSeg synthesis: mosaic, bezier or mosaic,bezier (adds the consistency loss)")
    p.add_argument("--set-weights", type=_floats, default=None, help="weights of the mask sets (default 0.6,0.2,0.2)")
    p.add_argument("--oeem", action="store_true", help="OEEM pixel weighting of noisy pseudo-masks")
    p.add_argument("--corrected-weight", type=float, default=None, help="loss weight of corrected pixels (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 8)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the backbone (default 3e-4)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch")
    p.add_argument("--patch-size", type=int, default=None, help="training image side (default: stage one's)")
    p.add_argument("--backbone", default=None, help="efficientnet-lite0/1/2 or resnet18/34/50 (default efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="imagenet, none or a .pth file (default imagenet)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPUs")
    p.add_argument("--val-max-images", type=int, default=None, help="cap on validation images scored per epoch")
    p.add_argument("--out", default=None, help="segmenter run folder (default RUN_DIR/segmenter)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.set_defaults(func=run_train_seg)

    q = subparsers.add_parser(
        "predict",
        help="predict a folder of images (palette PNGs) or a whole slide (OME-Zarr label pyramid)",
        description=(
            "INPUT a folder of images: OUT/<same name>.png class-index palette masks. INPUT a slide: OUT is an "
            "OME-Zarr label pyramid written tile by tile (tissue tiles only, cosine-blended overlaps), marked "
            "incomplete until done. RUN_DIR is a segmenter run or a stage-one run holding one (segmenter/); "
            "with --cams the stage-one classifier's CAM maps are written instead."
        ),
    )
    q.add_argument("run_dir", help="segmenter run folder, or the stage-one run that holds segmenter/")
    q.add_argument("input", help="folder of images, or a slide file")
    q.add_argument("out", help="output folder (images) or .ome.zarr path (slide)")
    q.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    q.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (default 64)")
    q.add_argument("--batch-size", type=int, default=8, help="tiles per batch (default 8)")
    q.add_argument("--target-mpp", type=float, default=None,
                   help="working resolution of slides in um/px, matching the training images' (default: level 0)")
    q.add_argument("--downsample", type=float, default=None, help="working downsample of level 0 (overrides --target-mpp)")
    q.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    q.add_argument("--gate", action="store_true", help="switch off classes the stage-one classifier finds absent (MLPS)")
    q.add_argument("--no-tissue", action="store_true", help="predict every tile, not only tissue")
    q.add_argument("--cams", action="store_true", help="write the stage-one classifier's CAM maps (slides only)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    q.set_defaults(func=run_predict)


def _seg_config(args: argparse.Namespace) -> Any:
    import dataclasses

    from ..core.train_seg import SegConfig

    given = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_steps_per_epoch": args.max_steps_per_epoch,
        "patch_size": args.patch_size, "backbone": args.backbone, "weights": args.weights, "device": args.device,
        "seed": args.seed, "set_weights": args.set_weights, "corrected_weight": args.corrected_weight,
        "synthesis": args.synthesis, "val_max_images": args.val_max_images,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.oeem:
        given["oeem"] = True
    if args.no_amp:
        given["amp"] = False
    if args.full_supervision:
        given["supervision"] = "full"
    out = Path(args.out) if args.out else Path(args.run_dir) / "segmenter"
    if args.resume and (out / "config.json").is_file():
        return dataclasses.replace(SegConfig.saved(out), **given)
    return SegConfig(**given)


def run_train_seg(args: argparse.Namespace) -> int:
    from ..core.train_seg import train_segmenter

    cfg = _seg_config(args)

    def show(ev: Any, bar: tqdm) -> None:
        if ev.kind == "epoch":
            m = ev.metrics
            miou = m.get("val_miou")
            tqdm.write(f"epoch {ev.epoch}/{ev.epochs}: train loss {m['train_loss']:.4f}"
                       + (f", val mIoU {miou:.4f}" if miou is not None else ""))
        elif ev.kind in ("start", "cancelled", "done") or (ev.kind == "log" and not ev.steps):
            tqdm.write(ev.message)

    with StopOnSigint() as stop:
        last = drive(train_segmenter(args.run_dir, args.pseudo_masks, cfg, dataset=args.dataset, out_dir=args.out,
                                      resume=args.resume, should_stop=stop), "train-seg", show)
    if last is not None and last.kind == "cancelled":
        print(f"cancelled; continue with: histo-wsss train-seg {args.run_dir} --resume")
        return 130
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..core.device import pick_device
    from ..core.errors import HistoWSSSError
    from ..core.infer import cam_predict_fn, predict_folder, predict_slide, segmenter_predict_fn

    src = Path(args.input)
    if not src.exists():
        raise HistoWSSSError(f"{src}: input not found")
    device = pick_device(args.device)
    run = Path(args.run_dir)
    stage_one = run
    if args.cams:
        from ..core.train import load_run

        model, classes, _cfg = load_run(run)
        fn = cam_predict_fn(model, device)
    else:
        from ..core.train_seg import load_segmenter

        model, classes, _cfg, meta = load_segmenter(run, map_location=device)
        stage_one = Path(meta.get("stage_one") or run)
        gate = None
        if args.gate:
            from ..core.train import load_run

            gate = load_run(stage_one, map_location=device)[0]
        fn = segmenter_predict_fn(model, classes, device, gate=gate)
    with StopOnSigint() as stop:
        if src.is_dir():
            if args.cams:
                raise HistoWSSSError("--cams is for slides; use 'histo-wsss pseudo-masks' for image folders")
            last = drive(predict_folder(src, args.out, fn, classes, tile=args.tile, overlap=args.overlap, tta=args.tta,
                                         should_stop=stop), "predict")
        else:
            from ..core.slide import open_slide

            with open_slide(src) as slide:
                last = drive(predict_slide(slide, fn, args.out, tile=args.tile, overlap=args.overlap,
                                            batch_size=args.batch_size, target_mpp=args.target_mpp,
                                            tissue=False if args.no_tissue else None, tta=args.tta, should_stop=stop,
                                            classes=classes, downsample=args.downsample,
                                            output="maps" if args.cams else "labels", overwrite=args.overwrite),
                              "predict")
    if last is not None:
        if last.kind == "cancelled":
            return 130
        tqdm.write(last.message)
    return 0
