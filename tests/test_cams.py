"""CAMs -> pseudo-masks: maps of any image size, gating, white background, palette PNGs, and a
plausibility check on real WSSS4LUAD images after a short training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import format_label_name, load_dataset, make_patches, read_index_mask
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.metrics import ConfusionMatrix
from napari_histo_wsss.core.models import CAMClassifier
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.cams import (
    PseudoMaskSettings,
    cams_for_image,
    generate_pseudo_masks,
    logit_maps,
    pseudo_mask,
    save_pseudo_mask,
)
from napari_histo_wsss.core.stage1.train import TrainConfig, load_run, train_classifier

LUAD = get_preset("wsss4luad")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model() -> CAMClassifier:
    torch.manual_seed(0)
    net = CAMClassifier(3, weights="none").eval()
    with torch.no_grad():  # an untrained backbone's maps are ~1e-8: scale them into a testable range
        net.head.weight.mul_(1e6)
    return net


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["last", "multi"])
def test_cams_any_size_whole_and_tiled(model, mode):
    rgb = _rgb(60, 100)
    cams, probs = cams_for_image(model, rgb, mode=mode, window=48)
    assert cams.shape == (3, 60, 100) and cams.dtype == np.float32
    assert probs.shape == (3,) and ((probs > 0) & (probs < 1)).all()
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    peaks = cams.reshape(3, -1).max(axis=1)
    assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))  # each class max-normalised
    # the tiled path with one tile covering the image is the whole-image pass
    single, probs_1 = cams_for_image(model, rgb, mode=mode, tile=128, window=48)
    np.testing.assert_allclose(single, cams, atol=1e-5)
    np.testing.assert_allclose(probs_1, probs, rtol=1e-5)
    # overlapping tiles cover every pixel and blend into one normalised map per class
    tiled, _ = cams_for_image(model, rgb, mode=mode, tile=48, overlap=8, window=48)
    assert tiled.shape == cams.shape and np.isfinite(tiled).all() and tiled.min() >= 0
    peaks = tiled.reshape(3, -1).max(axis=1)
    assert np.all(np.isclose(peaks, 1.0, atol=1e-5) | (peaks == 0)) and peaks.max() == pytest.approx(1.0)
    with pytest.raises(HistoWSSSError, match="overlap"):
        cams_for_image(model, rgb, tile=64, overlap=64)


@pytest.mark.parametrize("mode", ["last", "multi"])
def test_cams_for_image_gives_the_raw_logits_of_the_same_pass(model, mode):
    # the Review canvas takes its raw logits from the CAM pass instead of a second forward
    rgb = _rgb(60, 100)
    cams, probs = cams_for_image(model, rgb, mode=mode, window=48, normalize=False)
    cams2, probs2, raw = cams_for_image(model, rgb, mode=mode, window=48, normalize=False, return_logits=True)
    np.testing.assert_array_equal(cams2, cams)
    np.testing.assert_array_equal(probs2, probs)
    assert raw.shape == (3, 60, 100) and raw.dtype == np.float32 and raw.min() < 0 < raw.max()
    np.testing.assert_allclose(raw, logit_maps(model, rgb), rtol=1e-4, atol=1e-4 * float(np.abs(raw).max()))
    # tiled: one tile over the whole image is the whole-image pass; overlapping tiles blend the
    # logits like the maps (every pixel covered, values within the range the tiles produce)
    _, _, raw_1 = cams_for_image(model, rgb, mode=mode, tile=128, window=48, normalize=False, return_logits=True)
    np.testing.assert_allclose(raw_1, raw, rtol=1e-5, atol=1e-6 * float(np.abs(raw).max()))
    cams_t, _, raw_t = cams_for_image(model, rgb, mode=mode, tile=48, overlap=12, window=48, normalize=False,
                                      return_logits=True)
    assert raw_t.shape == raw.shape and cams_t.shape == cams.shape and np.isfinite(raw_t).all()
    assert not np.allclose(raw_t, raw)  # tiles see less context: a different field, not a copy


def test_pseudo_mask_gating_and_white_background():
    h, w = 20, 30
    cams = np.zeros((3, h, w), np.float32)
    cams[0, :, :10] = 1.0  # tumour left
    cams[1, :, 10:20] = 0.8  # stroma middle
    cams[2, :, 20:] = 0.6  # normal right
    rgb = np.full((h, w, 3), 120, np.uint8)
    rgb[:8, 22:] = 250  # a glass corner
    rgb[0, 0] = 255  # one white pixel: too small to count as background
    mask = pseudo_mask(cams, LUAD, rgb=rgb, labels=[1, 1, 1])
    assert (mask[:, :10] == 0).all() and (mask[:, 10:20] == 1).all()
    assert (mask[:8, 22:] == LUAD.background_index).all() and (mask[8:, 20:] == 2).all()
    # label gating: normal is absent, so its region goes to the best allowed class, never 2
    gated = pseudo_mask(cams, LUAD, rgb=rgb, labels=[1, 1, 0])
    assert 2 not in gated
    # probability gating keeps the most probable class even below the threshold
    by_prob = pseudo_mask(cams, LUAD, probs=np.array([0.1, 0.3, 0.2], np.float32))
    assert set(np.unique(by_prob)) == {1}
    # breast-style tables keep white tissue (fat) as tissue
    no_white = pseudo_mask(cams, LUAD, rgb=rgb, labels=[1, 1, 1], white_background=False)
    assert LUAD.background_index not in no_white
    # so does GlaS, whose ground truth labels a gland's pale lumen as gland
    glas = get_preset("glas")
    lumen = pseudo_mask(cams[:2], glas, rgb=rgb, labels=[1, 1])
    assert glas.background_index not in lumen and (lumen[:, :10] == 0).all()
    with pytest.raises(HistoWSSSError, match="3 entries|label vector"):
        pseudo_mask(cams, LUAD, labels=[1, 0])


def test_palette_png_and_folder_generation(model, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    names = [format_label_name("a", [1, 0, 0]), format_label_name("b", [0, 1, 1])]
    for i, n in enumerate(names):
        Image.fromarray(_rgb(40 + 10 * i, 50, seed=i)).save(images / n)
    out, cams_dir = tmp_path / "out", tmp_path / "cams"
    events = list(generate_pseudo_masks(model, LUAD, images, out, PseudoMaskSettings(mode="last"), cams_dir=cams_dir,
                                        labels="names"))
    assert [e.kind for e in events] == ["step", "step", "done"]
    for i, n in enumerate(names):
        stem = n[:-4]
        png = out / f"{stem}.png"
        with Image.open(png) as im:
            assert im.mode == "P" and im.size == (50, 40 + 10 * i)
            assert im.getpalette()[: 3 * 4] == LUAD.palette()[: 3 * 4]
        idx = read_index_mask(png, LUAD)
        allowed = {0} if i == 0 else {1, 2}
        assert set(np.unique(idx)) <= allowed | {LUAD.background_index}
        assert np.load(cams_dir / f"{stem}.npy").shape == (3, 40 + 10 * i, 50)
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    save_pseudo_mask(tmp_path / "m.png", mask, LUAD)
    with Image.open(tmp_path / "m.png") as im:
        assert np.array_equal(np.array(im), mask)
        assert [tuple(c) for c in np.array(im.convert("RGB")).reshape(-1, 3)] == [c.color for c in LUAD.classes] + [(255, 255, 255)]


def test_real_wsss4luad_cams_beat_trivial_baseline(wsss4luad_dir, tmp_path):
    """A short training on patches of some WSSS4LUAD images; label-gated pseudo-masks on other
    images must beat giving every tissue pixel the image's most common training class."""
    ps = tmp_path / "patches"
    make_patches(wsss4luad_dir / "val" / "img", wsss4luad_dir / "val" / "mask", ps, "wsss4luad",
                 patch_size=128, stride=96, val_fraction=0.2, seed=0)
    spec = load_dataset(ps)
    cfg = TrainConfig(method="cam", epochs=1, batch_size=16, lr=3e-4, seed=0, device="cpu", cam_mode="last", output_stride=32,
                      max_steps_per_epoch=12, warmup_steps=2, val_max_images=1)
    events = list(train_classifier(spec, tmp_path / "run", cfg))
    assert events[-1].kind == "done"
    net, classes, _ = load_run(tmp_path / "run")
    prior = np.sum([s.labels for s in spec.train], axis=0)
    bg = classes.background_index
    cam_cm, base_cm = ConfusionMatrix(bg + 1, bg), ConfusionMatrix(bg + 1, bg)
    for s in spec.val:
        rgb, gt = s.image(), s.mask()
        cams, _ = cams_for_image(net, rgb, mode="last", window=128)
        cam_cm.update(pseudo_mask(cams, classes, rgb=rgb, labels=s.labels), gt)
        base = np.full(gt.shape, np.argmax(np.where(s.labels > 0, prior, -1)), np.uint8)
        base[white_background_mask(rgb)] = bg
        base_cm.update(base, gt)
    names = classes.names + ["background"]
    cam_miou, base_miou = cam_cm.scores(names)["miou"], base_cm.scores(names)["miou"]
    assert cam_miou > base_miou, (cam_miou, base_miou)
