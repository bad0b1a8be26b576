"""``histo-wsss train-seg`` and ``histo-wsss predict``: stage two over ``core.stage2.train``
and ``core.stage2.infer``, with the same progress bars and Ctrl-C handling as stage one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from napari_histo_wsss.cli._progress import StopOnSigint, drive
from napari_histo_wsss.cli._settings import add_run_settings, add_settings_lazily, run_settings, settings_from_args


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
            "supervised reference. Ctrl-C stops after the current step with a checkpoint; --resume continues it "
            "with its saved settings ({resumable} may change). Unset options take core.stage2.train.SegConfig's "
            "defaults, recorded in the segmenter run's config.json."
        ),
    )
    p.add_argument("run_dir", help="stage-one run folder (from train-cls)")
    p.add_argument("--dataset", default=None, help="training dataset folder (default: the one the run records)")
    p.add_argument("--pseudo-masks", action="append", default=None, metavar="DIR",
                   help="folder of masks named like the training images; repeat for several MLPS sets")
    p.add_argument("--full-supervision", dest="supervision", action="store_const", const="full",
                   default=argparse.SUPPRESS,
                   help="train on ground truth cropped from a make-patches dataset's source masks (reference; "
                        "the same as --supervision full)")
    p.add_argument("--out", default=None, help="segmenter run folder (default RUN_DIR/segmenter)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with its saved settings (only the options given change)")
    # one option per SegConfig field, from its declaration (names, types, choices, help, default)
    add_run_settings(p, _seg_config_class)
    p.set_defaults(func=run_train_seg)

    q = subparsers.add_parser(
        "predict",
        help="predict a folder of images (palette PNGs) or a whole slide (OME-Zarr label pyramid)",
        description=(
            "INPUT a folder of images: OUT/<same name>.png class-index palette masks. INPUT a slide: OUT is an "
            "OME-Zarr label pyramid written tile by tile (tissue tiles only, cosine-blended overlaps), marked "
            "incomplete until done. RUN_DIR is a segmenter run or a stage-one run holding one (segmenter/); "
            "with --cams the stage-one classifier's CAM maps are written instead. OUT must not exist yet (an empty "
            "folder is fine for images) unless --overwrite is given, and may never be, hold or lie inside INPUT, "
            "nor be or hold RUN_DIR; with --overwrite the new output is built beside the old one and replaces it "
            "(an image folder as a whole) only once complete, so a failed or stopped run keeps the old one."
        ),
    )
    q.add_argument("run_dir", help="segmenter run folder, or the stage-one run that holds segmenter/")
    q.add_argument("input", help="folder of images, or a slide file")
    q.add_argument("out", help="output folder (images) or .ome.zarr path (slide)")
    q.add_argument("--no-tissue", action="store_true", help="predict every tile, not only tissue")
    q.add_argument("--cams", action="store_true", help="write the stage-one classifier's CAM maps (slides only)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT once the new output is complete (never INPUT or RUN_DIR)")
    # tile, overlap, batch size, resolution, TTA, gating, checkpoint, device: the PredictSettings
    # declarations that predict-many and the Segmenter panel use too (one set of defaults)
    add_settings_lazily(q, _predict_settings_class, skip=("overwrite", "torch_threads"))
    q.set_defaults(func=run_predict)


def _predict_settings_class() -> Any:
    from napari_histo_wsss.core.stage2.batch import PredictSettings

    return PredictSettings


def _seg_config_class() -> Any:
    from napari_histo_wsss.core.stage2.train import SegConfig

    return SegConfig


def _seg_config(args: argparse.Namespace) -> Any:
    """The SegConfig of the options (a resumed run's saved settings with the options given)."""
    from napari_histo_wsss.core.stage2.train import SegConfig

    out = Path(args.out) if args.out else Path(args.run_dir) / "segmenter"
    return run_settings(SegConfig, args, out, args.resume)


def run_train_seg(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.stage2.train import train_segmenter

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
    from napari_histo_wsss.core.device import apply_thread_policy, pick_device
    from napari_histo_wsss.core.errors import HistoWSSSError
    from napari_histo_wsss.core.io.atomic import check_output
    from napari_histo_wsss.core.stage2.batch import PredictSettings
    from napari_histo_wsss.core.stage2.infer import cam_predict_fn, predict_folder, predict_slide, segmenter_predict_fn

    opts = settings_from_args(PredictSettings, args)
    opts.validate()
    src = Path(args.input)
    if not src.exists():
        raise HistoWSSSError(f"{src}: input not found")
    if src.is_dir() and args.cams:
        raise HistoWSSSError("--cams is for slides; use 'histo-wsss pseudo-masks' for image folders")
    # the destination before the model is loaded: never the input or the run, never an old output unasked
    check_output(args.out, inputs=[src], overwrite=args.overwrite, protect=[args.run_dir],
                 what="output folder" if src.is_dir() else "output", folder=True if src.is_dir() else None)
    device = pick_device(opts.device)
    apply_thread_policy(gui=False)
    run = Path(args.run_dir)
    stage_one = run
    if args.cams:
        from napari_histo_wsss.core.stage1.train import load_run

        model, classes, _cfg = load_run(run)
        fn = cam_predict_fn(model, device)
    else:
        from napari_histo_wsss.core.stage2.train import load_segmenter

        model, classes, _cfg, meta = load_segmenter(run, which=opts.which, map_location=device)
        stage_one = Path(meta.get("stage_one") or run)
        gate = None
        if opts.gate:
            from napari_histo_wsss.core.stage1.train import load_run

            gate = load_run(stage_one, map_location=device)[0]
        fn = segmenter_predict_fn(model, classes, device, gate=gate)
    with StopOnSigint() as stop:
        if src.is_dir():
            last = drive(predict_folder(src, args.out, fn, classes, tile=opts.tile, overlap=opts.overlap, tta=opts.tta,
                                         should_stop=stop, overwrite=args.overwrite), "predict")
        else:
            from napari_histo_wsss.core.slides.slide import open_slide

            with open_slide(src) as slide:
                last = drive(predict_slide(slide, fn, args.out, tile=opts.tile, overlap=opts.overlap,
                                            batch_size=opts.batch_size, target_mpp=opts.target_mpp,
                                            tissue=False if args.no_tissue else None, tta=opts.tta, should_stop=stop,
                                            classes=classes, downsample=opts.downsample,
                                            output="maps" if args.cams else "labels", overwrite=args.overwrite),
                              "predict")
    if last is not None:
        if last.kind == "cancelled":
            return 130
        tqdm.write(last.message)
    return 0
