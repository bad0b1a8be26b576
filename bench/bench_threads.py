"""Thread policy under contention: a stage-two training step alone and beside a busy process.

A pathologist's GUI always competes with training for the cores. With torch's defaults (one
intra-op thread per core, OpenMP threads spinning while they wait for each other) one other busy
process on a 2-core machine made a stage-two step of the demo about 10x slower. The engine's
policy (``core.device.apply_thread_policy`` plus the passive OpenMP waiting that
``napari_histo_wsss/__init__.py`` sets before torch loads) should make the slowdown about
proportional to the cores lost.

Each cell is a fresh process (the OpenMP runtime reads its waiting policy once, when torch loads):

* ``old``: torch's defaults (``HISTO_WSSS_THREAD_POLICY=off``, no OpenMP variables), i.e. what
  the code did before the policy;
* ``new``: the headless policy (all cores, passive waiting, one inter-op thread);
* ``new-gui``: the GUI policy (one core left to the viewer).

Each is timed alone and beside a competitor started just before it: ``spin`` (default) is one
Python process burning one core; ``torch`` is a second torch process doing matrix products with
torch's default threads (a competing job). The step is the demo's stage two: the real
``Segmenter`` (EfficientNet-Lite0, output stride 16, image-level head as with synthesis) on a
batch of 8 patches of 224 px, cross-entropy + image-level loss, backward, AdamW.

Run: ``python bench/bench_threads.py [--rounds 2] [--steps 2] [--max-seconds 30] [--busy spin|torch] [--json OUT]``
(about 3-4 minutes on 2 idle cores; nothing else should run meanwhile: the load average is printed
per cell, and the rounds alternate the policies so that background load falls on all alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WAIT_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
POLICIES = ("old", "new", "new-gui")
_SPIN = "while True: pass"
_MATMUL = ("import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a.T / 512)\n")


def _env(policy: str) -> dict[str, str]:
    """The environment of a cell: the user's thread variables removed, so each policy starts from
    the same place; ``old`` also switches the package's policy off."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS + ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.pop("HISTO_WSSS_THREAD_POLICY", None)
    if policy == "old":
        env["HISTO_WSSS_THREAD_POLICY"] = "off"
    return env


def child(args: argparse.Namespace) -> None:
    """One cell: build the model, one warm-up step, then timed steps; prints one JSON line."""
    import torch
    import torch.nn.functional as F

    import napari_histo_wsss  # noqa: F401 - sets the OpenMP waiting policy (unless off) before torch loads
    from napari_histo_wsss.core.device import apply_thread_policy
    from napari_histo_wsss.core.models import Segmenter, parameter_groups

    if args.child != "old":
        apply_thread_policy(gui=args.child == "new-gui")
    torch.manual_seed(0)
    classes = 4
    model = Segmenter(classes, "efficientnet-lite0", weights="none", output_stride=16, aux_head=True).train()
    opt = torch.optim.AdamW(parameter_groups(model, 3e-4), weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, classes, (args.batch, args.size, args.size))
    labels = (torch.rand(args.batch, classes) > 0.5).float()

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits, aux_logits, _cam = model(x, return_aux=True)
        loss = F.cross_entropy(logits, y) + 0.1 * F.multilabel_soft_margin_loss(aux_logits, labels)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    warm = step()
    times: list[float] = []
    while len(times) < args.steps and (not times or sum(times) < args.max_seconds):
        times.append(step())
    print(json.dumps({"policy": args.child, "threads": torch.get_num_threads(),
                      "interop": torch.get_num_interop_threads(),
                      "wait": {k: os.environ.get(k) for k in WAIT_VARS}, "warmup_s": warm, "times": times}))


def _cell(policy: str, busy: str | None, args: argparse.Namespace) -> dict:
    competitor = None
    if busy:
        code = _SPIN if busy == "spin" else _MATMUL
        competitor = subprocess.Popen([sys.executable, "-c", code], env=_env("old"))
        time.sleep(1.0)  # let it start burning before the step is timed
    try:
        cmd = [sys.executable, __file__, "--child", policy, "--steps", str(args.steps), "--max-seconds",
               str(args.max_seconds), "--batch", str(args.batch), "--size", str(args.size)]
        out = subprocess.run(cmd, env=_env(policy), capture_output=True, text=True, timeout=args.timeout)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if out.returncode != 0:
        raise SystemExit(f"cell {policy}/{busy or 'alone'} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per cell and round (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all cells (medians over all rounds' steps)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="stop timing a cell after this many seconds (>= 1 step)")
    ap.add_argument("--busy", choices=("spin", "torch"), default="spin", help="the competitor: one spinning core, or a torch job")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {', '.join(POLICIES)}")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a cell is abandoned")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {cores} cores, load average before {os.getloadavg()[0]:.2f}; stage-two step: Segmenter "
          f"efficientnet-lite0, batch {args.batch} x {args.size} px; competitor: {args.busy}")
    # Rounds in turn over the policies, so that a change in the machine's background load falls on
    # all of them alike rather than on whichever ran first.
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for policy in policies:
            for busy in (None, args.busy):
                res = _cell(policy, busy, args)
                cells.setdefault((policy, busy or "alone"), []).append(res)
                print(f"# round {r + 1} {policy} {busy or 'alone'}: steps {[round(t, 2) for t in res['times']]} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# load average after {os.getloadavg()[0]:.2f}")

    def merged(policy: str, cond: str) -> dict:
        runs = cells[(policy, cond)]
        return {**runs[0], "times": [t for run in runs for t in run["times"]]}

    rows = [(p, merged(p, "alone"), merged(p, args.busy)) for p in policies]
    print()
    print(f"| policy | intra-op threads | OpenMP wait | step alone (s) | step beside a busy process ({args.busy}) (s) "
          f"| slowdown (busy / alone) | busy step vs `{rows[0][0]}` busy |")
    print("|---|---|---|---|---|---|---|")
    old_busy = statistics.median(rows[0][2]["times"]) if rows else 1.0
    for policy, alone, busy in rows:
        a, b = statistics.median(alone["times"]), statistics.median(busy["times"])
        wait = alone["wait"].get("OMP_WAIT_POLICY") or "torch default (spin)"
        print(f"| {policy} | {alone['threads']} | {wait} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {b / old_busy:.2f}x |")
    if args.json:
        from napari_histo_wsss.core.io.atomic import write_json

        write_json(args.json, {"args": vars(args), "rows": [{"policy": p, "alone": a, "busy": b} for p, a, b in rows]})


if __name__ == "__main__":
    main()
