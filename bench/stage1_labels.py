"""Simulated annotator for stage one (issue 13): the trained classifier's pseudo-masks on held-out
images against the number of labelled patches, in random order and in the order the product
suggests, with and without the disagreement term.

Protocol (it cannot pick anything on the images it reports): the patch sets and scoring of
``bench/stage1_quality.py``.

* The 31 annotated WSSS4LUAD images are split BY IMAGE by ``make_patches`` (128-px patches every
  64 px; about 16 training images, 6 validation images, 9 test images). Seed ``s`` uses image
  split ``s % 2``: seeds 0, 1, 2 are splits 0, 1, 0. The training images' patches are the
  labelling pool; an oracle has labelled each with the classes its ground truth shows
  (``make_patches``' labels). Validation images choose the checkpoint, the probability threshold,
  the area floor and the offsets; the test images choose nothing.
* Orders over the pool (``--orders``):
  ``random`` (a seeded shuffle); ``suggested`` (``core.stage1.suggest.suggest`` with the product's
  live head refitted on the labels so far, batch by batch: the first batch is a random cold start);
  ``suggested+trained`` (the same, plus the disagreement between the live head and the stage-one
  run trained on the previous budget's labels: ``other_probs``, as ``histo-wsss suggest`` uses the
  project's newest run). The live head works on the frozen backbone's features of each patch's
  source image (``core.stage1.features.image_features``), as the project's feature cache does.
* At each budget the default stage-one configuration (``p128-synth-pix`` of
  ``bench/stage1_quality.py``) is trained on the labelled patches only, then scored on the test
  images exactly as there; the headline is the product's default pseudo-masks (``prob-area-crf``:
  image labels unknown). The row "all" is the same configuration on every pool patch
  (``--orders all`` trains it per seed; ``--all-from`` takes ``stage1_quality.py``'s runs). On a
  finite pool every order ends there, so it is random order's final point: the table says at which
  budget each order reaches it, beside the stricter test against random order at the last budget.
* Mean and standard deviation over the seeds.

Usage (2 cores: run two halves at once, then print the table)::

    python bench/stage1_labels.py --work W --part 0/2 --threads 1 &
    python bench/stage1_labels.py --work W --part 1/2 --threads 1 &
    wait; python bench/stage1_labels.py --work W --orders all --part 0/2 --threads 1 &   # and 1/2
    wait; python bench/stage1_labels.py --work W --table

``suggested+trained`` needs the previous budget's run of its own order, so each seed's chain of
that order stays in one part.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stage1_quality as q  # noqa: E402
from bench_live_labelling import diff_text, labelled_sets  # noqa: E402
from stage1_experiments import source_folders  # noqa: E402

from napari_histo_wsss.core.data.datasets import DatasetSpec, load_dataset  # noqa: E402
from napari_histo_wsss.core.stage1.features import FeatureExtractor, FeatureSpec, image_features  # noqa: E402
from napari_histo_wsss.core.stage1.live import standardiser  # noqa: E402
from napari_histo_wsss.core.stage1.suggest import classify_patches, embed  # noqa: E402
from napari_histo_wsss.core.stage1.train import TrainConfig, load_run  # noqa: E402

CONFIG = "p128-synth-pix"
ORDERS = ("random", "suggested", "suggested+trained")
ALL = "all"  # every pool patch, once per seed: the end of every order
HEADLINE = "prob-area-crf"


def pool(split_dir: Path) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """The training patches (``WeakSample``), their oracle labels ``(N, K)``, the live head's
    features ``(N, C)`` (mean backbone features over each patch's cells in its source image) and
    the tissue cells of the pool images ``(M, C)`` (the standardiser's statistics)."""
    spec = load_dataset(split_dir)
    with open(split_dir / "patches.csv", newline="") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f) if r["file"].startswith("train/")}
    img_dir, _, _ = source_folders("wsss4luad", split_dir.parent)
    ext = FeatureExtractor(FeatureSpec())
    feats, X, cells = {}, [], []
    for s in spec.train:
        r = rows[Path(s.path).name]
        src = r["source"]
        if src not in feats:
            feats[src] = image_features(ext, np.asarray(Image.open(img_dir / src).convert("RGB")))
            cells.append(np.asarray(feats[src].features, np.float32)[feats[src].tissue])
        X.append(feats[src].patch_features(np.array([int(r["x"])]), np.array([int(r["y"])]), int(r["size"]))[0])
    Y = np.stack([np.asarray(s.labels, np.float32) for s in spec.train])
    return list(spec.train), Y, np.stack(X), np.concatenate(cells)


def trained_probs(run: Path, samples: list) -> np.ndarray:
    """The stage-one run's class probabilities of every pool patch (``(N, K)``), computed as
    ``core.stage1.suggest.trained_patch_probs`` computes them for a project's grid."""
    model = load_run(run, "best")[0]
    return np.concatenate(list(classify_patches(model, (s.image() for s in samples))))


def order_of(work: Path, order: str, seed: int, budgets: list[int], split_dir: Path) -> dict[int, list[int]]:
    """Budget -> indices of the labelled pool patches, for ``order`` (cached in ``work``).
    ``suggested+trained`` trains the previous budget's run on the way (it needs it)."""
    path = work / "orders" / f"{order}-seed{seed}.json"
    if path.is_file():
        got = {int(k): v for k, v in json.loads(path.read_text()).items()}
        if all(b in got for b in budgets):
            return got
    samples, Y, X, cells = pool(split_dir)
    mean, std = standardiser(cells)
    other = None
    if order == "suggested+trained":
        def other(prev: int, labelled: np.ndarray) -> np.ndarray:
            run = train_subset(work, order, seed, prev, split_dir, np.flatnonzero(labelled).tolist())
            return trained_probs(run, samples)
    sets = labelled_sets("random" if order == "random" else "suggested", budgets, X, Y, embed(X, mean, std),
                         mean, std, seed, other=other)
    got = {b: np.flatnonzero(labelled).tolist() for b, labelled, _ in sets}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(b): v for b, v in got.items()}))
    return got


def train_subset(work: Path, order: str, seed: int, budget: int, split_dir: Path, chosen: list[int]) -> Path:
    """The default configuration trained on the ``chosen`` pool patches only (cached)."""
    def data() -> DatasetSpec:
        spec = load_dataset(split_dir)
        return dataclasses.replace(spec, train=[spec.train[i] for i in chosen])

    cfg = TrainConfig(**q.CONFIGS[CONFIG][2], seed=seed, device="cpu")
    run = work / "runs" / f"{order}-b{budget}-seed{seed}"
    q.train_once(data, run, cfg, f"{order} {budget} seed {seed}", labelled=len(chosen))
    return run


def jobs(orders: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(order, seed) chains, each trained budget by budget in one process."""
    return [(o, s) for o in orders for s in seeds]


ms = q.summarise  # mean ± sd of the values that exist


def table(work: Path, orders: list[str], seeds: list[int], budgets: list[int]) -> str:
    res = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    rows: dict[tuple[str, int], dict[int, dict]] = {}
    for o in orders:
        for b in budgets:
            got = {s: res[f"{o}-b{b}-seed{s}"] for s in seeds if f"{o}-b{b}-seed{s}" in res}
            if got:
                rows[(o, b)] = got
    if not rows:
        return "(no finished runs)"
    names = list(next(iter(next(iter(rows.values())).values()))[HEADLINE]["prob"]["iou"])

    def line(label: str, n: str, rr: list[dict], extra: str) -> str:
        return (f"| {label} | {n} | {len(rr)} | {ms([r[HEADLINE]['prob']['miou'] for r in rr])} | "
                f"{ms([r[HEADLINE]['label']['miou'] for r in rr])} | "
                + " | ".join(ms([r[HEADLINE]['prob']['iou'].get(k) for r in rr]) for k in names)
                + f" | {ms([r[HEADLINE]['prob']['ts_miou'] for r in rr])} |{extra}")

    lines = ["| order | labelled patches | runs | prob-gated mIoU (default) | label-gated | "
             + " | ".join(f"{k} IoU" for k in names) + " | tumour/stroma mIoU |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for (o, b), got in rows.items():
        lines.append(line(o, str(b), list(got.values()), ""))
    # random order's final point on the finite pool: every pool patch (the same set for every order)
    every = {s: res[f"all-seed{s}"] for s in seeds if f"all-seed{s}" in res}
    sizes = sorted({r["n"] for r in every.values()})
    pool_n = "" if not sizes else str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    if every:
        lines.append(line("every pool patch", pool_n, list(every.values()), ""))
    base = res.get("baselines", {})
    for label in ("one class", "image-label rule", "majority oracle"):
        vals = [base[f"split{s % 2}"][label] for s in seeds if label in base.get(f"split{s % 2}", {})]
        if vals:
            lines.append(f"| baseline: {label} | - | {len(vals)} | {ms([v['miou'] for v in vals])} | - | "
                         + " | ".join(ms([v['iou'].get(k) for v in vals]) for k in names) + " | - |")
    # paired differences against random order, run for run (same seed: same split, same first batch size)
    lines.append("")

    def mean_of(o: str, b: int, only: set | None = None) -> float:
        return float(np.mean([r[HEADLINE]["prob"]["miou"] for s, r in rows[(o, b)].items() if only is None or s in only]))

    def paired(runs: dict[int, dict], ref: dict[int, dict]) -> list[float]:
        """Headline mIoU minus ``ref``'s, seed by seed, on the seeds both have."""
        return [runs[s][HEADLINE]["prob"]["miou"] - ref[s][HEADLINE]["prob"]["miou"]
                for s in sorted(set(runs) & set(ref))]

    for o in orders:
        if o == "random":
            continue
        parts = []
        for b in budgets:
            if (o, b) in rows and ("random", b) in rows:
                d = paired(rows[(o, b)], rows[("random", b)])
                parts.append(f"{b}: {diff_text(d)}")
        if parts:
            lines.append(f"{o} minus random, run for run: " + "; ".join(parts) + ".")
    last = budgets[-1]
    if ("random", last) in rows:
        for o in orders:
            if o == "random" or not any((o, b) in rows for b in budgets):
                continue
            common = set(rows[("random", last)])
            for b in budgets:
                common &= set(rows.get((o, b), {})) & set(rows.get(("random", b), {}))
            if not common:
                continue
            final = mean_of("random", last, common)
            reach = next((b for b in budgets if mean_of(o, b, common) >= final - 1e-9), None)
            # the control: where random order itself first reaches its last budget's mean; if that is
            # before the last budget, the curve is flat within the seeds' spread and the test tells nothing
            own = next(b for b in budgets if mean_of("random", b, common) >= final - 1e-9)
            lines.append(f"On the {len(common)} seeds with every budget, random order's mIoU at {last} labels "
                         f"({final:.3f}) is reached by {o} order at "
                         f"{reach if reach is not None else 'no budget up to ' + str(last)} labels "
                         f"(control: by random order itself at {own} labels).")
    # every pool patch, compared budget by budget on the seeds that have both
    for o in orders:
        parts, reach = [], None
        for b in budgets:
            d = paired(rows.get((o, b), {}), every)
            if len(d) < 3:
                continue
            parts.append(f"{b}: {diff_text(d, level=True)}")
            if reach is None and np.mean(d) >= -1e-9:
                reach = b
        if parts:
            lines.append(f"{o} minus every pool patch ({pool_n} labels), run for run: " + "; ".join(parts)
                         + ". Every pool patch's mIoU is reached on average at "
                         + (f"{reach} labels." if reach is not None else f"no budget up to {budgets[-1]}."))
    return "\n".join(lines)


def plot(work: Path, orders: list[str], seeds: list[int], budgets: list[int], path: Path) -> None:
    """The headline mIoU against labelled patches, one line per order (mean of the seeds), with
    the baselines and the every-patch runs as dashed lines."""
    from bench_live_labelling import plot as draw

    res = json.loads((work / "results.json").read_text())
    rows = [{"order": o, "budget": b, "miou": res[f"{o}-b{b}-seed{s}"][HEADLINE]["prob"]["miou"]}
            for o in orders for b in budgets for s in seeds if f"{o}-b{b}-seed{s}" in res]
    lines = {}
    allr = [res[f"all-seed{s}"] for s in seeds if f"all-seed{s}" in res]
    if allr:
        lines[f"every pool patch ({allr[0]['n']})"] = float(np.mean([r[HEADLINE]["prob"]["miou"] for r in allr]))
    for label in ("one class", "majority oracle"):
        vals = [v for v in (res.get("baselines", {}).get(f"split{s % 2}", {}).get(label) for s in seeds) if v]
        if vals:
            lines[label] = float(np.mean([v["miou"] for v in vals]))
    draw(rows, lines, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 40, 80, 160])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--score-budgets", type=int, nargs="+", default=None,
                   help="train and score only these of --budgets (the suggested orders still follow every budget)")
    p.add_argument("--orders", default=",".join(ORDERS),
                   help=f"comma-separated, of {', '.join(ORDERS)} and {ALL} (every pool patch, one run per seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--part", default="0/1", help="i/n: run the i-th of n shares of the (order, seed) chains")
    p.add_argument("--table", action="store_true", help="print the table of the finished runs only")
    p.add_argument("--plot", default="", help="with --table: also draw mIoU against labelled patches to this PNG")
    p.add_argument("--all-from", default="", help="a stage1_quality.py --work holding p128-synth-pix runs of "
                                                   "every pool patch (the 'all' row)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    orders = args.orders.split(",")
    budgets = sorted(args.budgets)
    if args.table:
        print(table(work, orders, args.seeds, budgets))
        if args.plot:
            plot(work, orders, args.seeds, budgets, Path(args.plot))
        return 0
    i, n = (int(v) for v in args.part.split("/"))
    patch, stride, _ = q.CONFIGS[CONFIG]
    classes = scorer = None
    tag = ("" if args.seeds == [0, 1, 2] and args.score_budgets is None
           else "-seeds" + "-".join(map(str, args.seeds)) + "-" + "-".join(orders).replace("+", "-"))
    res_path = work / f"results-part{i}{tag}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    for j, (order, seed) in enumerate(jobs(orders, args.seeds)):
        if j % n != i:
            continue
        split_dir = q.patch_set(work, patch, stride, seed % 2)
        if scorer is None:
            classes = load_dataset(split_dir).classes
            scorer = q.Scorer(classes)
        res.setdefault("baselines", {})[f"split{seed % 2}"] = q.baselines(split_dir, scorer)
        # (result key, budget, the labelled pool patches, what the result also keeps)
        if order == ALL:
            n_pool = len(load_dataset(split_dir).train)
            steps = [(f"all-seed{seed}", n_pool, list(range(n_pool)), {"n": n_pool})]
        else:
            chosen = order_of(work, order, seed, budgets, split_dir)
            steps = [(f"{order}-b{b}-seed{seed}", b, chosen[b], {})
                     for b in (budgets if args.score_budgets is None else sorted(args.score_budgets))]
        for key, b, labelled, extra in steps:
            if key in res:
                continue
            run = train_subset(work, order, seed, b, split_dir, labelled)
            r = q.score_run(run, split_dir, scorer, 200)
            res[key] = {**{g: r[g] for g in (HEADLINE, "prob-area") if g in r}, **extra}
            res_path.write_text(json.dumps(res, indent=1))
            print(f"{key}: {HEADLINE} {r[HEADLINE]['prob']['miou']:.3f}", flush=True)
    if args.all_from and i == 0:
        src = Path(args.all_from)
        allres = json.loads((src / "results.json").read_text())["runs"].get(CONFIG, {})
        for seed in args.seeds:
            r = allres.get(f"split{seed % 2}-seed{seed}")
            if r is not None and HEADLINE in r:
                n_pool = len(load_dataset(q.patch_set(work, patch, stride, seed % 2)).train)
                res[f"all-seed{seed}"] = {HEADLINE: r[HEADLINE], "n": n_pool}
        res_path.write_text(json.dumps(res, indent=1))
    merged = {}
    for part in sorted(work.glob("results-part*.json")):
        for k, v in json.loads(part.read_text()).items():
            if k == "baselines":
                merged.setdefault(k, {}).update(v)
            else:
                merged[k] = v
    (work / "results.json").write_text(json.dumps(merged, indent=1))
    print(table(work, orders, args.seeds, budgets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
