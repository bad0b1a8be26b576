"""The fault-injection bench (bench/fault_inject.py) must keep working: its classifier is checked
on five throw-away cases whose class is known (a deleted input, a traceback, a silent success
where a refusal was due, a one-line refusal, a hang), and a handful of its cheapest real cases (no training) must come out
clean. The full bench (293 cases; about 15 CPU-minutes, so roughly 9 minutes on a quiet
2-core machine) is run by hand: ``OMP_NUM_THREADS=1 nice -n 10 python bench/fault_inject.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fault_inject as fi  # noqa: E402

#: Cheap real cases (generated inputs only, no model). Each of them failed on commit 07333ba
#: (data lost, a traceback, or exit 0 where a refusal was due) and is clean once issue 12 is fixed.
CHEAP = [
    "export-ome-zarr-onto-itself-overwrite",  # OUT == IN with --overwrite: the source was deleted
    "overview-onto-input",                    # OUT == IN: the slide became its thumbnail
    "overview-max-size-0",                    # a bad number: ZeroDivisionError
    "make-patches-out-inside-images",         # OUT inside IMAGES: was accepted
    "export-png-exists",                      # an existing output without --overwrite: replaced
    "evaluate-ignore-index-99",               # a bad number: ValueError traceback
]


def _probe(id: str, expect: str, code: str) -> fi.Case:
    """A throw-away case running ``code`` next to an input file ``keep.txt``."""
    return fi.Case(id, "cli", expect, lambda c: (c.write("keep.txt", "input\n"), fi.Spec(code=code))[1], needs=())


def test_the_bench_has_enough_cases_covering_every_command():
    ids = [c.id for c in fi.CASES]
    assert len(ids) == len(set(ids)) >= 150
    assert {c.command for c in fi.CASES} >= {"info", "overview", "make-patches", "train-cls", "pseudo-masks", "evaluate",
                                             "train-seg", "predict", "predict-many", "export", "demo", "gui"}
    assert fi.select(["export-*-exists"]) and all(c.id.startswith("export-") for c in fi.select(["export-*-exists"]))


def test_error_lines_skip_argparse_usage_and_warnings():
    usage = ("usage: histo-wsss info [-h] [--patch-size PATCH_SIZE]\n                       slide\n"
             "histo-wsss info: error: argument --patch-size: invalid int value: 'x'\n")
    assert fi.error_lines(usage) == (["histo-wsss info: error: argument --patch-size: invalid int value: 'x'"], 0)
    warned = "/x/slides.py:64: UserWarning: mpp unknown\n  grid = make_grid(slide)\nhisto-wsss info: error: bad\n"
    assert fi.error_lines(warned) == (["histo-wsss info: error: bad"], 1)
    assert len(fi.error_lines("a tifffile log line\nhisto-wsss info: error: bad\n")[0]) == 2


def test_the_classifier_on_known_outcomes(tmp_path):
    probes = [
        _probe("probe-data-lost", "refuse", "import os, sys; os.remove('keep.txt'); print('error: x', file=sys.stderr); sys.exit(2)"),
        _probe("probe-traceback", "refuse", "raise ValueError('boom')"),
        _probe("probe-wrong", "refuse", "print('done')"),
        _probe("probe-clean", "refuse", "import sys; print('error: keep.txt: bad', file=sys.stderr); sys.exit(2)"),
        _probe("probe-hung", "refuse", "import time; time.sleep(30)"),
    ]
    results = fi.run_cases(probes, tmp_path, jobs=2, timeout=3, progress=False)
    assert [r.cls for r in results] == ["data lost", "traceback", "wrong", "clean", "hung"]
    assert results[0].detail == "keep.txt removed"
    assert results[1].first_line == "ValueError: boom"


@pytest.fixture(scope="module")
def cheap_results(tmp_path_factory):
    results = fi.run_cases(CHEAP, tmp_path_factory.mktemp("fault-inject"), jobs=2, progress=False)
    return {r.id: r for r in results}


@pytest.mark.parametrize("case_id", CHEAP)
def test_cheap_cases_are_clean(cheap_results, case_id):
    r = cheap_results[case_id]
    assert r.cls == "clean", f"{case_id}: {r.cls}: {r.first_line} {r.detail}"
