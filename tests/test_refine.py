"""Dense-CRF refinement of pseudo-masks (``core/stage1/refine.py``): borders move to the stain
edges, gating is respected, tiling agrees with one pass, and ``pseudo-masks`` says so when the
extension is missing instead of failing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import read_index_mask
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models import CAMClassifier
from napari_histo_wsss.core.stage1 import cams as C
from napari_histo_wsss.core.stage1.refine import crf_available, dense_crf_labels

LUAD = get_preset("wsss4luad")
needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf (the crf extra) is not installed")


def _two_stains(h: int = 96, w: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An eosin-pink left half and a haematoxylin-purple right half (with noise), and the truth."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((h, w, 3), dtype=np.float32)
    rgb[:, : w // 2] = (225, 140, 185)
    rgb[:, w // 2:] = (115, 60, 165)
    rgb += rng.normal(0, 6, size=rgb.shape)
    truth = np.zeros((h, w), dtype=np.uint8)
    truth[:, w // 2:] = 1
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def _blurry_scores(h: int, w: int, edge: float, slope: float = 25.0) -> np.ndarray:
    """Class 0 vs 1 log-scores whose border sits at ``edge`` x the width (not at the stain edge),
    as upsampled stride-16 CAM logits do; class 2 well below both."""
    x = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0)
    s0 = (edge * w - x) / slope
    return np.stack([s0, -s0, np.full_like(s0, -6.0)])


@needs_crf
def test_crf_moves_a_blurry_border_to_the_stain_edge():
    rgb, truth = _two_stains()
    scores = _blurry_scores(*truth.shape, edge=0.42)  # 10 px off the stain edge, as a stride-16 map is
    argmax = scores.argmax(0)
    refined = dense_crf_labels(scores, rgb)
    before, after = (argmax == truth).mean(), (refined == truth).mean()
    assert before < 0.93 and after > before + 0.05, (before, after)
    assert set(np.unique(refined)) <= {0, 1}


@needs_crf
def test_crf_respects_the_gating_and_tiles_like_one_pass():
    rgb, truth = _two_stains()
    scores = _blurry_scores(*truth.shape, edge=0.4)
    scores[2] = 8.0  # class 2 wins every pixel unless it is gated out
    gated = dense_crf_labels(scores, rgb, allowed=np.array([True, True, False]))
    assert 2 not in gated and (gated == truth).mean() > 0.85
    assert (dense_crf_labels(scores, rgb, allowed=np.array([False, True, False])) == 1).all()
    whole = dense_crf_labels(scores[:2], rgb)
    tiled = dense_crf_labels(scores[:2], rgb, tile=64, overlap=16)
    assert (whole == tiled).mean() > 0.97
    with pytest.raises(HistoWSSSError, match="does not match"):
        dense_crf_labels(scores, rgb[:10])


@needs_crf
def test_raw_argmax_mask_refines_with_the_same_gating_and_white_background():
    rgb, truth = _two_stains()
    rgb[:8] = 250  # a strip of white glass
    scores = _blurry_scores(*truth.shape, edge=0.46)
    off = np.array([0.0, 0.2, 0.0], dtype=np.float32)  # moves the border 2.5 px further from the edge
    plain = C.raw_argmax_mask(scores, LUAD, off, rgb=rgb, labels=[1, 1, 0])
    crf = C.raw_argmax_mask(scores, LUAD, off, rgb=rgb, labels=[1, 1, 0], refine="crf")
    bg = LUAD.background_index
    assert (crf[:8] == bg).all() and (plain[:8] == bg).all()
    tissue = crf != bg
    assert (crf[tissue] == truth[tissue]).mean() > (plain[tissue] == truth[tissue]).mean() + 0.05
    with pytest.raises(HistoWSSSError, match="refinement"):
        C.raw_argmax_mask(scores, LUAD, off, rgb=rgb, refine="slic")


def test_pseudo_masks_without_the_extension_say_so_and_write_unrefined_masks(tmp_path, monkeypatch):
    from PIL import Image

    torch.manual_seed(0)
    model = CAMClassifier(3, weights="none").eval()
    with torch.no_grad():
        model.head.weight.mul_(1e6)
    images = tmp_path / "img"
    images.mkdir()
    for i in range(2):
        Image.fromarray(_two_stains(64, 80, seed=i)[0]).save(images / f"im{i}.png")
    plain = C.PseudoMaskSettings(mode="last", gating="raw", refine="none")
    list(C.generate_pseudo_masks(model, LUAD, images, tmp_path / "plain", plain))
    monkeypatch.setattr(C, "crf_available", lambda: False)
    events = list(C.generate_pseudo_masks(model, LUAD, images, tmp_path / "crf", C.PseudoMaskSettings(mode="last",
                                                                                                       gating="raw")))
    logs = [e.message for e in events if e.kind == "log"]
    assert len(logs) == 1 and "pydensecrf" in logs[0] and "unrefined" in logs[0]
    assert events[-1].kind == "done"
    for i in range(2):
        a = read_index_mask(tmp_path / "plain" / f"im{i}.png", LUAD)
        b = read_index_mask(tmp_path / "crf" / f"im{i}.png", LUAD)
        assert np.array_equal(a, b)
