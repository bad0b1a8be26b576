"""``histo-wsss info`` and ``histo-wsss overview``: what a slide holds and where the patches go.

``info`` prints the pyramid, resolution, tissue share and patch count of a slide; ``overview``
writes a PNG thumbnail with the detected tissue outlined and the patch grid drawn on it, the
quickest check that tissue detection and grid settings suit a slide before labelling it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.slides.grid import PatchGrid
from napari_histo_wsss.core.slides.slide import Slide
from napari_histo_wsss.core.slides.tissue import TissueMask

#: Overview colours (RGB): tissue outline and patch outlines.
TISSUE_COLOUR = (0, 160, 80)
PATCH_COLOUR = (20, 60, 220)


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser(
        "info", help="levels, resolution, size, tissue share and patch count of a slide",
        description="Open a slide (SVS, NDPI, MIRAX, OME/generic TIFF, PNG/JPEG), detect its tissue and lay the "
                    "patch grid; print the facts. Nothing is written.",
    )
    info.add_argument("slide", help="slide or image file")
    _grid_options(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run_info)

    ov = subparsers.add_parser(
        "overview", help="write a PNG thumbnail with the tissue outline and the patch grid",
        description="Draw the detected tissue (green outline) and the kept patches (blue squares) on a thumbnail "
                    "of the slide and save it as a PNG. An existing OUT is replaced only with --overwrite; OUT is "
                    "never the slide itself.",
    )
    ov.add_argument("slide", help="slide or image file")
    ov.add_argument("out", help="PNG file to write (new, or existing with --overwrite)")
    _grid_options(ov)
    ov.add_argument("--max-size", type=int, default=1024, help="longer side of the thumbnail in pixels (default 1024)")
    ov.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never the slide)")
    ov.set_defaults(func=run_overview)


def _grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patch-size", type=int, default=224, help="patch side in pixels at the working resolution (default 224)")
    p.add_argument("--target-mpp", type=float, default=1.0,
                   help="working resolution in micrometres per pixel (default 1.0, about 10x); ignored with --level")
    p.add_argument("--level", type=int, default=None, help="work at this pyramid level instead of --target-mpp")
    p.add_argument("--stride", type=int, default=None, help="step between patches in working pixels (default: the patch size)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue share of a kept patch (default 0.5)")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range options in one line before the slide is read: the tissue mask of a
    large slide can take minutes, and a typo should not cost them (or end in a traceback)."""
    checks = [
        ("--patch-size", args.patch_size, args.patch_size >= 1, "a positive number of pixels"),
        ("--stride", args.stride, args.stride is None or args.stride >= 1, "a positive number of pixels"),
        ("--target-mpp", args.target_mpp, math.isfinite(args.target_mpp) and args.target_mpp > 0,
         "a positive number of micrometres per pixel"),
        ("--level", args.level, args.level is None or args.level >= 0, "a pyramid level (0 = full resolution)"),
        ("--min-tissue", args.min_tissue, 0.0 <= args.min_tissue <= 1.0, "a share between 0 and 1"),
    ]
    if hasattr(args, "max_size"):
        checks.append(("--max-size", args.max_size, args.max_size >= 1, "a positive number of pixels"))
    for flag, value, ok, expected in checks:
        if not ok:
            raise HistoWSSSError(f"{flag} must be {expected}, got {value}")


@contextlib.contextmanager
def _long_reads(desc: str) -> Iterator[None]:
    """A progress bar for slide reads that take over a second: the thumbnail or tissue mask of a
    slide without small stored levels decodes a whole large level. Ctrl-C stops the read at once
    (``main`` prints one line and exits 130)."""
    from tqdm import tqdm

    from napari_histo_wsss.core.slides.slide import read_progress

    bar: tqdm | None = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None or done < bar.n or total != bar.total:  # a new read
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=desc, unit="block", delay=1.0, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        with read_progress(report):
            yield
    finally:
        if bar is not None:
            bar.close()


def _tissue_and_grid(slide: Slide, args: argparse.Namespace) -> tuple[TissueMask, PatchGrid]:
    from napari_histo_wsss.core.slides.grid import make_grid
    from napari_histo_wsss.core.slides.tissue import detect_tissue

    with _long_reads(f"{slide.path.name}: tissue mask"):
        tissue = detect_tissue(slide)
    grid = make_grid(slide, tissue, patch_size=args.patch_size, target_mpp=args.target_mpp,
                     level=args.level, stride=args.stride, min_tissue=args.min_tissue)
    return tissue, grid


def slide_info(slide: Slide, tissue: TissueMask, grid: PatchGrid) -> dict[str, Any]:
    """The facts ``info`` prints, as a JSON-friendly dict."""
    return {
        "path": str(slide.path),
        "format": slide.format,
        "dimensions": list(slide.dimensions),
        "mpp": slide.mpp,
        "objective_power": slide.objective_power,
        **({"images": len(slide.regions)} if slide.regions else {}),
        "levels": [
            {"dimensions": list(d), "downsample": ds, "stored": not slide.is_built_level(i)}
            for i, (d, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
        ],
        "tissue_fraction": tissue.fraction(),
        "tissue_mask": {"dimensions": [int(tissue.mask.shape[1]), int(tissue.mask.shape[0])], "downsample": tissue.downsample},
        "grid": {
            "patches": len(grid), "patch_size": grid.patch_size, "size0": grid.size0, "stride0": grid.stride0,
            "downsample": grid.downsample,
            "mpp": slide.mpp * grid.downsample if slide.mpp else None,
        },
    }


def run_info(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.slides.slide import open_slide

    _check_options(args)
    from napari_histo_wsss.core.slides.grid import FEW_PATCHES, finer_patch_size

    with open_slide(args.slide) as slide:
        tissue, grid = _tissue_and_grid(slide, args)
        facts = slide_info(slide, tissue, grid)
        finer = None
        if 0 < len(grid) < FEW_PATCHES and args.level is None and args.stride is None:
            finer = finer_patch_size(slide, tissue, args.patch_size, args.target_mpp, args.min_tissue)
            facts["grid"]["finer"] = {"patch_size": finer[0], "patches": finer[1]} if finer else None
    if args.json:
        print(json.dumps(facts))
        return 0
    w, h = facts["dimensions"]
    mpp = f"{facts['mpp']:.4f} um/px" if facts["mpp"] else "unknown"
    obj = f"{facts['objective_power']:g}x" if facts["objective_power"] else "unknown"
    print(f"{facts['path']}")
    print(f"  format: {facts['format']}   size: {w} x {h} px   mpp: {mpp}   objective: {obj}")
    if "images" in facts:
        print(f"  images: {facts['images']}, side by side on one sheet (each tiled by the grid from its own corner)")
    print(f"  levels: {len(facts['levels'])}")
    for i, lv in enumerate(facts["levels"]):
        kind = "stored" if lv["stored"] else "built on demand"
        print(f"    {i}: {lv['dimensions'][0]} x {lv['dimensions'][1]} px, downsample {lv['downsample']:.3f} ({kind})")
    print(f"  tissue: {100 * facts['tissue_fraction']:.1f}% of the slide (mask downsample {tissue.downsample:g})")
    g = facts["grid"]
    res = f" ~ {g['mpp']:.3f} um/px" if g["mpp"] else ""
    print(f"  patches: {g['patches']} of {g['patch_size']} px ({g['size0']} px at level 0{res}) with >= {100 * args.min_tissue:g}% tissue")
    if 0 < g["patches"] < FEW_PATCHES:
        print(f"  few patches to label several per class (from {FEW_PATCHES} on)"
              + (f": --patch-size {finer[0]} gives {finer[1]}" if finer else ""))
    return 0


def render_overview(slide: Slide, tissue: TissueMask, grid: PatchGrid, max_size: int = 1024) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail with the tissue outline and the patch squares drawn on it."""
    from PIL import Image, ImageDraw
    from skimage.measure import find_contours

    thumb = slide.thumbnail(max_size)
    scale = thumb.shape[1] / slide.dimensions[0]  # thumbnail pixels per level-0 pixel
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    line = max(1, round(max(thumb.shape[:2]) / 500))
    # Contours of the zero-padded mask close around tissue touching the border; +0.5 moves from
    # mask pixel centres to level-0 coordinates.
    padded = np.pad(tissue.mask.astype(np.float32), 1)
    k = tissue.downsample * scale
    for contour in find_contours(padded, 0.5):
        pts = [((c - 1 + 0.5) * k, (r - 1 + 0.5) * k) for r, c in contour]
        if len(pts) > 1:
            draw.line(pts + [pts[0]], fill=TISSUE_COLOUR, width=line)
    side = grid.size0 * scale
    for x, y in zip(grid.x.tolist(), grid.y.tolist()):
        draw.rectangle([x * scale, y * scale, x * scale + side - 1, y * scale + side - 1], outline=PATCH_COLOUR, width=line)
    return np.asarray(image)


def run_overview(args: argparse.Namespace) -> int:
    from PIL import Image

    from napari_histo_wsss.core.io.atomic import check_output, write_with
    from napari_histo_wsss.core.slides.slide import open_slide

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise HistoWSSSError(f"{out}: the overview is written as PNG; give a .png file name")
    _check_options(args)
    check_output(out, inputs=[args.slide], overwrite=args.overwrite, what="overview", folder=False)
    with open_slide(args.slide) as slide:
        tissue, grid = _tissue_and_grid(slide, args)
        with _long_reads(f"{slide.path.name}: thumbnail"):
            picture = render_overview(slide, tissue, grid, args.max_size)
    write_with(out, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
    print(f"{out}: {picture.shape[1]} x {picture.shape[0]} px, tissue {100 * tissue.fraction():.1f}%, "
          f"{len(grid)} patches of {grid.patch_size} px (green: tissue outline, blue: patches)")
    return 0
