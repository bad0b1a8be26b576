"""``histo-wsss make-patches``: a weakly labelled patch set from images with masks."""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-patches",
        help="cut images with masks into patches with image-level labels (weak-label training set)",
        description=(
            "Split images BY IMAGE into train/val/test (seeded), cut the training images into patches "
            "labelled from their masks (WSSS4LUAD file names '<stem>_<x>_<y>-[1, 0, 1].png'), and copy "
            "the held-out images and masks to OUT/val and OUT/test. Writes OUT/patches.csv (per-class "
            "fractions), OUT/classes.json and OUT/make_patches.json. Images smaller than a patch are "
            "padded with white background."
        ),
    )
    p.add_argument("images", help="folder of images (PNG/JPEG/TIFF)")
    p.add_argument("masks", help="folder of class-index masks with the same file stems")
    p.add_argument("out", help="output folder (new or empty; not inside IMAGES or MASKS)")
    p.add_argument("--classes", default="wsss4luad",
                   help="class preset (wsss4luad, luad-histoseg, bcss-wsss, glas) or a classes JSON file (default: wsss4luad)")
    p.add_argument("--patch-size", type=int, default=224, help="patch side in pixels (default 224)")
    p.add_argument("--stride", type=int, default=None, help="step between patches in pixels (default: the patch size)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of images held out for validation (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of images held out for testing (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image split (default 0)")
    p.add_argument("--min-class-fraction", type=float, default=0.0,
                   help="share of a patch a class must cover to be in its label (default 0: any pixel)")
    p.add_argument("--min-tissue", type=float, default=0.1,
                   help="drop patches whose non-background share is below this (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.data.datasets import make_patches

    with tqdm(total=None, unit="image", desc="make-patches", leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        stats = make_patches(
            args.images, args.masks, args.out, args.classes, patch_size=args.patch_size, stride=args.stride,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
            min_class_fraction=args.min_class_fraction, min_tissue=args.min_tissue, progress=progress,
        )
    if args.json:
        print(json.dumps(stats))
        return 0
    n = stats["n_images"]
    print(f"images: {n['train']} train, {n['val']} val, {n['test']} test ({stats['n_padded_images']} padded to the patch size)")
    print(f"patches: {stats['n_patches']} written to {args.out}/train "
          f"(dropped {stats['dropped']['background']} mostly background, {stats['dropped']['no_label']} without a class)")
    width = max([len(k) for k in stats["label_combinations"]] + [len(k) for k in stats["class_counts"]] + [5])
    print("label combination".ljust(width) + "  patches")
    for combo, count in stats["label_combinations"].items():
        print(f"{combo:<{width}}  {count:7d}")
    print("class".ljust(width) + "  patches")
    for name, count in stats["class_counts"].items():
        print(f"{name:<{width}}  {count:7d}")
    return 0
