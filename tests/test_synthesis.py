"""HisynSeg synthesis: Mosaic and Bezier masks are exact, synthesis is seeded, the realness filter
learns to tell real from synthetic, and the consistency loss behaves."""

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import WeakSample, parse_label_name
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.stage2.synthesis import (
    MAX_WHITE_SHARE,
    RealnessFilter,
    bezier,
    bezier_blob,
    consistency_loss,
    image_level_loss,
    mosaic,
    single_label_pools,
    synthesize,
)

CLASSES = get_preset("wsss4luad")
# One flat colour per class: after synthesis every pixel's colour must name its mask class.
COLOURS = {0: (200, 60, 60), 1: (60, 180, 60), 2: (70, 70, 220)}


def flat_pools(size: int = 64, glass: int = 0, max_white: float = 1.0) -> dict[int, list[WeakSample]]:
    """Single-class patches of one flat colour each, with ``glass`` white rows at the top."""
    return single_label_pools(flat_samples(size, glass), CLASSES, max_white=max_white)


def flat_samples(size: int = 64, glass: int = 0) -> list[WeakSample]:
    samples = []
    for k, col in COLOURS.items():
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[...] = col
        img[:glass] = 255
        labels = np.zeros(3, dtype=np.uint8)
        labels[k] = 1
        samples.append(WeakSample(f"flat{k}", labels, None, reader=lambda img=img: img))
    return samples


def colour_class(img: np.ndarray) -> np.ndarray:
    out = np.full(img.shape[:2], 255, dtype=np.uint8)
    for k, col in COLOURS.items():
        out[np.abs(img.astype(int) - col).sum(axis=2) < 30] = k
    return out


@pytest.mark.parametrize("maker", [mosaic, bezier])
def test_synthetic_masks_are_exact(maker):
    pools = flat_pools()
    for seed in range(6):
        img, mask = maker(pools, CLASSES, 64, np.random.default_rng(seed))
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.uint8
        assert (mask == colour_class(img)).all()
        assert len(set(np.unique(mask).tolist())) >= 2


@pytest.mark.parametrize("maker", [mosaic, bezier])
def test_glass_in_a_source_patch_is_background(maker):
    pools = flat_pools(glass=40)
    bg = CLASSES.background_index
    found = False
    for seed in range(6):
        img, mask = maker(pools, CLASSES, 64, np.random.default_rng(seed))
        if (mask == bg).any():
            found = True
            assert (img[mask == bg].min(axis=1) > 200).mean() > 0.98
        coloured = colour_class(img) != 255
        assert (mask[coloured] == colour_class(img)[coloured]).all()
        assert (mask[~coloured] == bg).mean() > 0.9  # glass specks under 64 px stay tissue (white rule)
    assert found


def test_synthesis_from_real_patches_is_seeded(wsss4luad_dir):
    samples = []
    for p in sorted((wsss4luad_dir / "train_examples").glob("*.png")):
        samples.append(WeakSample(p.stem, parse_label_name(p)[1], p))
    pools = single_label_pools(samples, CLASSES)
    assert sorted(pools) == [0, 1, 2]  # the [1, 1, 0] patch is not single-label
    a = synthesize(pools, CLASSES, 4, 96, ("mosaic", "bezier"), seed=3)
    b = synthesize(pools, CLASSES, 4, 96, ("mosaic", "bezier"), seed=3)
    c = synthesize(pools, CLASSES, 4, 96, ("mosaic", "bezier"), seed=4)
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))
    assert any((x[0] != y[0]).any() for x, y in zip(a, c))
    with pytest.raises(DatasetError, match="bogus"):
        synthesize(pools, CLASSES, 2, 96, ("bogus",))


def test_single_label_pools_need_two_classes():
    only = [WeakSample("a", np.array([1, 0, 0], np.uint8), None, reader=lambda: np.zeros((8, 8, 3), np.uint8))]
    with pytest.raises(DatasetError, match="two classes"):
        single_label_pools(only, CLASSES)


def test_mostly_white_patches_stay_out_of_the_pools():
    """A single-label patch that is mostly glass or lumen would teach 'white = this class'."""
    assert sorted(single_label_pools(flat_samples(glass=24), CLASSES)) == [0, 1, 2]  # 24 of 64 rows white: kept
    assert MAX_WHITE_SHARE == 0.5
    with pytest.raises(DatasetError, match="3 mostly white"):  # 40 of 64 rows white: left out
        single_label_pools(flat_samples(glass=40), CLASSES)
    mixed = flat_samples(glass=40)[:1] + flat_samples(glass=0)[1:]
    pools = single_label_pools(mixed, CLASSES)
    assert sorted(pools) == [1, 2]  # only the mostly white class-0 patch is gone


def test_bezier_blob_is_a_closed_region():
    rng = np.random.default_rng(0)
    blob = bezier_blob(128, rng)
    from scipy import ndimage

    area = blob.mean()
    assert 0.05 < area < 0.7
    _, n = ndimage.label(blob)
    assert n == 1
    assert (ndimage.binary_fill_holes(blob) == blob).all()


def test_realness_filter_prefers_real_looking_images(wsss4luad_dir):
    from napari_histo_wsss.core.data.datasets import read_rgb

    real = [read_rgb(p)[:96, :96] for p in sorted((wsss4luad_dir / "val" / "img").glob("*.png"))[:12]]
    stripes = []
    for i in range(12):
        im = np.zeros((96, 96, 3), np.uint8)
        im[:, (np.arange(96) // (4 + i % 3)) % 2 == 0] = (250, 0, 250)
        stripes.append(im)
    filt = RealnessFilter(steps=40, batch_size=8, size=64, seed=0)
    losses = filt.fit(real, stripes)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    mixed = stripes[:3] + real[:3]
    keep = filt.keep(mixed, 0.5)
    assert keep.tolist() == [3, 4, 5]


def test_consistency_and_image_losses():
    cam = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = cam.detach().repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).clone().requires_grad_(True)
    assert consistency_loss(logits, cam).item() < 1e-6
    other = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = consistency_loss(other, cam)
    assert loss.item() > 1e-3
    loss.backward()
    assert other.grad is not None and cam.grad is not None
    y = torch.tensor([[1.0, 0.0, 1.0]])
    assert image_level_loss(torch.tensor([[9.0, -9.0, 9.0]]), y) < image_level_loss(torch.tensor([[-9.0, 9.0, -9.0]]), y)
