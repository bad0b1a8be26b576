"""Simulated annotator: pseudo-mask quality of the live head against the number of labelled patches,
random order vs suggested order, plus the live loop's speed (issue 13).

Protocol (cannot fool itself):

* The 31 WSSS4LUAD images with masks (``$HISTO_WSSS_DATA/wsss4luad-subset/val``) are split BY IMAGE,
  per seed, into a labelling pool (21 images) and test images (10) that give no label and choose
  nothing; with ``--dataset glas`` the 60 GlaS test-A images (gland / other tissue, no white
  background: GlaS counts a gland's pale lumen as gland) into 40 pool and 20 test images. Nothing is tuned on the test images: the head's settings are fixed in the code.
* The pool images are cut into patches (``--patch`` px, non-overlapping, tissue share >= 10 %).
  The oracle labels a patch with every class covering at least ``--min-share`` of it (a pathologist
  does not label a sliver), from the ground-truth mask.
* Orders: ``random`` (a seeded shuffle) and ``suggested`` (``core.stage1.suggest``: a random first
  batch, then batches a quarter targeted at typical patches the head fitted so far doubts, the rest
  random; ``--explore`` sets the random share, default ``suggest.EXPLORE``; several values give one
  curve each, named ``suggested <share>``).
* At each budget the live head (``core.stage1.live``) is refitted on the labelled patches' cached
  features, and each test image's pseudo-mask is the argmax of its raw CAM logits on tissue (image
  labels unknown: the probability-free, label-free setting), white glass background.
* Scores: MLPS convention (background ground truth ignored), mean and sd over 30 seeds (splits;
  ``--seeds``: 3 seeds gave leads of +0.05 to +0.09 at 10-20 labels that 30 do not keep), and
  suggested minus random split for split (same pool, same test images). Baselines on
  the same test images: one class everywhere (the most frequent class in the pool's labels) and the
  per-image majority oracle (each image painted with its true most frequent class).

Speed: a label-to-overlay update on a 4k x 4k working-resolution view (128 x 128 feature cells):
refit + CAM + argmax, median of 15; the feature build of the bundled slide (``--slide``).

Usage::

    python bench/bench_live_labelling.py                  # table + docs/img/live_labelling.png
    python bench/bench_live_labelling.py --seeds 0 1 2 --budgets 5 10 20 40 80 160   # a quick look
    python bench/bench_live_labelling.py --dataset glas --no-speed --plot docs/img/live_labelling_glas.png
    # how the random share was chosen: development splits, not the reported ones
    python bench/bench_live_labelling.py --seeds 100 101 102 103 104 105 106 107 108 --explore 0 0.25 0.5 0.75 1 --no-speed

Writes the table to stdout (markdown) and to ``--out-md`` when given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.features import FEATURE_STRIDE, FeatureExtractor, FeatureSpec, image_features
from napari_histo_wsss.core.stage1.live import LiveHead, standardiser
from napari_histo_wsss.core.stage1.suggest import EXPLORE, embed, suggest, typicality

DATA = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# the data set's classes, background index and whether white glass is background (set by use_dataset)
NAMES = ["tumor", "stroma", "normal"]
BG = 3
WHITE = True
#: per data set: class names, background index, white glass is background, test images per seed
DATASETS = {"wsss4luad": (["tumor", "stroma", "normal"], 3, True, 10),
            "glas": (["gland", "other tissue"], 2, False, 20)}


def use_dataset(name: str) -> int:
    """Set the module's classes for ``name``; returns its number of test images per seed."""
    global NAMES, BG, WHITE
    NAMES, BG, WHITE, n_test = DATASETS[name]
    return n_test


def load_images(dataset: str = "wsss4luad") -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB, class-index mask) of the shared images: the 31 WSSS4LUAD images with masks, or the 60
    GlaS test-A images with their gland instances as the 2 classes of the ``glas`` preset (0 gland,
    1 other tissue; GlaS counts a gland's pale lumen as gland, so there is no white background)."""
    out = []
    if dataset == "glas":
        root = DATA / "glas-testA"
        for p in sorted((root / "img").glob("*.png")):
            inst = np.asarray(Image.open(root / "mask_instance" / p.name))
            out.append((np.asarray(Image.open(p).convert("RGB")), np.where(inst > 0, 0, 1).astype(np.uint8)))
        return out
    root = DATA / "wsss4luad-subset" / "val"
    for p in sorted((root / "img").glob("*.png")):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        gt = np.asarray(Image.open(root / "mask" / p.name))
        out.append((rgb, gt))
    return out


def _glass(rgb: np.ndarray) -> np.ndarray:
    return white_background_mask(rgb) if WHITE else np.zeros(rgb.shape[:2], bool)


def patches_of(feat, gt: np.ndarray, size: int, min_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and oracle labels of the non-overlapping patches of one image."""
    h, w = gt.shape
    xs, ys, labels = [], [], []
    for y in range(0, max(1, h - size // 2), size):
        for x in range(0, max(1, w - size // 2), size):
            g = gt[y:y + size, x:x + size]
            tissue = g != BG
            if tissue.mean() < 0.1:
                continue
            share = np.array([(g == k).mean() for k in range(len(NAMES))])
            lab = (share >= min_share).astype(np.uint8)
            if not lab.any():
                continue
            xs.append(x)
            ys.append(y)
            labels.append(lab)
    if not xs:
        return np.zeros((0, feat.features.shape[-1]), np.float32), np.zeros((0, len(NAMES)), np.uint8)
    return feat.patch_features(np.array(xs), np.array(ys), size), np.stack(labels)


def pseudo(head: LiveHead, feat, rgb: np.ndarray) -> np.ndarray:
    """Argmax of the raw CAM logits, upsampled to the image; white glass is background."""
    z = head.logits(np.asarray(feat.features, np.float32))  # (h, w, K)
    z = np.where(np.isfinite(z), z, -1e4)
    t = torch.from_numpy(np.moveaxis(z, -1, 0).copy())[None]
    h, w = rgb.shape[:2]
    up = torch.nn.functional.interpolate(t, size=(feat.shape[0] * FEATURE_STRIDE, feat.shape[1] * FEATURE_STRIDE),
                                         mode="bilinear", align_corners=False)[0, :, :h, :w].numpy()
    out = up.argmax(axis=0).astype(np.uint8)
    out[_glass(rgb)] = BG
    return out


def score(preds_gts) -> dict:
    cm = ConfusionMatrix(len(NAMES) + 1, BG)
    for p, g in preds_gts:
        cm.update(p, g)
    s = cm.scores(NAMES + ["background"])
    per = s["per_class_iou"]
    return {"miou": s["miou"], **{n: per.get(n) for n in NAMES}}


def labelled_sets(order: str, budgets, X, Y, coords, mean, std, seed, l2: float = LiveHead.l2,
                  explore: float = EXPLORE, other=None):
    """For each budget, ``(budget, labelled mask, live head fitted on it)``, in ``order``: ``random``
    (a seeded shuffle) or suggested (``core.stage1.suggest``, batch by batch from the head fitted so
    far). ``other(previous budget, its labelled mask)``: a trained classifier's probabilities of every
    patch, for the disagreement term (None: no term). The mask is the generator's own: copy it to keep it."""
    n = len(X)
    labelled = np.zeros(n, bool)
    seq = list(np.random.default_rng(seed).permutation(n)) if order == "random" else []
    typical = typicality(coords) if order != "random" else None
    head, previous = None, None
    for b in budgets:
        b = min(b, n)
        if order == "random":
            labelled[:] = False
            labelled[seq[:b]] = True
        else:
            need = b - int(labelled.sum())
            if need > 0:
                probs = head.probabilities(X) if head is not None else None
                picks = suggest(coords, labelled, need, probs=probs,
                                trainable=head.trainable if head is not None else None,
                                other_probs=other(*previous) if other is not None and previous is not None else None,
                                explore=explore, seed=seed, typical=typical)
                labelled[[p.index for p in picks]] = True
        head = LiveHead(Y.shape[1], mean, std, l2=l2).fit(X[labelled], Y[labelled])
        yield b, labelled, head
        previous = (b, labelled.copy())


def curve(order: str, budgets, X, Y, coords, mean, std, test, seed, l2, explore: float = EXPLORE) -> list[dict]:
    rows = []
    for b, _, head in labelled_sets(order, budgets, X, Y, coords, mean, std, seed, l2=l2, explore=explore):
        preds = [(pseudo(head, f, rgb), gt) for (rgb, gt, f) in test]
        rows.append({"order": order, "budget": b, "seed": seed, **score(preds)})
    return rows


def diff_text(d: list[float], level: bool = False) -> str:
    """Paired differences as "mean ± sd (k of n better)"; ``level`` counts ties as level or better."""
    k = sum(x >= 0 if level else x > 0 for x in d)
    return f"{np.mean(d):+.3f} ± {np.std(d):.3f} ({k} of {len(d)} {'level or better' if level else 'better'})"


def paired_text(rows: list[dict], order: str, budget: int) -> str:
    """``order``'s mIoU minus random order's on the same split at ``budget``: mean ± sd over the
    splits both have, and how many are better ("" when none)."""
    by = {(r["order"], r["seed"]): r["miou"] for r in rows if r["budget"] == budget}
    d = [by[(order, s)] - by[("random", s)] for (o, s) in by if o == order and ("random", s) in by]
    return diff_text(d) if d else ""


def plot(rows: list[dict], baselines: dict, path: Path) -> None:
    """A small line plot (mIoU vs labelled patches, log x) drawn with PIL."""
    W, H, L, R, T, B = 720, 420, 70, 20, 30, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    budgets = sorted({r["budget"] for r in rows})
    lx = np.log2(budgets)
    x_of = lambda b: L + (np.log2(b) - lx.min()) / max(1e-9, lx.max() - lx.min()) * (W - L - R)  # noqa: E731
    y_of = lambda v: T + (1 - v) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for v in np.arange(0, 1.01, 0.2):
        d.line([L - 4, y_of(v), L, y_of(v)], fill="black")
        d.text((L - 34, y_of(v) - 6), f"{v:.1f}", fill="black")
    for b in budgets:
        d.text((x_of(b) - 8, H - B + 6), str(b), fill="black")
    d.text((W // 2 - 80, H - 28), "labelled patches (log scale)", fill="black")
    d.text((8, 8), "held-out pseudo-mask mIoU (labels unknown), mean of seeds", fill="black")
    palette = [(30, 90, 200), (40, 150, 60), (150, 60, 170), (200, 140, 0)]
    orders = list(dict.fromkeys(r["order"] for r in rows))
    colours = {"random": (200, 60, 40)}
    colours.update({o: palette[i % len(palette)] for i, o in enumerate(o for o in orders if o != "random")})
    for order, col in colours.items():
        pts = []
        for b in budgets:
            v = [r["miou"] for r in rows if r["order"] == order and r["budget"] == b]
            if v:
                pts.append((x_of(b), y_of(float(np.mean(v)))))
        if len(pts) > 1:
            d.line(pts, fill=col, width=3)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        d.text((W - R - 150, T + 10 + 16 * list(colours).index(order)), order, fill=col)
    for name, v in baselines.items():
        y = y_of(v)
        for x in range(L, W - R, 12):
            d.line([x, y, x + 6, y], fill=(120, 120, 120))
        d.text((L + 6, y - 14), f"{name} {v:.2f}", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def speed(l2: float) -> dict:
    rng = np.random.default_rng(0)
    c = 1280
    dense = rng.standard_normal((128, 128, c)).astype(np.float32)
    mean, std = np.zeros(c, np.float32), np.ones(c, np.float32)
    X = rng.standard_normal((200, c)).astype(np.float32)
    Y = (rng.random((200, 3)) < 0.4).astype(np.uint8)
    head = LiveHead(3, mean, std, l2=l2)
    times = []
    for i in range(15):
        t0 = time.perf_counter()
        head.fit(X[: 100 + i], Y[: 100 + i])
        z = head.logits(dense)
        z.argmax(axis=-1)
        times.append(time.perf_counter() - t0)
    return {"update_median_s": statistics.median(times), "update_max_s": max(times)}


def slide_build() -> dict | None:
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.slides.tissue import detect_tissue
    from napari_histo_wsss.core.stage1.features import build_slide_features

    path = DATA / "wsi-cmu-small-region" / "CMU-1-Small-Region.svs"
    if not path.exists():
        return None
    with open_slide(path) as slide:
        tissue = detect_tissue(slide)
        t0 = time.perf_counter()
        last = None
        for ev in build_slide_features(slide, tissue, 1.0, FeatureSpec()):
            last = ev
        return {"slide_build_s": time.perf_counter() - t0, "cells": last.result.shape, "tiles": last.steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="wsss4luad", choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(30)))
    ap.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20, 40, 80, 160, 320])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--min-share", type=float, default=0.05)
    ap.add_argument("--l2", type=float, default=LiveHead.l2, help="the live head's L2 (default: the product's)")
    ap.add_argument("--explore", type=float, nargs="+", default=[EXPLORE],
                    help="random share of each suggested batch; one curve per value")
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "live_labelling.png"))
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    n_test = use_dataset(args.dataset)
    suggested_orders = ({"suggested": args.explore[0]} if args.explore == [EXPLORE]
                        else {f"suggested {e:g}": e for e in args.explore})
    orders = ["random", *suggested_orders]
    images = load_images(args.dataset)
    ext = FeatureExtractor(FeatureSpec())
    t0 = time.perf_counter()
    feats = [image_features(ext, rgb) for rgb, _ in images]
    feat_s = time.perf_counter() - t0
    rows, base_rows = [], []
    for seed in args.seeds:
        order = np.random.default_rng(1000 + seed).permutation(len(images))
        test_i, pool_i = order[:n_test], order[n_test:]
        X, Y = [], []
        for i in pool_i:
            x, y = patches_of(feats[i], images[i][1], args.patch, args.min_share)
            X.append(x)
            Y.append(y)
        X, Y = np.concatenate(X), np.concatenate(Y)
        cells = np.concatenate([np.asarray(feats[i].features, np.float32)[feats[i].tissue] for i in pool_i])
        mean, std = standardiser(cells)
        coords = embed(X, mean, std)
        test = [(images[i][0], images[i][1], feats[i]) for i in test_i]
        budgets = sorted({min(b, len(X)) for b in args.budgets})
        rows += curve("random", budgets, X, Y, coords, mean, std, test, seed, args.l2)
        for o, e in suggested_orders.items():
            rows += curve(o, budgets, X, Y, coords, mean, std, test, seed, args.l2, explore=e)
        # baselines on the same test images
        top = int(np.argmax(Y.sum(axis=0)))
        one, oracle = [], []
        for rgb, gt, _ in test:
            white = _glass(rgb)
            p = np.full(gt.shape, top, np.uint8)
            p[white] = BG
            one.append((p, gt))
            counts = np.bincount(gt[gt != BG].ravel(), minlength=len(NAMES))[: len(NAMES)]
            q = np.full(gt.shape, int(np.argmax(counts)), np.uint8)
            q[white] = BG
            oracle.append((q, gt))
        base_rows.append({"seed": seed, "pool_patches": len(X), "one_class": score(one), "oracle": score(oracle)})
        print(f"seed {seed}: {len(X)} pool patches, {len(test_i)} test images", file=sys.stderr)

    def ms(vals):
        v = [x for x in vals if x is not None]
        return (f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")

    lines = ["| order | labelled patches | mIoU | " + " | ".join(f"{n} IoU" for n in NAMES) + " |",
             "|---|---|---|" + "---|" * len(NAMES)]
    # only the budgets every split reached in every order (a budget over a split's pool size is that
    # pool size, which the other splits do not have)
    budgets = [b for b in sorted({r["budget"] for r in rows})
               if all(sum(r["budget"] == b and r["order"] == o for r in rows) == len(args.seeds) for o in orders)]
    rows = [r for r in rows if r["budget"] in budgets]
    for o in orders:
        for b in budgets:
            rr = [r for r in rows if r["order"] == o and r["budget"] == b]
            lines.append(f"| {o} | {b} | {ms([r['miou'] for r in rr])} | "
                         + " | ".join(ms([r[n] for r in rr]) for n in NAMES) + " |")
    for name in ("one_class", "oracle"):
        lines.append(f"| baseline: {name.replace('_', ' ')} | - | {ms([b[name]['miou'] for b in base_rows])} | "
                     + " | ".join(ms([b[name][n] for b in base_rows]) for n in NAMES) + " |")
    # labels needed: the first suggested budget reaching random's final mean mIoU
    final_b = budgets[-1]
    target = np.mean([r["miou"] for r in rows if r["order"] == "random" and r["budget"] == final_b])
    reach = {o: next((b for b in budgets if np.mean([r["miou"] for r in rows if r["order"] == o and r["budget"] == b]) >= target - 1e-9), None)
             for o in orders}
    lines.append("")
    for o in orders[1:]:
        lines.append(f"Random order's final mIoU {target:.3f} (at {final_b} labels) is reached with "
                     f"{reach[o] or 'no budget up to ' + str(final_b) + ' of'} {o} labels vs {reach['random']} random ones; "
                     f"mean over budgets {np.mean([r['miou'] for r in rows if r['order'] == o]):.3f} vs random "
                     f"{np.mean([r['miou'] for r in rows if r['order'] == 'random']):.3f}.")
    for o in orders[1:]:
        lines.append(f"{o} minus random, split for split: "
                     + "; ".join(f"{b}: {paired_text(rows, o, b)}" for b in budgets) + ".")
    lines.append(f"Feature extraction of the {len(images)} images: {feat_s:.1f} s.")
    if not args.no_speed:
        sp = speed(args.l2)
        lines.append(f"Label to updated overlay (refit + CAM + argmax, 4k x 4k view = 128 x 128 cells x 1280 channels): "
                     f"median {sp['update_median_s'] * 1000:.0f} ms, max {sp['update_max_s'] * 1000:.0f} ms over 15 updates.")
        sb = slide_build()
        if sb:
            lines.append(f"Feature cache of the bundled slide (CMU-1-Small-Region, level 0, {sb['tiles']} tiles, "
                         f"{sb['cells'][0]} x {sb['cells'][1]} cells): {sb['slide_build_s']:.1f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
    baselines = {"one class": float(np.mean([b["one_class"]["miou"] for b in base_rows])),
                 "per-image oracle": float(np.mean([b["oracle"]["miou"] for b in base_rows]))}
    plot(rows, baselines, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
