"""``histo-wsss export``: label images to OME-Zarr, pyramidal TIFF, palette PNG, QuPath GeoJSON,
and a project's patch labels to CSV (all through ``core.io.export``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_histo_wsss.cli._settings import number

FORMATS = ("ome-zarr", "tiff", "png", "geojson", "csv")
_BY_SUFFIX = {".zarr": "ome-zarr", ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".geojson": "geojson",
              ".json": "geojson", ".csv": "csv"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from napari_histo_wsss.core.io.export import GEOJSON_TOLERANCE

    p = subparsers.add_parser(
        "export",
        help="export a prediction or mask as OME-Zarr, pyramidal TIFF, palette PNG or QuPath GeoJSON; patch labels as CSV",
        description=(
            "INPUT: an OME-Zarr written by 'predict', a class-index mask image (with --classes), or a project "
            "folder (with --slide and --mask NAME, e.g. pseudo, corrected, prediction; or OUT.csv for its "
            "patch labels). The format follows OUT's extension (.ome.zarr, .tif, .png, .geojson, .csv) unless "
            "--format is given. GeoJSON coordinates are level-0 pixels (QuPath: File > Import objects). An existing "
            "OUT is replaced only with --overwrite, and only once the new output is complete (a failed export keeps "
            "the old one); OUT may never be, hold or lie inside INPUT, not even with --overwrite."
        ),
    )
    p.add_argument("input", help="prediction .ome.zarr, mask image, or project folder")
    p.add_argument("out", help="output file (or .ome.zarr folder)")
    p.add_argument("--format", choices=FORMATS, default=None, help="output format (default: from OUT's extension)")
    p.add_argument("--classes", default=None, help="class preset or classes JSON for a mask image (default wsss4luad)")
    p.add_argument("--downsample", type=number(float, (0, None), "lo"), default=1.0,
                   help="level-0 pixels per pixel of a mask image (default 1)")
    p.add_argument("--slide", default=None, help="project slide id (with --mask)")
    p.add_argument("--mask", default=None, help="project mask name: pseudo, corrected, prediction, ...")
    p.add_argument("--max-side", type=number(int, (1, None)), default=16384,
                   help="GeoJSON/PNG from a pyramid: the finest level whose longer side is at most this (default 16384)")
    p.add_argument("--include-background", action="store_true", help="GeoJSON: export background polygons too")
    p.add_argument("--min-area", type=number(float, (0, None)), default=0.0, help="GeoJSON: drop regions smaller than this (label pixels)")
    p.add_argument("--split", action="store_true",
                   help="GeoJSON: one Polygon feature per connected region (default: one MultiPolygon per class)")
    p.add_argument("--tolerance", type=number(float, (0, None)), default=GEOJSON_TOLERANCE, metavar="PX",
                   help="GeoJSON: simplification tolerance in pixels of the exported level (times its downsample "
                        f"in level-0 pixels); 0 keeps the exact pixel edges (default {GEOJSON_TOLERANCE:g})")
    p.add_argument("--no-holes", dest="holes", action="store_false",
                   help="GeoJSON: fill holes (outer outlines only; default: holes are inner rings)")
    p.add_argument("--per-image", action="store_true",
                   help="a project mask of a patch folder (--slide, --mask) as one palette PNG per image, named after "
                        "the images, in the folder OUT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (any format) once the new output is complete; never INPUT")
    p.set_defaults(func=run)


def _format(out: Path, given: str | None) -> str:
    from napari_histo_wsss.core.errors import HistoWSSSError

    if given:
        return given
    name = out.name.lower()
    if name.endswith(".ome.zarr") or name.endswith(".zarr"):
        return "ome-zarr"
    fmt = _BY_SUFFIX.get(out.suffix.lower())
    if fmt is None:
        raise HistoWSSSError(f"{out}: cannot tell the format from the extension; use --format ({', '.join(FORMATS)})")
    return fmt


def _source(args: argparse.Namespace) -> tuple[list[Any], list[float], Any, float | None]:
    """(levels as class-index arrays, their downsamples, class table, mpp) of the input."""
    from napari_histo_wsss.core.data.datasets import read_index_mask, resolve_classes
    from napari_histo_wsss.core.errors import HistoWSSSError

    src = Path(args.input)
    if src.is_dir() and ((src / ".zgroup").is_file() or (src / "zarr.json").is_file()):
        from napari_histo_wsss.core.io.export import open_label_pyramid

        pyr = open_label_pyramid(src)
        return pyr.index_levels(), pyr.level_downsamples, pyr.classes, pyr.meta.get("mpp")
    if src.is_dir() or src.name == "project.json":
        from napari_histo_wsss.core.data.project import Project

        project = Project.open(src)
        if not (args.slide and args.mask):
            raise HistoWSSSError(f"{src}: a project export needs --slide and --mask (or an OUT.csv for the patch labels)")
        arr, ds = _project_mask(project, args, src)
        return [arr], [ds], project.classes, project.slides[args.slide].mpp
    if not src.is_file():
        raise HistoWSSSError(f"{src}: input not found")
    classes = resolve_classes(args.classes or "wsss4luad")
    return [read_index_mask(src, classes)], [float(args.downsample)], classes, None


def _project_mask(project, args: argparse.Namespace, src: Path):
    """The ``--mask`` label image of ``--slide`` in an open project, and its downsample; one
    error line naming the project when it is missing or not a label image."""
    from napari_histo_wsss.core.errors import HistoWSSSError

    found = project.read_mask(args.slide, args.mask)
    if found is None:
        raise HistoWSSSError(f"{src}: slide {args.slide} has no mask {args.mask!r}")
    arr, ds = found
    if arr.ndim != 2:
        raise HistoWSSSError(f"{src}: mask {args.mask!r} is a {arr.ndim}-D stack, not a label image")
    return arr.astype("uint8"), ds


def _check_out(args: argparse.Namespace, out: Path, fmt: str) -> None:
    """Refuse OUT before anything is read: an existing OUT without --overwrite, and INPUT itself
    (or a folder around or inside it) always; a project folder may hold exports but not be one."""
    from napari_histo_wsss.core.io.atomic import check_output

    src = Path(args.input)
    zarr_input = src.is_dir() and ((src / ".zgroup").is_file() or (src / "zarr.json").is_file())
    if zarr_input or not (src.is_dir() or src.name == "project.json"):
        inputs, protect = [src], []
    else:
        inputs, protect = [], [src, src.parent if src.name == "project.json" else src]
    check_output(out, inputs=inputs, protect=protect, overwrite=args.overwrite, what="output",
                 folder=None if fmt == "ome-zarr" else False)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_histo_wsss.core.io import export

    out = Path(args.out)
    if args.per_image:
        return _per_image(args, out)
    fmt = _format(out, args.format)
    _check_out(args, out, fmt)
    if fmt == "csv":
        from napari_histo_wsss.core.data.project import Project

        project = Project.open(args.input)
        export.export_patch_labels_csv(project.patch_labels(args.slide), out)
        print(f"wrote {out}")
        return 0
    levels, downsamples, classes, mpp = _source(args)
    if fmt == "ome-zarr":
        export.export_ome_zarr(levels[0], out, classes, downsample=downsamples[0], mpp=mpp, overwrite=args.overwrite)
    elif fmt == "tiff":
        export.export_tiff(levels, out, classes, downsample=downsamples[0], mpp=mpp)
    else:
        k = export.level_for_max_side([tuple(lv.shape) for lv in levels], args.max_side)
        arr = np.asarray(levels[k])
        if fmt == "png":
            export.export_palette_png(arr, out, classes)
        else:
            export.export_geojson(arr, out, classes, downsample=downsamples[k], include_background=args.include_background,
                                  min_area=args.min_area, split=args.split, tolerance=args.tolerance, holes=args.holes)
        if k:
            print(f"used pyramid level {k} ({arr.shape[1]}x{arr.shape[0]} px, downsample {downsamples[k]:g})")
    print(f"wrote {out}")
    return 0


def _per_image(args: argparse.Namespace, out: Path) -> int:
    """``--per-image``: a patch folder's project mask as one palette PNG per image in OUT."""
    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.errors import HistoWSSSError
    from napari_histo_wsss.core.io.atomic import check_output
    from napari_histo_wsss.core.io.export import export_patch_folder_pngs

    src = Path(args.input)
    if args.format not in (None, "png") or not (src.is_dir() or src.name == "project.json"):
        raise HistoWSSSError(f"{src}: --per-image writes palette PNGs from a project mask (a project, --slide, --mask)")
    project = Project.open(src)
    if not (args.slide and args.mask):
        raise HistoWSSSError(f"{src}: --per-image needs --slide and --mask")
    with project.open_slide(args.slide) as slide:
        regions = slide.regions
    if not regions:
        raise HistoWSSSError(f"{project.slide_path(args.slide)}: slide {args.slide} is not a patch folder; "
                             "--per-image cuts a patch folder's mask into its images")
    # never into the patch folder itself: new PNGs there would change the folder the project holds
    check_output(out, inputs=[project.slide_path(args.slide)], protect=[project.root], overwrite=args.overwrite,
                 what="output folder", folder=True)
    arr, ds = _project_mask(project, args, src)  # from the project opened above, not a second time
    files = export_patch_folder_pngs(arr, regions, out, project.classes, downsample=ds)
    print(f"wrote {len(files)} masks to {out}")
    return 0
