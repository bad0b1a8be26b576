"""Stage one: does padding an image before the CAM forward pass help ``pseudo-masks``?

The slide path (Review / ``histo-wsss cams``) scored 0.012-0.014 above the image path on the same
test images (``bench/stage1_slide_path.py``); on a patch folder's sheet every image is surrounded
by white and its CAMs come from wider tiles. This checks whether padding each image (white 32 or
64 px, or a 32-px mirror) before ``logit_maps`` does the same for ``pseudo-masks``' rule
(*prob-raw*, with and without the dense CRF), on the cached default runs of
``bench/stage1_quality.py`` - judged on the validation images (offsets calibrated there, in-sample
and leave-one-out), the test column printed beside, never used to choose.

    python bench/stage1_padding.py --work /tmp/s1qall
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import stage1_quality as sq  # noqa: E402
import torch  # noqa: E402

from napari_histo_wsss.core.data.classes import get_preset  # noqa: E402
from napari_histo_wsss.core.data.datasets import load_dataset  # noqa: E402
from napari_histo_wsss.core.stage1.cams import allowed_classes, calibrate_offsets, logit_maps, raw_argmax_mask  # noqa: E402
from napari_histo_wsss.core.stage1.train import calibrated_prob_threshold, load_run  # noqa: E402

PADS = [("none", 0), ("white32", 32), ("white64", 64), ("reflect32", -32)]


def padded_logits(model, rgb: np.ndarray, p: int) -> np.ndarray:
    """``logit_maps`` of the image padded by ``p`` px of white (``-p``: mirrored), cropped back."""
    if p == 0:
        return logit_maps(model, rgb)
    mode = {"constant_values": 255} if p > 0 else {"mode": "reflect"}
    p = abs(p)
    return logit_maps(model, np.pad(rgb, ((p, p), (p, p), (0, 0)), **mode))[:, p:-p, p:-p]


def score(model, parts: dict, p: int, classes, scorer) -> dict:
    maps = {part: [padded_logits(model, s.image(), p) for s in parts[part][0]] for part in parts}
    vs, va = parts["val"]
    items = [(lg, s.mask(), a) for lg, s, a in zip(maps["val"], vs, va)]
    off, _ = calibrate_offsets(items, classes)
    res = {}
    for refine in ("none", "crf"):
        cm_in, cm_loo, cm_t = scorer.new(), scorer.new(), scorer.new()
        for i, (lg, s, a) in enumerate(zip(maps["val"], vs, va)):
            lab = a.astype(np.uint8)
            cm_in.update(raw_argmax_mask(lg, classes, off, rgb=s.image(), labels=lab, refine=refine), s.mask())
            off_i, _ = calibrate_offsets(items[:i] + items[i + 1:], classes)
            cm_loo.update(raw_argmax_mask(lg, classes, off_i, rgb=s.image(), labels=lab, refine=refine), s.mask())
        for lg, s, a in zip(maps["test"], *parts["test"]):
            cm_t.update(raw_argmax_mask(lg, classes, off, rgb=s.image(), labels=a.astype(np.uint8), refine=refine), s.mask())
        res[refine] = {"val_in": scorer.result(cm_in)["miou"], "val_loo": scorer.result(cm_loo)["miou"],
                       "test": scorer.result(cm_t)["miou"]}
    return res


def ms(v: list) -> str:
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/s1q")
    ap.add_argument("--config", default="p128-synth-pix")
    ap.add_argument("--out", default=None, help="write the per-run figures here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work, classes = Path(args.work), get_preset("wsss4luad")
    scorer = sq.Scorer(classes)
    out = {}
    for split in (0, 1):
        spec = load_dataset(work / f"patches-p128-s64-split{split}")
        for seed in (0, 1, 2):
            run = work / "runs" / f"{args.config}-split{split}-seed{seed}"
            model, _, _cfg = load_run(run, "best")
            t_prob = calibrated_prob_threshold(run, "best") or 0.5
            parts = {}
            for part, samples in (("val", list(spec.val)), ("test", list(spec.test))):
                both = sq.cached_maps(run, samples, f"cams-{part}", None)  # the probabilities the bench gated with
                probs = [b[-1, 0, :classes.num_classes].astype(np.float32) for b in both]
                parts[part] = (samples, [allowed_classes(classes, probs=pr, prob_threshold=t_prob) for pr in probs])
            out[f"{split}-{seed}"] = r = {name: score(model, parts, p, classes, scorer) for name, p in PADS}
            print(split, seed, json.dumps(r), file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=1))
    print("| padding | refine | val in-sample | minus none | val leave-one-out | minus none | test | minus none |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _ in PADS:
        for refine in ("none", "crf"):
            row = [name, refine]
            for k in ("val_in", "val_loo", "test"):
                row.append(ms([out[r][name][refine][k] for r in out]))
                row.append(ms([out[r][name][refine][k] - out[r]["none"][refine][k] for r in out]))
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
