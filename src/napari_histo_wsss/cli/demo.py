"""``histo-wsss demo OUT``: the README's main job, the whole pipeline headless on real data.

It is nothing but a script of the other subcommands, so every step it shows is a command a user
can run on their own data (each is printed before it runs, and ``OUT/commands.sh`` keeps them):

1. the bundled real Aperio slide: ``info`` and ``overview`` (tissue contour + patch grid PNG), and a
   project folder with the slide, its tissue mask and its patch grid;
2. with the shared WSSS4LUAD data (``HISTO_WSSS_DATA``, or ``--data``): ``make-patches`` builds a
   weak-label training set from part of the annotated images (held-out images split by image),
   ``train-cls`` trains the CAM classifier with its default settings, ``pseudo-masks`` +
   ``evaluate`` score its pseudo-masks on the held-out images, ``train-seg`` trains the stage-two
   segmenter on pseudo-masks with Mosaic/Bezier synthesis, ``predict`` + ``evaluate`` score it, ``predict`` runs it over the
   bundled slide into an OME-Zarr label pyramid, and ``export`` writes QuPath GeoJSON and a TIFF.

``OUT/summary.md`` collects the scores. Without the shared data only step 1 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from napari_histo_wsss.core.errors import HistoWSSSError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline headless on the bundled slide and the shared WSSS4LUAD data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", nargs="?", default="out", help="output folder (default ./out)")
    p.add_argument("--data", default=None,
                   help="shared data folder (default: $HISTO_WSSS_DATA, else ../shared/data)")
    p.add_argument("--epochs", type=int, default=None,
                   help="stage-one training epochs (default: train-cls's own default, as for any run)")
    p.add_argument("--seg-epochs", type=int, default=6, help="stage-two training epochs (default 6)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--slide-only", action="store_true", help="only step 1 (slide info, overview, project)")
    p.set_defaults(func=run)


def _sample_slide() -> Path:
    from napari_histo_wsss.sample_data import sample_slide_path

    return sample_slide_path()


class _Script:
    """Runs subcommands in this process, echoing each and keeping them in ``commands.sh``."""

    def __init__(self, out: Path):
        self.out = out
        self.lines = ["#!/usr/bin/env bash", "# the commands `histo-wsss demo` ran, in order", "set -euo pipefail"]

    def __call__(self, *args: str, capture: bool = False) -> str:
        from napari_histo_wsss.cli import main

        line = "histo-wsss " + " ".join(shlex.quote(str(a)) for a in args)
        self.lines.append(line)
        print(f"\n$ {line}", flush=True)
        t0 = time.perf_counter()
        buf = StringIO()
        if capture:
            with redirect_stdout(buf):
                rc = main([str(a) for a in args])
            print(buf.getvalue(), end="")
        else:
            rc = main([str(a) for a in args])
        if rc:
            raise HistoWSSSError(f"demo step failed (exit {rc}): {line}")
        print(f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        return buf.getvalue()

    def save(self) -> None:
        from napari_histo_wsss.core.io.atomic import write_text

        write_text(self.out / "commands.sh", "\n".join(self.lines) + "\n")


def _data_dir(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("HISTO_WSSS_DATA"), str(Path.cwd().parent / "shared" / "data")):
        if cand and (Path(cand) / "wsss4luad-subset" / "val").is_dir():
            return Path(cand)
    return None


def _project(out: Path, slide: Path) -> str:
    """Step 1b: a project folder holding the sample slide, its tissue mask and patch grid."""
    from napari_histo_wsss.cli._project import open_project_for_writing
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.data.project import Project

    root = out / "project"
    project = open_project_for_writing(root) if (root / "project.json").exists() else Project.create(root, get_preset("wsss4luad"))
    slide_id = next((k for k, r in project.slides.items() if Path(r.path) == slide), None) or project.add_slide(slide)
    grid = project.grid(slide_id)
    return f"project {root}: slide {slide_id}, {len(grid)} tissue patches of {grid.patch_size} px"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sh = _Script(out)
    summary = ["# histo-wsss demo", ""]
    t_start = time.perf_counter()
    try:
        slide = _sample_slide()
        info = sh("info", slide, "--json", capture=True)
        sh("overview", slide, out / "overview.png", "--overwrite")  # a rerun into OUT replaces its outputs
        summary += ["## Bundled slide", "", _describe(json.loads(info)), "",
                    f"Overview with tissue contour and patch grid: `{out / 'overview.png'}`", "",
                    _project(out, slide), ""]
        data = None if args.slide_only else _data_dir(args.data)
        if data is None and not args.slide_only:
            print("\n[demo] shared WSSS4LUAD data not found (set HISTO_WSSS_DATA): stopping after the slide steps")
        if data is not None:
            summary += _pipeline(sh, out, data, slide, args)
    finally:
        sh.save()
    from napari_histo_wsss.core.io.atomic import write_text

    summary += [f"Total time: {time.perf_counter() - t_start:.0f} s. Commands: `{out / 'commands.sh'}`."]
    write_text(out / "summary.md", "\n".join(summary) + "\n")
    print(f"\n[demo] done: {out / 'summary.md'}")
    return 0


def _describe(info: dict) -> str:
    """One line from ``info --json``."""
    w, h = info["dimensions"]
    stored = sum(1 for lv in info["levels"] if lv.get("stored", True))
    grid = info.get("grid") or {}
    return (f"`{Path(info['path']).name}`: {info['format']}, {w} x {h} px, {info.get('mpp')} um/px, "
            f"{info.get('objective_power')}x, {len(info['levels'])} levels ({stored} stored, the rest built lazily), "
            f"tissue {100 * info['tissue_fraction']:.1f} %, {grid.get('patches')} patches of {grid.get('patch_size')} px "
            f"at {grid.get('mpp', 0):.2f} um/px.")


def _scores(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _pipeline(sh: _Script, out: Path, data: Path, slide: Path, args: argparse.Namespace) -> list[str]:
    wsss = data / "wsss4luad-subset" / "val"
    patches, run_dir = out / "patches", out / "run"
    if not (patches / "patches.csv").exists():
        sh("make-patches", wsss / "img", wsss / "mask", patches, "--classes", "wsss4luad",
           "--patch-size", "128", "--stride", "64", "--val-fraction", "0.2", "--test-fraction", "0.3", "--seed", "0")
    test_img, test_mask = patches / "test" / "img", patches / "test" / "mask"
    # a rerun into the same OUT continues (or keeps) what an earlier run trained
    again = ["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else []
    # stage one with train-cls's defaults (the ones the Training panel shows), measured in docs/benchmarks/stage1.md
    epochs = ["--epochs", args.epochs] if args.epochs is not None else []
    sh("train-cls", patches, run_dir, *epochs, "--device", args.device, "--seed", "0", *again)
    sh("pseudo-masks", run_dir, test_img, out / "pseudo_test", "--overwrite")
    s1 = _scores(sh("evaluate", out / "pseudo_test", test_mask, "--json", capture=True))
    again = ["--resume"] if (run_dir / "segmenter" / "checkpoints" / "last.pt").exists() else []
    # Mosaic/Bezier synthesis: the best stage two measured on WSSS4LUAD (docs/benchmarks/stage2.md)
    sh("train-seg", run_dir, "--dataset", patches, "--epochs", args.seg_epochs, "--synthesis", "mosaic,bezier",
       "--device", args.device, *again)
    sh("predict", run_dir, test_img, out / "pred_test", "--overwrite")
    s2 = _scores(sh("evaluate", out / "pred_test", test_mask, "--json", capture=True))
    zarr = out / "slide_prediction.ome.zarr"
    sh("predict", run_dir, slide, zarr, "--overwrite")
    sh("export", zarr, out / "slide_prediction.geojson", "--overwrite")
    sh("export", zarr, out / "slide_prediction.tif", "--overwrite")

    def row(name: str, s: dict) -> str:
        per = " | ".join(f"{v:.3f}" if v is not None else "n/a" for v in s["per_class_iou"].values())
        return f"| {name} | {s['miou']:.3f} | {s['fwiou']:.3f} | {per} |"

    names = " | ".join(s1["per_class_iou"])
    return [
        "## Pipeline on WSSS4LUAD (held-out test images, split by image)", "",
        f"{s1['n_images']} test images never seen in training; stage one with train-cls's defaults"
        f"{f' ({args.epochs} epochs)' if args.epochs is not None else ''}, {args.seg_epochs} stage-two epochs.", "",
        f"| | mIoU | fwIoU | {names} |", "|---" * (3 + len(s1["per_class_iou"])) + "|",
        row("stage one pseudo-masks (CAM classifier, image labels unknown)", s1), row("stage two segmenter (MLPS + Mosaic/Bezier synthesis)", s2), "",
        f"Whole-slide prediction of the bundled slide: `{zarr}`, QuPath GeoJSON `{out / 'slide_prediction.geojson'}`, "
        f"TIFF `{out / 'slide_prediction.tif'}`.", "",
    ]

