"""Stage one: which classes does an unlabelled image hold? Presence rules for ``pseudo-masks``.

Most of the gap between probability-gated and label-gated pseudo-masks (``docs/benchmarks/stage1.md``)
is the image-level decision: a class switched on in an image that lacks it scores 0 there (MLPS
convention). ``pseudo-masks`` decides it by the image's window probability (``prob-raw``). This
scores other presence rules on the cached default runs of ``bench/stage1_quality.py``, each with
its parameter and the per-class offsets chosen on the run's validation images only:

* ``prob``: classes whose probability reaches the run's threshold (today's rule);
* ``area``: classes that cover at least ``tau`` of the image's tissue in the ungated raw argmax
  (raw logits + the ungated offsets validation calibrated);
* ``prob-area``: both - ``pseudo-masks``' rule (``core/stage1/cams.py: allowed_classes`` with
  ``class_shares``), which training now calibrates;
* ``prob-prune``: ``prob``, then classes that cover less than ``tau`` of the resulting mask are
  dropped;
* ``prob-area-t``: ``prob-area`` with the probability threshold chosen together with the floor
  (among :data:`THRESHOLDS`) instead of the run's own, which training chose for the normalised
  rule.

For every rule and ``tau`` the offsets are calibrated again under its gating; ``tau`` is the one
with the best validation mIoU. Validation is reported in-sample and leave-one-out (``tau`` and the
offsets chosen on the other validation images; ``prob``'s threshold stays the run's, chosen on
all of them, which favours today's rule). The test images are printed beside, never used to choose.

    python bench/stage1_presence.py --work /tmp/s1qall
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import stage1_quality as sq  # noqa: E402

from napari_histo_wsss.core.data.classes import get_preset  # noqa: E402
from napari_histo_wsss.core.data.datasets import load_dataset  # noqa: E402
from napari_histo_wsss.core.stage1.cams import (  # noqa: E402
    AREA_FLOORS,
    allowed_classes,
    calibrate_offsets,
    class_shares,
    raw_argmax_mask,
)
from napari_histo_wsss.core.stage1.train import calibrated_prob_threshold  # noqa: E402

RULES = ("prob", "area", "prob-area", "prob-prune", "prob-area-t")
TAUS = AREA_FLOORS
#: probability thresholds ``prob-area-t`` chooses among (training's own grid is finer, for another rule)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class Image:
    """One image's cached maps: raw logits, probabilities, its picture and its mask."""

    def __init__(self, sample, raw: np.ndarray, probs: np.ndarray, t_prob: float, classes):
        self.rgb, self.gt, self.labels = sample.image(), sample.mask(), sample.labels
        self.raw, self.probs, self.t_prob = raw, probs, t_prob
        self.by_prob = allowed_classes(classes, probs=probs, prob_threshold=t_prob)


def gate(rule: str, tau: float, im: Image, classes, off_raw: np.ndarray, off_prob: np.ndarray,
         t: float | None = None) -> np.ndarray:
    """The classes ``rule`` allows in ``im`` (bool (C,); never empty); ``t``: the probability
    threshold of ``prob-area-t`` (the others use the run's)."""
    c = classes.num_classes
    if rule == "prob":
        return im.by_prob
    if rule in ("prob-area", "prob-area-t"):  # the product's rule
        shares = class_shares(raw_argmax_mask(im.raw, classes, off_raw, rgb=im.rgb), classes)
        return allowed_classes(classes, probs=im.probs, prob_threshold=im.t_prob if t is None else t,
                               shares=shares, min_area=tau)
    if rule == "prob-prune":
        base = im.by_prob if im.by_prob.any() else np.ones(c, dtype=bool)
        s = class_shares(raw_argmax_mask(im.raw, classes, off_prob, rgb=im.rgb, labels=base.astype(np.uint8)), classes)
        keep = base & (s >= tau)
    else:
        s = class_shares(raw_argmax_mask(im.raw, classes, off_raw, rgb=im.rgb), classes)
        keep = s >= tau if tau > 0 else s > 0
    if not keep.any():
        keep = np.zeros(c, dtype=bool)
        keep[int(np.argmax(s))] = True
    return keep


def choose(rule: str, images: list, classes, scorer) -> tuple:
    """(tau, offsets, raw offsets, prob offsets, threshold) with the best mIoU on ``images`` (ties:
    the smaller tau, then the higher threshold; threshold None: the run's)."""
    off_raw, _ = calibrate_offsets([(im.raw, im.gt) for im in images], classes)
    off_prob, _ = calibrate_offsets([(im.raw, im.gt, im.by_prob) for im in images], classes)
    best = None
    for t in (sorted(THRESHOLDS, reverse=True) if rule == "prob-area-t" else (None,)):
        for tau in ((0.0,) if rule == "prob" else TAUS):
            gates = [gate(rule, tau, im, classes, off_raw, off_prob, t) for im in images]
            off, _ = calibrate_offsets([(im.raw, im.gt, g) for im, g in zip(images, gates)], classes)
            cm = scorer.new()
            for im, g in zip(images, gates):
                cm.update(raw_argmax_mask(im.raw, classes, off, rgb=im.rgb, labels=g.astype(np.uint8)), im.gt)
            m = scorer.result(cm)["miou"] or 0.0
            if best is None or m > best[0] + 1e-9:
                best = (m, tau, off, t)
    return best[1], best[2], off_raw, off_prob, best[3]


def masks(rule: str, chosen: tuple, images: list, classes, refine: str) -> list:
    tau, off, off_raw, off_prob, t = chosen
    out = []
    for im in images:
        g = gate(rule, tau, im, classes, off_raw, off_prob, t)
        out.append((raw_argmax_mask(im.raw, classes, off, rgb=im.rgb, labels=g.astype(np.uint8), refine=refine), g))
    return out


def score_run(run: Path, spec, classes, scorer, rules: tuple = RULES) -> dict:
    t_prob = calibrated_prob_threshold(run, "best") or 0.5
    parts = {}
    for part, samples in (("val", list(spec.val)), ("test", list(spec.test))):
        both = sq.cached_maps(run, samples, f"cams-{part}", None)
        raw = sq.cached_maps(run, samples, f"raw-{part}", None)
        parts[part] = [Image(s, lg, b[-1, 0, :classes.num_classes].astype(np.float32), t_prob, classes)
                       for s, lg, b in zip(samples, raw, both)]
    val, test = parts["val"], parts["test"]
    res = {}
    for rule in rules:
        chosen = choose(rule, val, classes, scorer)
        loo = [choose(rule, val[:i] + val[i + 1:], classes, scorer) for i in range(len(val))]
        r = {"tau": chosen[0], "loo_taus": [c[0] for c in loo], "t": chosen[4], "loo_ts": [c[4] for c in loo]}
        for refine in ("none", "crf"):
            cm_in, cm_loo, cm_t = scorer.new(), scorer.new(), scorer.new()
            for im, (m, _) in zip(val, masks(rule, chosen, val, classes, refine)):
                cm_in.update(m, im.gt)
            for i, im in enumerate(val):
                cm_loo.update(masks(rule, loo[i], [im], classes, refine)[0][0], im.gt)
            wrong = 0
            for im, (m, g) in zip(test, masks(rule, chosen, test, classes, refine)):
                cm_t.update(m, im.gt)
                wrong += int(np.sum(g != (class_shares(im.gt, classes) > 0)))
            t = scorer.result(cm_t)
            r[refine] = {"val_in": scorer.result(cm_in)["miou"], "val_loo": scorer.result(cm_loo)["miou"],
                         "test": t["miou"], "test_iou": t["iou"], "test_wrong_classes": wrong}
        res[rule] = r
    return res


def ms(v: list) -> str:
    return sq.summarise(v)  # mean ± standard deviation over runs, as the main table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/s1q")
    ap.add_argument("--config", default="p128-synth-pix")
    ap.add_argument("--splits", default="0,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="write the per-run figures here (JSON)")
    ap.add_argument("--rules", default=",".join(RULES), help=f"of {', '.join(RULES)} (prob is always scored)")
    args = ap.parse_args()
    work, classes = Path(args.work), get_preset("wsss4luad")
    rules = ("prob",) + tuple(r for r in args.rules.split(",") if r in RULES and r != "prob")
    scorer = sq.Scorer(classes)
    out = {}
    for split in (int(s) for s in args.splits.split(",")):
        spec = load_dataset(work / f"patches-p128-s64-split{split}")
        for seed in (int(s) for s in args.seeds.split(",")):
            run = work / "runs" / f"{args.config}-split{split}-seed{seed}"
            out[f"{split}-{seed}"] = r = score_run(run, spec, classes, scorer, rules)
            print(split, seed, json.dumps({k: {x: v[x] for x in ("tau", "loo_taus")} | {
                f: {k2: v[f][k2] for k2 in ("val_in", "val_loo", "test", "test_wrong_classes")} for f in ("none", "crf")}
                for k, v in r.items()}), file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{len(out)} runs of {args.config}; mean ± sd over runs, and minus `prob` run for run "
          "(better / worse runs in brackets)\n")
    print("| presence | refine | tau (per run) | val in-sample | minus prob | val leave-one-out | minus prob "
          "| test | minus prob | test classes wrong (of 27) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rule in rules:
        for refine in ("none", "crf"):
            row = [rule, refine, " ".join(f"{out[r][rule]['tau']:g}" + (f"@{out[r][rule]['t']:g}" if out[r][rule]["t"] else "")
                                          for r in out)]
            for k in ("val_in", "val_loo", "test"):
                row.append(ms([out[r][rule][refine][k] for r in out]))
                d = [out[r][rule][refine][k] - out[r]["prob"][refine][k] for r in out]
                row.append(f"{ms(d)} ({sum(x > 1e-9 for x in d)}/{sum(x < -1e-9 for x in d)})")
            row.append(ms([out[r][rule][refine]["test_wrong_classes"] for r in out]))
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
