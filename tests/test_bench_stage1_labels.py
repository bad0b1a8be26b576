"""The labels-to-mIoU bench's table (bench/stage1_labels.py): its two readings of issue 13's
target, with the control that shows when the curve is too flat to tell orders apart; and the live-head
bench's (bench/bench_live_labelling.py) split-for-split reading of suggested against random order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stage1_labels as sl  # noqa: E402


def _run(miou: float) -> dict:
    gated = {"miou": miou, "ts_miou": miou, "iou": {"tumor": miou, "stroma": miou, "normal": miou}}
    return {sl.HEADLINE: {"prob": gated, "label": gated}}


def test_table_reads_the_target_both_ways_with_its_control(tmp_path: Path) -> None:
    curves = {"random": {40: 0.40, 80: 0.59, 160: 0.58}, "suggested": {40: 0.50, 80: 0.62, 160: 0.61}}
    res: dict = {}
    for s in range(3):
        for order, curve in curves.items():
            for b, m in curve.items():
                res[f"{order}-b{b}-seed{s}"] = _run(m + 0.01 * s)
        res[f"all-seed{s}"] = {**_run(0.60 + 0.01 * s), "n": 325}
    (tmp_path / "results.json").write_text(json.dumps(res))
    text = sl.table(tmp_path, ["random", "suggested"], [0, 1, 2], [40, 80, 160])
    lines = text.splitlines()
    # the strict reading: random's last budget reached by suggested at 80, and by random itself at 80
    assert any("reached by suggested order at 80 labels (control: by random order itself at 80 labels)" in x
               for x in lines), text
    # the finite-pool reading: every pool patch is reached by suggested at 80 (+0.02 on each seed), not by random
    sugg = next(x for x in lines if x.startswith("suggested minus every pool patch"))
    assert "80: +0.020 ± 0.000 (3 of 3 level or better)" in sugg and sugg.endswith("at 80 labels.")
    rand = next(x for x in lines if x.startswith("random minus every pool patch"))
    assert "160: -0.020 ± 0.000 (0 of 3 level or better)" in rand and rand.endswith("no budget up to 160.")
    assert "| every pool patch | 325 | 3 | 0.610 ± 0.008 |" in text


def test_live_bench_pairs_orders_split_for_split() -> None:
    import bench_live_labelling as bl

    rows = [{"order": o, "budget": 40, "seed": s, "miou": m}
            for s, (r, g) in enumerate([(0.30, 0.35), (0.40, 0.38), (0.50, 0.56)])
            for o, m in (("random", r), ("suggested", g))]
    rows.append({"order": "suggested", "budget": 40, "seed": 9, "miou": 0.9})  # no random partner: left out
    assert bl.paired_text(rows, "suggested", 40) == "+0.030 ± 0.036 (2 of 3 better)"
    assert bl.paired_text(rows, "suggested", 80) == ""
