"""One tiler, one blending window, one working-resolution rule and one white-glass rule for
make-patches, tiled CAMs, prediction and the Review canvas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.models import CAMClassifier
from napari_histo_wsss.core.slides.grid import axis_starts, cosine_window, make_grid, working_downsample
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.stage1.cams import cams_for_image
from napari_histo_wsss.core.stage2 import infer


@pytest.mark.parametrize("length,size,step", [(100, 100, 60), (101, 100, 60), (1000, 256, 192), (1000, 250, 250),
                                              (5, 8, 8), (777, 64, 64)])
def test_axis_starts_flush_and_regular_lattices(length, size, step):
    flush = axis_starts(length, size, step)
    lattice = axis_starts(length, size, step, flush=False)
    assert len(flush) == len(lattice) == max(1, int(np.ceil(max(length - size, 0) / step)) + 1)
    assert lattice == [i * step for i in range(len(lattice))]  # regular: prediction's streaming blend needs it
    assert flush[:-1] == lattice[:-1] and flush[-1] == max(0, length - size)  # last window inside the image
    assert lattice[-1] + size >= length and flush[-1] + size >= min(length, size)


def test_infer_uses_the_shared_window_and_tiler():
    assert infer.cosine_window is cosine_window
    w = cosine_window(64, 16)
    assert np.allclose(w[-16:] + w[:16], 1.0, atol=1e-6) and w.min() > 0
    # predict_image covers an image with the regular lattice: a pointwise predictor comes back exact
    rgb = np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8)

    def red(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]

    out = infer.predict_image(rgb, red, tile=128, overlap=32)
    np.testing.assert_allclose(out[0], to_tensor(rgb)[0].numpy(), atol=1e-5)


def test_tiled_cams_blend_any_image_shape():
    """cams_for_image's tiles are blended with the cosine window, also for an image thinner than
    two overlaps (one tile across that side) - the window there is shortened, not an error."""
    torch.manual_seed(0)
    model = CAMClassifier(3, weights="none").eval()
    with torch.no_grad():
        model.head.weight.mul_(1e6)
    rng = np.random.default_rng(0)
    for shape in ((40, 300), (200, 330)):
        rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        cams, probs = cams_for_image(model, rgb, tile=128, overlap=64, window=64)
        assert cams.shape == (3,) + shape and np.isfinite(cams).all() and cams.max() <= 1 and probs.shape == (3,)
    with pytest.raises(Exception, match="overlap"):
        cams_for_image(model, rgb, tile=128, overlap=65)


def test_working_downsample_is_one_rule(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(path)
    with open_slide(path) as slide:
        assert not slide.mpp
        assert working_downsample(slide) == 1.0
        assert working_downsample(slide, 2.0, downsample=3.0) == 3.0
        assert working_downsample(slide, 2.0, level=0) == 1.0  # a level wins over target_mpp
        with pytest.raises(SlideError, match="level 9 does not exist"):
            working_downsample(slide, level=9)
        with pytest.warns(UserWarning, match="microns per pixel unknown"):
            assert working_downsample(slide, 1.0) == 1.0
        # whole-slide prediction asks for the strict rule: a wrong scale would go unnoticed
        with pytest.raises(SlideError, match="pixel size"):
            working_downsample(slide, 1.0, strict=True)
        with pytest.raises(SlideError, match="pixel size"):
            next(infer.predict_slide(slide, lambda x: x[:, :1], tmp_path / "o.ome.zarr", target_mpp=1.0,
                                     classes=get_preset("glas"), tissue=False))
        with pytest.raises(SlideError, match="positive"):
            working_downsample(slide, downsample=0.0)
        with pytest.warns(UserWarning, match="microns per pixel unknown"):
            assert make_grid(slide, None, patch_size=64, target_mpp=1.0).size0 == 64


def test_prediction_white_glass_rule_is_unchanged_for_every_colour():
    """Prediction's white glass now comes from tissue.white_background_mask (no speck removal):
    over all 2**24 colours it marks exactly the pixels the earlier tensor rule (grey > 200 on the
    de-normalised batch) did, so stage-two scores do not move."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    values = np.arange(2**24, dtype=np.uint32)
    for chunk in np.split(values, 8):
        rgb = np.stack([(chunk >> 16) & 255, (chunk >> 8) & 255, chunk & 255], -1).astype(np.uint8).reshape(512, -1, 3)
        x = to_tensor(rgb)[None]
        den = (x * std + mean) * 255.0
        before = (0.299 * den[:, 0] + 0.587 * den[:, 1] + 0.114 * den[:, 2]) > 200
        np.testing.assert_array_equal(infer._white_glass(x)[0, 0].numpy() > 0, before[0].numpy())
