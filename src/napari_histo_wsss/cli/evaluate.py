"""``histo-wsss evaluate``: per-class IoU, mIoU, fwIoU of prediction masks against ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from napari_histo_wsss.core.errors import HistoWSSSError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score prediction masks against ground-truth masks (IoU per class, mIoU, fwIoU)",
        description=(
            "Match PRED_DIR and GT_DIR masks by file name (stem) and score them from one summed confusion "
            "matrix. Convention (MLPS): ground-truth pixels equal to the ignore index (default: the "
            "background index of the class table) are excluded; predicted background on tissue counts as "
            "a miss; mIoU averages the classes present in the ground truth or the prediction; fwIoU weights "
            "by ground-truth frequency."
        ),
    )
    p.add_argument("pred_dir", help="folder of predicted class-index masks (palette PNGs)")
    p.add_argument("gt_dir", help="folder of ground-truth class-index masks")
    p.add_argument("--classes", default=None,
                   help="class preset or classes JSON file (default: a classes.json in GT_DIR or its two parent "
                        "folders, else wsss4luad)")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="ground-truth index to ignore (default: the background index; -1 scores every index)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _classes_spec(gt_dir: Path, given: str | None) -> str | Path:
    if given is not None:
        return given
    for folder in (gt_dir, gt_dir.parent, gt_dir.parent.parent):
        if (folder / "classes.json").is_file():
            return folder / "classes.json"
    return "wsss4luad"


def run(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.data.datasets import resolve_classes
    from napari_histo_wsss.core.metrics import evaluate_folders

    spec = _classes_spec(Path(args.gt_dir), args.classes)
    classes = resolve_classes(spec)
    if args.ignore_index is not None and not -1 <= args.ignore_index <= classes.background_index:
        raise HistoWSSSError(f"--ignore-index {args.ignore_index} is not a class index of {spec} "
                             f"(0..{classes.background_index}, where {classes.background_index} is the background; "
                             "-1 scores every index)")
    with tqdm(total=None, unit="image", desc="evaluate", leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        res = evaluate_folders(args.pred_dir, args.gt_dir, classes, ignore_index=args.ignore_index, progress=progress)
    if args.json:
        keys = ("miou", "fwiou", "pixel_accuracy", "per_class_iou", "n_images")  # the documented interface
        print(json.dumps({k: res[k] for k in keys}))
        return 0

    def fmt(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.4f}"

    names = list(res["per_class_iou"])
    width = max(len(n) for n in names + ["class"])
    print(f"classes: {spec} ({', '.join(names)}); ignored ground-truth index: {res['ignore_index']}")
    print(f"{'class':<{width}}     IoU   gt pixels  pred pixels")
    for n in names:
        print(f"{n:<{width}}  {fmt(res['per_class_iou'][n])}  {res['gt_pixels'][n]:10d}  {res['pred_pixels'][n]:11d}")
    print(f"mIoU {fmt(res['miou'])}   fwIoU {fmt(res['fwiou'])}   pixel accuracy {fmt(res['pixel_accuracy'])}   "
          f"images {res['n_images']}")
    print(f"({res['convention']})")
    return 0
