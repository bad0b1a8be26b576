"""The ``histo-wsss`` command line: one subcommand per pipeline step, all over ``core/``.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds an ``argparse`` sub-parser whose ``func(args) -> int`` does the work. Errors derived
from :class:`~napari_histo_wsss.core.errors.HistoWSSSError` are printed as one clear line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from napari_histo_wsss.core.errors import Cancelled, HistoWSSSError

# Modules providing subcommands, in the order they appear in ``--help``.
SUBCOMMAND_MODULES = [
    "slides",      # info
    "patches",     # make-patches
    "labelling",   # suggest (the patches to label next)
    "stage1",      # train-cls, pseudo-masks
    "review",      # cams (the Review panel's slide CAMs and pseudo-masks)
    "evaluate",    # evaluate
    "stage2",      # train-seg, predict
    "export",      # export
    "batch",       # predict-many (Dask)
    "gui",         # gui
    "demo",        # demo (the README's main job)
]


def build_parser() -> argparse.ArgumentParser:
    from napari_histo_wsss import __version__

    parser = argparse.ArgumentParser(
        prog="histo-wsss",
        description="Weakly supervised tissue segmentation of H&E slides (headless face of napari-histo-wsss).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # subcommand module not present in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except Cancelled as e:
        print(f"histo-wsss {args.command}: cancelled: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"histo-wsss {args.command}: interrupted", file=sys.stderr)
        return 130
    except HistoWSSSError as e:
        print(f"histo-wsss {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
