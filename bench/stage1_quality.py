"""Stage-one pseudo-mask quality on images nobody trained or tuned on: the whole table of
docs/benchmarks/stage1.md, baselines beside every method.

Protocol (it cannot pick anything on the images it reports):

* the 31 annotated WSSS4LUAD images (``$HISTO_WSSS_DATA/wsss4luad-subset/val``) are split BY IMAGE
  by ``make_patches`` (val 0.2, test 0.3, split seed ``s`` for each of ``--splits``): about 16
  training images cut into weakly labelled patches, 6 validation images, 9 test images;
* test images give no training patch and choose nothing; the checkpoint (``best.pt``, by the
  label-gated val mIoU), the probability threshold and the raw-argmax offsets are all chosen on
  the validation images;
* each configuration trains once per (split, seed) (``--seeds``); a figure is the mean and
  standard deviation over all ``splits x seeds`` runs of the mIoU over the run's test images
  (MLPS convention: background ignored, mIoU over the classes present);
* headline: pseudo-masks gated WITHOUT the image labels (``prob-gated``: the real use on new
  images); secondary: gated by the true labels (``label-gated``);
* baselines per split (no training, no seed): ``one class`` (every tissue pixel the most frequent
  class of the training labels), ``image-label rule`` (each image's labelled class that is most
  frequent in training; needs the labels), ``majority oracle`` (each image's most frequent true
  class; needs the masks).

Runs and CAM logits are cached in ``--work`` (outside the repository) keyed by configuration,
split and seed: re-running re-scores without training; new gating rules need no retraining.

Usage (2 CPU cores; trainings run one at a time)::

    python bench/stage1_quality.py --configs demo-before,default --splits 0,1 --seeds 0,1,2

Results go to ``--work/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from napari_histo_wsss.core.data.datasets import DatasetSpec, load_dataset, make_patches
from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.cams import (
    allowed_classes,
    calibrate_offsets,
    cams_for_image,
    class_shares,
    logit_maps,
    pseudo_mask,
    raw_argmax_mask,
)
from napari_histo_wsss.core.stage1.refine import CRFParams, dense_crf_labels
from napari_histo_wsss.core.stage1.train import (
    TrainConfig,
    area_calibration,
    calibrated_prob_threshold,
    load_run,
    train_classifier,
)

DATA = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# name -> (patch size, stride, TrainConfig fields). "demo-before" is what `histo-wsss demo` ran
# before the step budget (train-cls --method segmix --epochs 6 with the old defaults).
CONFIGS: dict[str, tuple[int, int, dict]] = {
    "demo-before": (224, 112, dict(method="segmix", epochs=6, steps=None, crop_size=None, freeze_bn=False,
                                   freeze_stages=0, head="last", segmix_schedule="feedback",
                                   synth_share=0.0)),
    "cam-6ep": (224, 112, dict(method="cam", epochs=6, steps=None, crop_size=None, freeze_bn=False,
                               freeze_stages=0, head="last", synth_share=0.0)),
    "steps": (224, 112, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                             freeze_stages=2, head="last", synth_share=0.0)),
    "steps-fused": (224, 112, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                   freeze_stages=2, head="fused", synth_share=0.0)),
    "steps-fused-p128": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                       freeze_stages=2, head="fused", synth_share=0.0)),
    # issue 10: a quarter of each batch synthetic Mosaic/Bezier images from single-label patches
    "p128-synth": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                 freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.0)),
    "p128-synth-pix": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                     freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5)),
    # issue 10: the default on the larger ImageNet EfficientNet-Lite2 backbone (same budget in steps)
    "p128-synth-pix-lite2": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                           freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5,
                                           backbone="efficientnet-lite2")),
    # issue 10: the default with an H&E stain jitter (Tellez et al. 2018) of the training patches and
    # the synthetic images, of strength 0.1 or 0.2
    **{f"p128-synth-pix-hed{round(s * 100)}": (128, 64, dict(
        method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True, freeze_stages=2, head="fused",
        synth_share=0.25, synth_pixel_weight=0.5, stain_jitter=s)) for s in (0.1, 0.2)},
    # issue 10: the default with twice the step budget (100 steps per epoch)
    "p128-synth-pix-s600": (128, 64, dict(method="cam", epochs=6, steps=600, crop_size=128, freeze_bn=True,
                                          freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5)),
    # issue 10: MLPS's Progressive Dropout Attention on its schedule scaled to the run (from 15 %,
    # threshold 0.94 decaying to 0.67), and the PSCL contrastive term, each on the default
    "p128-synth-pix-pda": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                         freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5,
                                         pda=True)),
    "p128-synth-pix-pscl": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                          freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5,
                                          pscl=True)),
    # issue 10: more synthesis on the default, chosen on validation: half of each batch synthetic,
    # or the pixel loss on the synthetic images at full weight
    "p128-synth50-pix": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                       freeze_stages=2, head="fused", synth_share=0.5, synth_pixel_weight=0.5)),
    "p128-synth-pix1": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                      freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=1.0)),
    # SegMix on the step budget with the time-driven curriculum (climbs to the finest rung by the
    # last epoch), area-weighted targets or the union of the sources' labels
    "p128-segmix": (128, 64, dict(method="segmix", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                  freeze_stages=2, head="fused", segmix_schedule="time", segmix_targets="area",
                                  synth_share=0.0)),
    "p128-segmix-union": (128, 64, dict(method="segmix", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                        freeze_stages=2, head="fused", segmix_schedule="time",
                                        segmix_targets="union", synth_share=0.0)),
    # issue 13: the default, with an oracle pathologist correcting a share of the training patches
    # (CORRECTIONS): their ground-truth masks ride with them and the corrected-pixel loss learns from them
    "p128-synth-pix-corr10": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                            freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5,
                                            correction_pixel_weight=0.5)),
    "p128-synth-pix-corr30": (128, 64, dict(method="cam", epochs=6, steps=300, crop_size=128, freeze_bn=True,
                                            freeze_stages=2, head="fused", synth_share=0.25, synth_pixel_weight=0.5,
                                            correction_pixel_weight=0.5)),
    "default": (128, 64, dict()),  # TrainConfig's defaults as they are now (= p128-synth-pix), demo patches
}
# configuration -> share of the training patches the oracle corrects (the same patches for every
# seed of a split, drawn at random: which patches a pathologist settles is not chosen by the model)
CORRECTIONS = {"p128-synth-pix-corr10": 0.1, "p128-synth-pix-corr30": 0.3}
# gating rules scored on every run: name -> CAM source
GATINGS = ("prob", "raw", "raw-cal", "raw-cal-tta", "area", "raw-cal-slic", "prob-raw", "prob-raw-tta", "prob-raw-crf",
           "prob-raw-tta-crf", "prob-area", "prob-area-crf")
# dense-CRF kernels tried by --crf-grid (bilateral compat, sxy, srgb); the product's default
# (refine.CRFParams) was chosen from this grid on the validation images alone
CRF_GRID = [(bw, sxy, 10) for bw in (3, 5, 10) for sxy in (20, 40, 80)]
TTA = dict(scales=(0.75, 1.0, 1.25), flip=True)


DATASET = "wsss4luad"  # or "glas" (--dataset): GlaS test A as the 2-class gland / other-tissue preset


def patch_set(work: Path, patch: int, stride: int, split: int) -> Path:
    from stage1_experiments import source_folders

    img, mask, preset = source_folders(DATASET, work)
    prefix = "" if DATASET == "wsss4luad" else f"{DATASET}-"  # the WSSS4LUAD sets keep their cached names
    out = work / f"{prefix}patches-p{patch}-s{stride}-split{split}"
    if not (out / "patches.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        make_patches(img, mask, out, preset, patch_size=patch, stride=stride,
                     val_fraction=0.2, test_fraction=0.3, seed=split)
    return out


def train_once(data: Callable[[], Path | DatasetSpec], run: Path, cfg: TrainConfig, label: str, **record) -> float:
    """Train ``cfg`` on ``data()`` into ``run`` unless ``run/bench_train.json`` says it is done (a
    half-trained run is started again); returns the training seconds, kept there with ``record``.
    ``data`` is only called when there is something to train."""
    done = run / "bench_train.json"
    if done.is_file():
        return json.loads(done.read_text())["train_s"]
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    for ev in train_classifier(data(), run, cfg):
        if ev.kind == "epoch":
            m = ev.metrics
            print(f"  {label} epoch {ev.epoch}/{ev.epochs} loss {m['train_loss']:.4f} "
                  f"val mIoU {m.get('val_miou')} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    done.write_text(json.dumps({"train_s": train_s, **record}))
    return train_s


def train(work: Path, name: str, split: int, seed: int) -> tuple[Path, float]:
    patch, stride, fields = CONFIGS[name]
    ps = patch_set(work, patch, stride, split)
    run = work / "runs" / f"{name}-split{split}-seed{seed}"
    def data() -> Path | DatasetSpec:
        return with_oracle_corrections(ps, CORRECTIONS[name], split) if name in CORRECTIONS else ps

    cfg = TrainConfig(**fields, seed=seed, device="cpu")
    return run, train_once(data, run, cfg, f"{name} split {split} seed {seed}")


def with_oracle_corrections(split_dir: Path, share: float, split: int) -> DatasetSpec:
    """The patch set with the ground-truth mask (make-patches' source crop) attached to a random
    ``share`` of its training patches, as a pathologist's corrections would be in a project."""
    from napari_histo_wsss.core.stage2.train import _source_masks

    spec = load_dataset(split_dir)
    loaders = _source_masks(spec)
    n = int(round(share * len(spec.train)))
    chosen = set(np.random.default_rng([split, 13]).choice(len(spec.train), size=n, replace=False).tolist())
    train = [dataclasses.replace(s, mask=loaders[i]()) if i in chosen else s for i, s in enumerate(spec.train)]
    return dataclasses.replace(spec, train=train)


def cached_maps(run: Path, samples, key: str, fn) -> list:
    """``fn(sample)`` for every sample, cached as ``run/cache-<key>.npz`` (float16)."""
    path = run / f"cache-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return [z[f"a{i}"].astype(np.float32) for i in range(len(samples))]
    out = [fn(s) for s in samples]
    np.savez(path, **{f"a{i}": np.asarray(a, dtype=np.float16) for i, a in enumerate(out)})
    return out


def slic_vote(mask: np.ndarray, rgb: np.ndarray, bg: int, n_segments: int) -> np.ndarray:
    """Each SLIC superpixel takes the majority class of its tissue pixels (white stays background)."""
    from skimage.segmentation import slic

    seg = slic(rgb, n_segments=n_segments, compactness=10, start_label=0)
    out = mask.copy()
    tissue = mask != bg
    k = int(mask.max()) + 1
    counts = np.zeros((seg.max() + 1, k), dtype=np.int64)
    np.add.at(counts, (seg[tissue], mask[tissue]), 1)
    has = counts.sum(1) > 0
    major = counts.argmax(1)
    out[tissue & has[seg]] = major[seg][tissue & has[seg]]
    return out


def _cams_probs(model, rgb: np.ndarray, mode: str, window: int) -> np.ndarray:
    """CAMs (C, H, W) with the probabilities stored in one more plane (first row), for the cache."""
    cams, probs = cams_for_image(model, rgb, mode=mode, window=window)
    extra = np.zeros((1,) + cams.shape[1:], dtype=np.float32)
    extra[0, 0, : probs.size] = probs
    return np.concatenate([cams, extra])


class Scorer:
    def __init__(self, classes):
        self.classes = classes
        self.k, self.bg = classes.num_classes + 1, classes.background_index
        self.names = classes.names + ["background"]

    def new(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.k, self.bg)

    def result(self, cm: ConfusionMatrix) -> dict:
        s = cm.scores(self.names)
        iou = s["per_class_iou"]
        ts = [iou[n] for n in self.classes.names[:2] if iou.get(n) is not None]
        return {"miou": s["miou"], "iou": iou, "ts_miou": float(np.mean(ts)) if ts else None}


def score_run(run: Path, split_dir: Path, scorer: Scorer, slic_segments: int, crf_grid: bool = False) -> dict:
    spec = load_dataset(split_dir)
    classes = scorer.classes
    model, _, cfg = load_run(run, "best")
    torch.manual_seed(0)
    patch = cfg.patch_size
    val, test = list(spec.val), list(spec.test)
    res = {}
    for part, samples in (("val", val), ("test", test)):
        both = cached_maps(run, samples, f"cams-{part}", lambda s: _cams_probs(model, s.image(), cfg.cam_mode, patch))
        cams = [b[:-1] for b in both]
        probs = [b[-1, 0, :classes.num_classes].astype(np.float32) for b in both]
        raw = cached_maps(run, samples, f"raw-{part}", lambda s: logit_maps(model, s.image()))
        tta = cached_maps(run, samples, f"rawtta-{part}", lambda s: logit_maps(model, s.image(), **TTA))
        res[part] = dict(samples=samples, cams=cams, probs=probs, raw=raw, tta=tta)
    # -- calibration on the validation images only ---------------------------------------------
    v = res["val"]
    t_prob = calibrated_prob_threshold(run, "best") or 0.5
    off, _ = calibrate_offsets([(lg, s.mask()) for lg, s in zip(v["raw"], v["samples"])], classes)
    off_tta, _ = calibrate_offsets([(lg, s.mask()) for lg, s in zip(v["tta"], v["samples"])], classes)
    # prob-raw: classes gated by probability (validation threshold), then raw argmax among them
    v_allowed = [allowed_classes(classes, probs=pr, prob_threshold=t_prob) for pr in v["probs"]]
    off_pr, _ = calibrate_offsets([(lg, s.mask(), a) for lg, s, a in zip(v["raw"], v["samples"], v_allowed)], classes)
    off_pr_tta, _ = calibrate_offsets([(lg, s.mask(), a) for lg, s, a in zip(v["tta"], v["samples"], v_allowed)], classes)

    # prob-area (pseudo-masks' default): the floor, its offsets and the raw offsets that measure the
    # shares, as the run's validation recorded them (runs trained before it existed lack them)
    cal = area_calibration(run, "best")
    has_area = cal is not None
    floor, off_pa, off_raw = (cal.min_area, cal.offsets, cal.raw_offsets) if has_area else (None, None, None)

    def area_gate(lg, pr, rgb):
        shares = class_shares(raw_argmax_mask(lg, classes, off_raw, rgb=rgb), classes)
        return allowed_classes(classes, probs=pr, prob_threshold=t_prob, shares=shares, min_area=floor)

    v_area = [area_gate(lg, pr, s.image()) for lg, pr, s in zip(v["raw"], v["probs"], v["samples"])] if has_area else None

    def area_mask(lg, cam, rgb, tau):
        m = raw_argmax_mask(lg, classes, off, rgb=rgb)
        tissue = m != scorer.bg
        frac = np.array([(m[tissue] == c).mean() if tissue.any() else 0.0 for c in range(classes.num_classes)])
        present = (frac >= tau).astype(np.uint8)
        if not present.any():
            present[int(frac.argmax())] = 1
        return pseudo_mask(cam, classes, rgb=rgb, labels=present)

    taus = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
    best_tau, best_v = 0.0, -1.0
    for tau in taus:
        cm = scorer.new()
        for lg, cam, s in zip(v["raw"], v["cams"], v["samples"]):
            cm.update(area_mask(lg, cam, s.image(), tau), s.mask())
        val_m = scorer.result(cm)["miou"] or 0.0
        if val_m > best_v + 1e-9:
            best_tau, best_v = tau, val_m
    # -- validation figures of the rules that calibrate on it ----------------------------------------
    # in-sample: offsets calibrated and scored on the same 6 images (what `pseudo-masks` would
    # pick from); leave-one-out: each image scored with offsets calibrated on the other 5
    val_scores = {}
    for g in VAL_RULES:
        if g.startswith("prob-area") and not has_area:
            continue
        maps = v["tta"] if "tta" in g else v["raw"]
        refine = "crf" if g.endswith("-crf") else "none"
        gates = v_area if g.startswith("prob-area") else v_allowed
        items = [(lg, s.mask(), a) for lg, s, a in zip(maps, v["samples"], gates)]
        off_g = off_pa if g.startswith("prob-area") else off_pr_tta if "tta" in g else off_pr
        cm_in, cm_loo = scorer.new(), scorer.new()
        for i, (lg, s, a) in enumerate(zip(maps, v["samples"], gates)):
            rgb, gt = s.image(), s.mask()
            cm_in.update(raw_argmax_mask(lg, classes, off_g, rgb=rgb, labels=a.astype(np.uint8), refine=refine), gt)
            off_i, _ = calibrate_offsets(items[:i] + items[i + 1:], classes)
            cm_loo.update(raw_argmax_mask(lg, classes, off_i, rgb=rgb, labels=a.astype(np.uint8), refine=refine), gt)
        val_scores[g] = {"in_sample": scorer.result(cm_in), "loo": scorer.result(cm_loo)}
    grid = {}
    if crf_grid:  # each kernel setting on the validation images (offsets as calibrated) and the test images
        for bw, sxy, srgb in CRF_GRID:
            prm = CRFParams(bilateral_compat=bw, bilateral_sxy=sxy, bilateral_srgb=srgb)
            out = {}
            for part in ("val", "test"):
                cm = scorer.new()
                for lg, pr, s in zip(res[part]["raw"], res[part]["probs"], res[part]["samples"]):
                    a = allowed_classes(classes, probs=pr, prob_threshold=t_prob).astype(np.uint8)
                    cm.update(raw_argmax_mask(lg, classes, off_pr, rgb=s.image(), labels=a, refine="crf", crf=prm),
                              s.mask())
                out[part] = scorer.result(cm)["miou"]
            grid[f"{bw},{sxy},{srgb}"] = out
    # -- test ------------------------------------------------------------------------------------
    t = res["test"]
    gatings = [g for g in GATINGS if has_area or not g.startswith("prob-area")]
    cms = {g: scorer.new() for g in gatings}
    lab = {g: scorer.new() for g in gatings}
    for cam, pr, lg, lt, s in zip(t["cams"], t["probs"], t["raw"], t["tta"], t["samples"]):
        rgb, gt, labels = s.image(), s.mask(), s.labels
        cms["prob"].update(pseudo_mask(cam, classes, rgb=rgb, probs=pr, prob_threshold=t_prob), gt)
        lab["prob"].update(pseudo_mask(cam, classes, rgb=rgb, labels=labels), gt)
        cms["raw"].update(raw_argmax_mask(lg, classes, rgb=rgb), gt)
        lab["raw"].update(raw_argmax_mask(lg, classes, rgb=rgb, labels=labels), gt)
        m_cal = raw_argmax_mask(lg, classes, off, rgb=rgb)
        cms["raw-cal"].update(m_cal, gt)
        lab["raw-cal"].update(raw_argmax_mask(lg, classes, off, rgb=rgb, labels=labels), gt)
        cms["raw-cal-tta"].update(raw_argmax_mask(lt, classes, off_tta, rgb=rgb), gt)
        lab["raw-cal-tta"].update(raw_argmax_mask(lt, classes, off_tta, rgb=rgb, labels=labels), gt)
        cms["area"].update(area_mask(lg, cam, rgb, best_tau), gt)
        lab["area"].update(pseudo_mask(cam, classes, rgb=rgb, labels=labels), gt)
        allowed = allowed_classes(classes, probs=pr, prob_threshold=t_prob).astype(np.uint8)
        cms["prob-raw"].update(raw_argmax_mask(lg, classes, off_pr, rgb=rgb, labels=allowed), gt)
        lab["prob-raw"].update(raw_argmax_mask(lg, classes, off_pr, rgb=rgb, labels=labels), gt)
        cms["prob-raw-tta"].update(raw_argmax_mask(lt, classes, off_pr_tta, rgb=rgb, labels=allowed), gt)
        lab["prob-raw-tta"].update(raw_argmax_mask(lt, classes, off_pr_tta, rgb=rgb, labels=labels), gt)
        cms["prob-raw-crf"].update(raw_argmax_mask(lg, classes, off_pr, rgb=rgb, labels=allowed, refine="crf"), gt)
        lab["prob-raw-crf"].update(raw_argmax_mask(lg, classes, off_pr, rgb=rgb, labels=labels, refine="crf"), gt)
        cms["prob-raw-tta-crf"].update(raw_argmax_mask(lt, classes, off_pr_tta, rgb=rgb, labels=allowed, refine="crf"), gt)
        lab["prob-raw-tta-crf"].update(raw_argmax_mask(lt, classes, off_pr_tta, rgb=rgb, labels=labels, refine="crf"), gt)
        if has_area:
            a_area = area_gate(lg, pr, rgb).astype(np.uint8)
            for g, refine in (("prob-area", "none"), ("prob-area-crf", "crf")):
                cms[g].update(raw_argmax_mask(lg, classes, off_pa, rgb=rgb, labels=a_area, refine=refine), gt)
                lab[g].update(raw_argmax_mask(lg, classes, off_pa, rgb=rgb, labels=labels, refine=refine), gt)
        cms["raw-cal-slic"].update(slic_vote(m_cal, rgb, scorer.bg, slic_segments), gt)
        lab["raw-cal-slic"].update(slic_vote(raw_argmax_mask(lg, classes, off, rgb=rgb, labels=labels), rgb, scorer.bg,
                                             slic_segments), gt)
    return {g: {"prob": scorer.result(cms[g]), "label": scorer.result(lab[g])} for g in gatings} | {
        "val": val_scores, **({"crf_grid": grid} if grid else {}),
        "calibration": {"prob_threshold": t_prob, "offsets": off.tolist(), "offsets_tta": off_tta.tolist(), "area_tau": best_tau,
        "offsets_prob_raw": off_pr.tolist(), "offsets_prob_raw_tta": off_pr_tta.tolist(),
        **({"min_area": floor, "offsets_prob_area": off_pa} if has_area else {})}}


def baselines(split_dir: Path, scorer: Scorer) -> dict:
    spec = load_dataset(split_dir)
    classes = scorer.classes
    prior = np.sum([s.labels for s in spec.train], axis=0).astype(np.float64)
    top = int(np.argmax(prior))
    cms = {n: scorer.new() for n in ("one class", "image-label rule", "majority oracle")}
    for s in spec.test:
        rgb, gt = s.image(), s.mask()
        white = white_background_mask(rgb)
        tissue_gt = gt[gt != scorer.bg]
        major = int(np.bincount(tissue_gt, minlength=classes.num_classes).argmax()) if tissue_gt.size else top
        for name, c in (("one class", top), ("image-label rule", int(np.argmax(np.where(s.labels > 0, prior, -1.0)))),
                        ("majority oracle", major)):
            m = np.full(gt.shape, c, dtype=np.uint8)
            if classes.white_background:  # GlaS labels every pixel: no white glass class there
                m[white] = scorer.bg
            cms[name].update(m, gt)
    return {n: scorer.result(cm) for n, cm in cms.items()}


def summarise(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(results: dict, classes) -> str:
    names = classes.names
    head = ("| row | n | prob-gated mIoU | label-gated mIoU | " + " | ".join(f"{n} IoU" for n in names)
            + " | tumour/stroma mIoU | train s |")
    lines = [head, "|---" * (6 + len(names)) + "|"]
    for base in ("one class", "image-label rule", "majority oracle"):
        rows = [b[base] for b in results["baselines"].values()]
        lines.append(f"| baseline: {base} | {len(rows)} splits | {summarise([r['miou'] for r in rows])} | "
                     f"{summarise([r['miou'] for r in rows]) if base != 'one class' else 'n/a'} | "
                     + " | ".join(summarise([r['iou'].get(n) for r in rows]) for n in names)
                     + f" | {summarise([r['ts_miou'] for r in rows])} | - |")
    for cfg_name, runs in results["runs"].items():
        for g in GATINGS:
            rows = [r for r in runs.values() if g in r]
            if not rows:
                continue
            p = [r[g]["prob"] for r in rows]
            lines.append(f"| {cfg_name} / {g} | {len(rows)} runs | {summarise([x['miou'] for x in p])} | "
                         f"{summarise([r[g]['label']['miou'] for r in rows])} | "
                         + " | ".join(summarise([x['iou'].get(n) for x in p]) for n in names)
                         + f" | {summarise([x['ts_miou'] for x in p])} | {summarise([r['train_s'] for r in rows])} |")
    return "\n".join(lines)


VAL_RULES = ("prob-raw", "prob-raw-tta", "prob-raw-crf", "prob-raw-tta-crf", "prob-area", "prob-area-crf")
# (rule, what it adds to) pairs compared run for run in the validation table
VAL_PAIRS = (("prob-raw-tta", "prob-raw"), ("prob-raw-crf", "prob-raw"), ("prob-raw-tta-crf", "prob-raw-tta"),
             ("prob-area", "prob-raw"), ("prob-area-crf", "prob-raw-crf"))


def val_table(results: dict, classes) -> str:
    """Validation mIoU (prob-gated) of the rules that calibrate on the validation images: in-sample
    (the offsets scored on the images that chose them) and leave-one-image-out."""
    t = classes.names[0]
    lines = [f"| row | n | val mIoU (in-sample) | val mIoU (leave-one-out) | val {t} IoU (leave-one-out) |",
             "|---|---|---|---|---|"]
    for cfg_name, runs in results["runs"].items():
        for g in VAL_RULES:
            rows = [r["val"][g] for r in runs.values() if g in r.get("val", {})]
            if rows:
                lines.append(f"| {cfg_name} / {g} | {len(rows)} runs | {summarise([x['in_sample']['miou'] for x in rows])} | "
                             f"{summarise([x['loo']['miou'] for x in rows])} | "
                             f"{summarise([x['loo']['iou'].get(t) for x in rows])} |")
        for b, a in VAL_PAIRS:  # run for run: what TTA or the CRF adds on the validation and the test images
            pairs = [r for r in runs.values() if a in r.get("val", {}) and b in r.get("val", {}) and b in r]
            if not pairs:
                continue
            d_in = [r["val"][b]["in_sample"]["miou"] - r["val"][a]["in_sample"]["miou"] for r in pairs]
            d_loo = [r["val"][b]["loo"]["miou"] - r["val"][a]["loo"]["miou"] for r in pairs]
            d_test = [r[b]["prob"]["miou"] - r[a]["prob"]["miou"] for r in pairs]
            lines.append(f"| {cfg_name} / {b} minus {a}, run for run | {len(pairs)} runs | {summarise(d_in)} | "
                         f"{summarise(d_loo)} | test: {summarise(d_test)} |")
    return "\n".join(lines)


def crf_grid_table(results: dict) -> str:
    """--crf-grid: each dense-CRF kernel setting minus the unrefined prob-raw mask, run for run, on
    the validation images (what chooses) and the test images (reported, never used to choose)."""
    default = CRFParams()
    mark = f"{default.bilateral_compat:g},{default.bilateral_sxy:g},{default.bilateral_srgb:g}"
    lines = ["| configuration | bilateral compat, sxy, srgb | n | val mIoU minus unrefined | test mIoU minus unrefined |",
             "|---|---|---|---|---|"]
    for cfg_name, runs in results["runs"].items():
        rows = [r for r in runs.values() if "crf_grid" in r]
        for key in (rows[0]["crf_grid"] if rows else {}):
            dv = [r["crf_grid"][key]["val"] - r["val"]["prob-raw"]["in_sample"]["miou"] for r in rows]
            dt = [r["crf_grid"][key]["test"] - r["prob-raw"]["prob"]["miou"] for r in rows]
            name = key.replace(",", ", ")
            bold = "**" if key == mark else ""
            lines.append(f"| {cfg_name} | {bold}{name}{bold} | {len(rows)} runs | {summarise(dv)} | {summarise(dt)} |")
    return "\n".join(lines)


def paired_table(results: dict, classes, base: str, rule: str = "prob-raw") -> str:
    """Each configuration minus ``base``, run for run (same split and seed), under ``rule``: on the
    validation images (in-sample and leave-one-out) and on the test images; ``better`` counts the
    runs above the base on the test images."""
    t = classes.names[0]
    ref = results["runs"].get(base, {})
    lines = [f"| {rule}: row minus {base} | n | val mIoU (in-sample) | val mIoU (leave-one-out) | test prob-gated mIoU "
             f"| test label-gated mIoU | test {t} IoU | runs better on test |", "|---|---|---|---|---|---|---|---|"]
    for cfg_name, runs in results["runs"].items():
        keys = [k for k in runs if k in ref and cfg_name != base and rule in runs[k].get("val", {})
                and rule in ref[k].get("val", {})]
        if not keys:
            continue

        def d(get, keys=keys, runs=runs):
            return [get(runs[k]) - get(ref[k]) for k in keys]
        test = d(lambda r: r[rule]["prob"]["miou"])
        tumour = d(lambda r: r[rule]["prob"]["iou"].get(t) or 0.0)
        lines.append(f"| {cfg_name} | {len(keys)} runs | {summarise(d(lambda r: r['val'][rule]['in_sample']['miou']))} | "
                     f"{summarise(d(lambda r: r['val'][rule]['loo']['miou']))} | {summarise(test)} | "
                     f"{summarise(d(lambda r: r[rule]['label']['miou']))} | {summarise(tumour)} | "
                     f"{sum(x > 0 for x in test)} of {len(test)} |")
    return "\n".join(lines)


def time_inference(run: Path, split_dir: Path, repeats: int = 2) -> dict:
    """Seconds per validation image of the raw CAM logits without and with the test-time
    augmentation (``TTA``), best of ``repeats``, on this machine's torch threads."""
    model, _, _ = load_run(run, "best")
    images = [s.image() for s in load_dataset(split_dir).val]
    out = {}
    for name, kw in (("raw", {}), ("tta", TTA)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for rgb in images:
                logit_maps(model, rgb, **kw)
            best = min(best, time.perf_counter() - t0)
        out[name] = best / len(images)
    logits = [logit_maps(model, rgb) for rgb in images]
    best = float("inf")
    for _ in range(repeats):  # the dense CRF on top of the plain logits (all classes)
        t0 = time.perf_counter()
        for lg, rgb in zip(logits, images):
            dense_crf_labels(lg, rgb)
        best = min(best, time.perf_counter() - t0)
    out["crf"] = best / len(images)
    out["pixels"] = float(np.mean([im.shape[0] * im.shape[1] for im in images]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="demo-before,default", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--splits", default="0,1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slic-segments", type=int, default=200)
    p.add_argument("--work", default="/tmp/s1q")
    p.add_argument("--no-train", action="store_true", help="score only the runs already in --work")
    p.add_argument("--dataset", choices=("wsss4luad", "glas"), default="wsss4luad",
                   help="the shared WSSS4LUAD images, or GlaS test A (use its own --work)")
    p.add_argument("--paired-against", default="", metavar="CONFIG",
                   help="also print every configuration minus this one, run for run (prob-raw and prob-raw-tta)")
    p.add_argument("--crf-grid", action="store_true",
                   help="also score every dense-CRF kernel setting of CRF_GRID on each run (validation and test)")
    p.add_argument("--time-tta", action="store_true",
                   help="also time the raw logits with and without test-time augmentation on the validation "
                        "images of each configuration's first run")
    args = p.parse_args(argv)
    global DATASET
    DATASET = args.dataset
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    splits = [int(s) for s in args.splits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"baselines": {}, "runs": {}}
    scorer = classes = None
    for name in args.configs.split(","):
        patch, stride, _ = CONFIGS[name]
        results["runs"].setdefault(name, {})
        for split in splits:
            ps = patch_set(work, patch, stride, split)
            if scorer is None:
                classes = load_dataset(ps).classes
                scorer = Scorer(classes)
            results["baselines"][f"split{split}"] = baselines(ps, scorer)
            for seed in seeds:
                run = work / "runs" / f"{name}-split{split}-seed{seed}"
                if args.no_train and not (run / "bench_train.json").is_file():
                    continue
                run, train_s = train(work, name, split, seed)
                r = score_run(run, ps, scorer, args.slic_segments, crf_grid=args.crf_grid)
                r["train_s"] = train_s
                results["runs"][name][f"split{split}-seed{seed}"] = r
                results_path.write_text(json.dumps(results, indent=1))
                print(f"{name} split {split} seed {seed}: " + ", ".join(
                    f"{g} {r[g]['prob']['miou']:.3f}" for g in GATINGS if g in r), flush=True)
        if args.time_tta:
            first = work / "runs" / f"{name}-split{splits[0]}-seed{seeds[0]}"
            if (first / "bench_train.json").is_file():
                tt = time_inference(first, patch_set(work, patch, stride, splits[0]))
                results.setdefault("inference_s", {})[name] = tt
                results_path.write_text(json.dumps(results, indent=1))
                print(f"{name}: raw {tt['raw']:.3f} s/image, TTA {tt['tta']:.3f} s/image "
                      f"({tt['tta'] / tt['raw']:.1f}x), dense CRF {tt['crf']:.3f} s/image, "
                      f"{tt['pixels'] / 1e6:.2f} Mpx per image", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch threads {args.threads}, torch {torch.__version__}\n")
    print(table(results, classes))
    print("\nValidation images (prob-gated, calibrated on them):\n")
    print(val_table(results, classes))
    if args.crf_grid:
        print("\nDense-CRF kernels (prob-raw gating), run for run against the unrefined mask:\n")
        print(crf_grid_table(results))
    if args.paired_against:
        for rule in VAL_RULES:
            print(f"\nRun for run against {args.paired_against} ({rule}):\n")
            print(paired_table(results, classes, args.paired_against, rule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
