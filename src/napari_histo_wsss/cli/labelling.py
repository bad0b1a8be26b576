"""``histo-wsss suggest``: the patches to label next, headless.

The same core job as the panel (:func:`~napari_histo_wsss.core.stage1.suggest.project_suggestions`):
on the way it computes whatever the project lacks (tissue mask, patch grid, each slide's feature
cache, kept in the project and resumed after Ctrl-C), fits the live head on the project's patch
labels, compares it with a stage-one run when asked (``--run``; patches where the two disagree
rank higher; off by default: it did not help in the simulated annotator) and prints a ranked batch, saved as ``PROJECT/suggestions.csv``. With no labels yet the
batch covers the slides' tissue types (cold start).
"""

from __future__ import annotations

import argparse
from typing import Any

from tqdm import tqdm

from napari_histo_wsss.cli._progress import StopOnSigint, drive
from napari_histo_wsss.cli._project import open_project_for_writing


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "suggest",
        help="list the patches to label next (a quarter where the live head is unsure, the rest a random sample)",
        description=(
            "Rank the unlabelled patches of PROJECT for labelling: the live head (a linear classifier on "
            "cached frozen-backbone features) is fitted on the project's patch labels; a quarter of a batch is "
            "the typical patches it is least sure about, spread over the slides' feature space, and the rest a "
            "random sample of the other unlabelled patches (all of it before any label). With --run, patches where "
            "a trained stage-one classifier and the live head disagree rank as doubtful too. "
            "Missing tissue masks, patch grids, feature caches and the run's patch predictions are computed first "
            "(kept in the project). The list is printed and saved as PROJECT/suggestions.csv."
        ),
    )
    p.add_argument("project", help="project folder (or its project.json)")
    p.add_argument("--n", type=int, default=20, help="number of patches to suggest (default 20)")
    p.add_argument("--slide", action="append", default=None, metavar="S",
                   help="slide id (repeatable; default: every slide of the project)")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="stage-one run to compare with the live head (patches where they disagree rank higher): a run "
                        "folder, its name under PROJECT/runs or 'newest' (the project's newest classifier run); "
                        "default none (the comparison did not help in the simulated annotator, "
                        "docs/benchmarks/live_labelling.md)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of that run (default best)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.set_defaults(func=run_suggest)


def run_suggest(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.device import apply_thread_policy, pick_device
    from napari_histo_wsss.core.errors import HistoWSSSError, ProjectError
    from napari_histo_wsss.core.stage1.suggest import SUGGESTIONS_NAME, project_suggestions

    if args.n < 1:
        raise HistoWSSSError(f"--n must be at least 1, got {args.n}")
    device = pick_device(args.device)
    apply_thread_policy(gui=False)
    project = open_project_for_writing(args.project)
    for sid in args.slide or []:
        if sid not in project.slides:
            raise ProjectError(f"{project.manifest_path}: unknown slide id {sid!r}; the project has "
                               f"{', '.join(project.slides) or 'no slides'}")

    def show(ev: Any, bar: tqdm) -> None:
        if ev.kind == "cancelled" and ev.message:
            tqdm.write(ev.message)

    with StopOnSigint() as stop:
        name = (args.run or "none").lower()
        run = False if name == "none" else None if name == "newest" else args.run
        last = drive(project_suggestions(project, n=args.n, slide_ids=args.slide, device=device, should_stop=stop,
                                         run=run, which=args.which), "suggest", show)
    if last is None or last.kind != "done":
        return 130
    for w in last.warnings or []:
        print(f"note: {w}")
    print(last.message)
    with_run = any(r.trained for r in last.rows)
    print(f"{'rank':>4}  {'slide':<16} {'x':>7} {'y':>7}  {'reason':<16} {'live head':<28}" + (" trained run" if with_run else ""))
    for r in last.rows:
        print(f"{r.rank:>4}  {r.slide_id:<16} {r.x:>7} {r.y:>7}  {r.reason:<16} {r.predicted:<28}"
              + (f" {r.trained}" if with_run else ""))
    if not project.read_only:
        print(f"saved {project.root / SUGGESTIONS_NAME}")
    return 0
