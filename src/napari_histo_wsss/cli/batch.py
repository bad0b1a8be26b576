"""``histo-wsss predict-many``: whole-slide prediction of many slides with Dask.

Thin over :func:`~..core.stage2.batch.predict_many`: collects the slides (files, folders, ``.txt``
lists), starts a LocalCluster or connects to a scheduler, prints one line per finished slide and
a summary table, and exits non-zero when any slide failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from napari_histo_wsss.cli._settings import add_settings_lazily, settings_from_args
from napari_histo_wsss.core.errors import HistoWSSSError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict-many",
        help="predict many slides with a trained segmenter, scheduled with Dask",
        description=(
            "Predict every slide of SLIDES (slide files, folders of slides, or .txt files listing one slide path "
            "per line) with the segmenter of RUN_DIR into OUT/<slide name>.ome.zarr (OME-Zarr label pyramids). "
            "One Dask task per slide on a LocalCluster (default) or on the scheduler at --scheduler; a failing "
            "slide is reported in one line, never skipped silently (only transient I/O errors, such as a stale "
            "network-share handle, are retried first: --retries); the exit status is 1 when any slide failed. "
            "Rerunning skips complete outputs and redoes interrupted (incomplete) ones. "
            "Use only a scheduler you trust: a Dask scheduler runs the code it is sent and unpickles what the "
            "workers return, for anyone who can reach it; across machines, use a tls:// address with "
            "--tls-ca/--tls-cert/--tls-key."
        ),
    )
    p.add_argument("run_dir", help="segmenter run folder (a train-seg output, or a stage-one run holding segmenter/)")
    p.add_argument("slides", nargs="+", help="slide files, folders of slides, or .txt lists of slide paths")
    p.add_argument("--out", required=True, help="output folder for the OME-Zarr predictions")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running, trusted Dask scheduler (tcp://host:8786, or tls://host:8786 with the "
                        "--tls-* files); default: a local cluster")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up on a --scheduler that does not answer within this time (default 10)")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="TLS: CA certificate that signed the cluster's")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS: this client's certificate")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS: this client's private key")
    p.add_argument("--workers", type=int, default=2, help="local cluster: number of worker processes (default 2)")
    p.add_argument("--threads", action="store_true",
                   help="local cluster: run the workers as threads of this process instead of processes")
    p.add_argument("--retries", type=int, default=2, help="retries of a slide after a transient I/O error (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines instead of a table")
    # one option per PredictSettings field, from its declaration (added when predict-many parses: it imports torch)
    add_settings_lazily(p, _predict_settings_class)
    p.set_defaults(func=run_predict_many)


def _predict_settings_class() -> Any:
    from napari_histo_wsss.core.stage2.batch import PredictSettings

    return PredictSettings


def collect_slides(inputs: list[str]) -> list[Path]:
    """Expand ``inputs`` into slide paths: a folder gives its slide files (by extension, not
    recursive, dot-files skipped, sorted); a ``.txt`` file gives one path per line (blank lines
    and ``#`` comments skipped; relative paths are relative to the list's folder); anything
    else is taken as a slide path as is (a missing one then fails visibly as that slide)."""
    from napari_histo_wsss.core.slides.slide import SLIDE_SUFFIXES

    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(c for c in p.iterdir()
                           if c.is_file() and not c.name.startswith(".") and c.name.lower().endswith(SLIDE_SUFFIXES))
            if not found:
                raise HistoWSSSError(f"{p}: no slide files in this folder ({', '.join(SLIDE_SUFFIXES)})")
            out.extend(found)
        elif p.suffix.lower() == ".txt" and p.is_file():
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise HistoWSSSError(f"{p}: cannot read the slide list: {e}") from e
            for line in lines:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    q = Path(entry).expanduser()
                    out.append(q if q.is_absolute() else p.parent / q)
        else:
            out.append(p)
    unique = list(dict.fromkeys(out))  # a slide named twice is predicted once
    if not unique:
        raise HistoWSSSError("no slides given")
    return unique


def _table(results: list) -> str:
    rows = [("slide", "status", "seconds", "tiles", "output / error")]
    for r in results:
        rows.append((r.slide.name, r.status, "-" if r.status == "failed" else f"{r.seconds:.1f}",
                     "" if r.tiles is None else str(r.tiles),
                     r.error if r.status == "failed" else str(r.out)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 14)
    return "\n".join(lines)


def _security(args: argparse.Namespace) -> object | None:
    """The TLS ``Security`` of --tls-ca/--tls-cert/--tls-key (all three or none), checked before
    any work."""
    from napari_histo_wsss.core.stage2.batch import tls_security

    given = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise HistoWSSSError(f"TLS needs --tls-ca, --tls-cert and --tls-key together; missing {', '.join(missing)}")
    if args.scheduler is None:
        raise HistoWSSSError("--tls-ca/--tls-cert/--tls-key are for a remote scheduler; give --scheduler tls://host:port")
    return tls_security(args.tls_ca, args.tls_cert, args.tls_key)


def run_predict_many(args: argparse.Namespace) -> int:
    from napari_histo_wsss.core.io.atomic import check_apart
    from napari_histo_wsss.core.stage2.batch import CONNECT_TIMEOUT_S, PredictSettings, SlideResult, predict_many

    security = _security(args)
    if args.connect_timeout is not None and args.scheduler is None:
        raise HistoWSSSError("--connect-timeout is for a remote scheduler; give --scheduler too")
    # a folder of slides holds no predictions, not even in a subfolder (predict_many checks the slides and the run)
    check_apart(args.out, inputs=[p for p in args.slides if Path(p).is_dir()], what="output folder")
    slides = collect_slides(args.slides)
    settings = settings_from_args(PredictSettings, args)
    settings.validate()
    where = args.scheduler or f"a local cluster of {args.workers} {'thread' if args.threads else 'process'} worker(s)"
    if args.scheduler:  # say it where it is used: the scheduler runs code
        where += (" (a scheduler you trust: it runs the code it is sent and unpickles the results"
                  + ("; unencrypted" if security is None and not args.scheduler.startswith("tls://") else "") + ")")
    if not args.json:
        print(f"predicting {len(slides)} slide(s) on {where} into {args.out}", flush=True)
    done = 0

    def report(res: SlideResult) -> None:
        nonlocal done
        done += 1
        if args.json:
            print(json.dumps(res.to_dict()), flush=True)
        else:
            detail = res.error if res.status == "failed" else f"{res.seconds:.1f} s"
            print(f"[{done}/{len(slides)}] {res.slide.name}: {res.status} ({detail})", flush=True)

    results = predict_many(args.run_dir, slides, args.out, settings, scheduler=args.scheduler, workers=args.workers,
                           processes=not args.threads, retries=args.retries, on_result=report, security=security,
                           connect_timeout=CONNECT_TIMEOUT_S if args.connect_timeout is None else args.connect_timeout)
    failed = [r for r in results if r.status == "failed"]
    if not args.json:
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        print()
        print(_table(results))
        print(f"\n{counts['done']} done, {counts['skipped']} skipped (already complete), {counts['failed']} failed")
    if failed:
        print(f"histo-wsss predict-many: {len(failed)} slide(s) failed: {', '.join(r.slide.name for r in failed)}",
              file=sys.stderr)
        return 1
    return 0
