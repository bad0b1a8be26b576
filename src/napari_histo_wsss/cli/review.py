"""``histo-wsss cams``: a project's slide CAMs and pseudo-masks, headless.

The Review panel's "Compute CAMs" from the command line: the same core job
(:func:`~..core.review.compute_slide_cams`) with the same settings writes the project masks
``cam``, ``cam_probs`` and ``pseudo`` of each slide, which stage two (``train-seg`` on the
project) reads. Existing layers are replaced only with ``--overwrite``; the pathologist's
``corrected``, ``corrected_flag`` and ``reviewed`` masks are never touched. Ctrl-C stops after
the current tile and writes nothing for that slide (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import argparse
from typing import Any

from tqdm import tqdm

from napari_histo_wsss.cli._progress import StopOnSigint, drive
from napari_histo_wsss.cli._project import open_project_for_writing
from napari_histo_wsss.cli._settings import add_settings, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from napari_histo_wsss.core.review import ReviewSettings

    p = subparsers.add_parser(
        "cams",
        help="compute a project's slide CAMs and pseudo-masks (the Review panel's 'Compute CAMs')",
        description=(
            "Apply a classifier run of PROJECT to its slides tile by tile and store each slide's CAMs "
            "(cam, cam_probs) and automatic pseudo-mask (pseudo) in the project, exactly as the Review panel "
            "does; stage two (train-seg PROJECT) trains on them. Existing layers are kept unless --overwrite; "
            "the pathologist's corrections (corrected, corrected_flag, reviewed) are never replaced."
        ),
    )
    p.add_argument("project", help="project folder (or its project.json)")
    p.add_argument("--slide", action="append", default=None, metavar="S",
                   help="slide id (repeatable; default: every slide of the project)")
    p.add_argument("--run", default=None,
                   help="classifier run: a folder name under PROJECT/runs or a path (default: the newest cls-* run)")
    p.add_argument("--overwrite", action="store_true", help="replace existing cam, cam_probs and pseudo layers")
    add_settings(p, ReviewSettings)  # one option per ReviewSettings field, from its declaration
    p.set_defaults(func=run_cams)


def run_cams(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.errors import ProjectError
    from napari_histo_wsss.core.review import (
        PATHOLOGIST_MASKS,
        ReviewSettings,
        compute_slide_cams,
        existing_computed,
        resolve_run,
    )

    project = open_project_for_writing(args.project)
    slides = args.slide or list(project.slides)
    if not slides:
        raise ProjectError(f"{project.root}: the project has no slides; add one first")
    for sid in slides:
        if sid not in project.slides:
            raise ProjectError(f"{project.manifest_path}: unknown slide id {sid!r}; the project has "
                               f"{', '.join(project.slides) or 'no slides'}")
    if not args.overwrite:  # refuse before computing anything, not after the first slides
        taken = {sid: existing_computed(project, sid) for sid in slides}
        taken = {sid: names for sid, names in taken.items() if names}
        if taken:
            listing = "; ".join(f"{sid}: {', '.join(names)}" for sid, names in taken.items())
            raise ProjectError(f"{project.root}: slides already hold CAM layers ({listing}); pass --overwrite to "
                               f"replace them (the pathologist's {', '.join(PATHOLOGIST_MASKS)} are never replaced)")
    run_dir = resolve_run(project, args.run)
    settings = settings_from_args(ReviewSettings, args)
    settings.validate()
    print(f"classifier run {run_dir}")

    def show(ev: Any, bar: tqdm) -> None:
        if ev.kind in ("start", "log", "cancelled", "done") and ev.message:
            tqdm.write(ev.message)

    with StopOnSigint() as stop:
        for sid in slides:
            last = drive(compute_slide_cams(project, sid, run_dir, settings, should_stop=stop, overwrite=args.overwrite,
                                            keep_partial=False), f"cams {sid}", show)
            if last is not None and last.kind == "cancelled":
                return 130
    return 0
