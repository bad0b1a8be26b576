"""Run the whole performance suite in one go and write ``docs/benchmarks.md``.

Each benchmark is a standalone script in this folder that measures its figures side by side in one
run and prints a Markdown table of ratios against the yardstick it states. This
runner calls them one after the other (never in parallel: they measure the same CPU), collects
their output, and writes one report with the machine it ran on and the exact commands, so the
numbers in the docs always come from one run of one command:

    python bench/run_all.py              # everything (about 10-20 minutes on 2 CPU cores)
    python bench/run_all.py --only open infer
    python bench/run_all.py --no-write   # print only

A failing benchmark is reported in the table with its error, and the runner exits non-zero.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (key, script, arguments, what it measures) in report order.
SUITE: list[tuple[str, str, list[str], str]] = [
    ("open", "bench_open.py", [], "slide open + first thumbnail: 2k real SVS vs generated 50k x 50k pyramidal TIFF"),
    ("patch folder", "bench_patch_folder.py", ["--n", "100", "1000", "--no-features"],
     "patch folders of 100 and 1,000 patches: open, thumbnail, tissue, grid (feature cache: docs/benchmarks/open.md)"),
    ("models", "bench_models.py", ["--models", "efficientnet-lite0", "resnet18", "--sizes", "224", "--repeats", "3"],
     "classifier forward/backward and CAM throughput per backbone"),
    ("train", "stage1_throughput.py", ["--sizes", "128,224", "--strides", "32", "--steps", "3"],
     "training step split into data loading and compute (CAM classifier, batch 16)"),
    ("infer", "bench_infer.py", [], "whole-slide inference / bare forward throughput; peak memory vs slide size"),
    ("threshold", "bench_threshold.py", [], "CAM-threshold slider to pixels on screen for a 7000-px slide view (real viewer)"),
    ("gui", "bench_gui_stall.py", [], "longest GUI event-loop stall while training"),
    ("threads", "bench_threads.py", [], "stage-two training step alone and beside a busy process: torch defaults vs the thread policy"),
]


def machine() -> str:
    """One line describing the machine the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def run_one(script: str, args: list[str]) -> tuple[int, str, float]:
    """Run one benchmark script; returns (exit status, its stdout+stderr tail, seconds)."""
    env = dict(os.environ)
    cmd = [sys.executable, str(HERE / script), *args]
    if script == "bench_gui_stall.py" and not env.get("DISPLAY"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1200x24", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout.strip()
    if proc.returncode != 0:
        out += "\n\n```\n" + proc.stderr.strip()[-3000:] + "\n```"
    return proc.returncode, out, time.perf_counter() - t0


def _method_reports() -> str:
    """The reports of longer runs with their own commands (method quality; the simulated annotator
    and the GUI stall bench; the GPU check, run on a GPU machine with ``bench/gpu_check.sh``; the
    fault-injection bench), appended verbatim."""
    parts = []
    for name in ("stage1.md", "stage2.md", "live_labelling.md", "gui.md", "gpu.md", "faults.md"):
        path = ROOT / "docs" / "benchmarks" / name
        if path.exists():
            body = path.read_text().strip()
            parts.append(f"\n---\n\n<!-- included from docs/benchmarks/{name} -->\n\n{body}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="keys to run: " + ", ".join(k for k, *_ in SUITE))
    parser.add_argument("--no-write", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    chosen = [s for s in SUITE if not args.only or s[0] in args.only]
    unknown = set(args.only or ()) - {k for k, *_ in SUITE}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    sections, failed = [], []
    for key, script, sargs, what in chosen:
        if not (HERE / script).exists():
            sections.append(f"## {key}: {what}\n\nnot run: `bench/{script}` is missing\n")
            failed.append(key)
            continue
        print(f"[bench] {key}: python bench/{script} {' '.join(sargs)}", flush=True)
        rc, out, secs = run_one(script, sargs)
        print(out, flush=True)
        status = "" if rc == 0 else f" (FAILED, exit {rc})"
        if rc:
            failed.append(key)
        sections.append(f"## {key}: {what}{status}\n\n`python bench/{script} {' '.join(sargs)}` ({secs:.0f} s)\n\n{out}\n")

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python bench/run_all.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    report = (
        "# Benchmarks\n\n"
        f"Latest run of the performance suite: `{cmd}`, {stamp}.\n\n"
        f"Machine: {machine()}.\n\n"
        "Every figure below is measured side by side in the same run; each section states its yardstick. "
        "The method-quality measurements (mIoU of stage one and stage two) are longer runs with "
        "their own commands: see `docs/benchmarks/stage1.md` and `docs/benchmarks/stage2.md`.\n\n"
        + "\n".join(sections)
        + _method_reports()
    )
    if not args.no_write:
        target = ROOT / "docs" / "benchmarks.md"
        from napari_histo_wsss.core.io.atomic import write_text

        write_text(target, report)
        print(f"[bench] wrote {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
