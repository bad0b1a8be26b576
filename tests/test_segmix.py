"""SegMix tile shuffle and its feedback curriculum."""

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.stage1.segmix import SegMixScheduler, default_tiles, segmix_batch


def _batch(b=6, h=64, w=64, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # every image a distinct constant value per image, so each pixel tells its source image
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    targets = (torch.rand(b, c, generator=g) > 0.5).float()
    targets[:, 0] = 1.0
    return images, targets


@pytest.mark.parametrize("tile,share,h,w", [(16, 0.5, 64, 64), (32, 0.25, 64, 64), (24, 0.75, 64, 80), (16, 1.0, 48, 48)])
def test_label_mass_and_pixel_sources(tile, share, h, w):
    images, targets = _batch(h=h, w=w)
    g = torch.Generator().manual_seed(3)
    mixed, soft, mixing = segmix_batch(images, targets, tile, share, generator=g)
    # label mass is conserved over the batch and targets stay in [0, 1]
    torch.testing.assert_close(soft.sum(0), targets.sum(0))
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1 + 1e-6
    # the mixing matrix is doubly stochastic and agrees with the pixels actually moved
    torch.testing.assert_close(mixing.sum(1), torch.ones(len(images)))
    torch.testing.assert_close(mixing.sum(0), torch.ones(len(images)))
    src = mixed[:, 0].long()  # source image index of every pixel
    counted = torch.stack([torch.bincount(s.flatten(), minlength=len(images)) for s in src]).float() / (h * w)
    torch.testing.assert_close(counted, mixing)
    torch.testing.assert_close(soft, mixing @ targets)


def test_tiles_really_move_and_keep_their_position():
    g0 = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 64, 64, generator=g0)
    targets = torch.eye(4)[:, :3]
    mixed, _, mixing = segmix_batch(images, targets, 16, 0.5, generator=torch.Generator().manual_seed(5))
    swapped = 0
    for i in range(4):
        for j in range(4):
            t = mixed[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
            orig = images[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
            same = torch.tensor([torch.equal(t[b], orig[b]) for b in range(4)])
            if not same.all():
                swapped += 1
                # every image got another image's tile from the same grid position (derangement)
                assert not same.any()
                for b in range(4):
                    assert any(torch.equal(t[b], orig[s]) for s in range(4) if s != b)
    assert swapped == 8  # half of the 16 positions
    assert not torch.equal(mixed, images)
    assert float(mixing.diagonal().mean()) == pytest.approx(0.5)


def test_deterministic_with_seed_and_varies_without():
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.ones(5, 2)
    a = segmix_batch(images, targets, 8, 0.5, generator=torch.Generator().manual_seed(42))
    b = segmix_batch(images, targets, 8, 0.5, generator=torch.Generator().manual_seed(42))
    c = segmix_batch(images, targets, 8, 0.5, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])


def test_union_targets_and_degenerate_cases():
    images, targets = _batch(b=4)
    _, union, mixing = segmix_batch(images, targets, 16, 0.5, generator=torch.Generator().manual_seed(0), target_mode="union")
    expected = torch.stack([targets[mixing[b] > 0].amax(0) for b in range(4)])
    torch.testing.assert_close(union, expected)
    # a single image or share 0 leaves the batch untouched
    one = segmix_batch(images[:1], targets[:1], 16, 0.5)
    assert torch.equal(one[0], images[:1]) and torch.equal(one[1], targets[:1])
    none = segmix_batch(images, targets, 16, 0.0)
    assert torch.equal(none[0], images)
    with pytest.raises(ValueError):
        segmix_batch(images, targets, 0, 0.5)
    with pytest.raises(ValueError):
        segmix_batch(images, targets[:2], 16, 0.5)


def test_default_tiles_are_stride_multiples():
    assert default_tiles(224, 16) == (112, 64, 32)
    assert default_tiles(224, 8) == (112, 56, 32)
    assert default_tiles(128, 16) == (64, 32, 16)
    for t in default_tiles(96, 16):
        assert t % 16 == 0 and t < 96


def test_scheduler_warmup_advance_hold_and_tightening():
    s = SegMixScheduler(tiles=(32, 64), shares=(0.25, 0.5), warmup_epochs=2, decay=0.9, mode="min")
    assert [(lv.tile, lv.share) for lv in s.ladder] == [(64, 0.25), (64, 0.5), (32, 0.25), (32, 0.5)]
    assert s.current() is None
    assert not s.step(1.0)           # warm-up epoch 1
    assert s.current() is None
    assert s.step(1.0)               # end of warm-up: first rung, threshold 0.9
    assert (s.current().tile, s.current().share) == (64, 0.25)
    assert s.state_dict()["threshold"] == pytest.approx(0.9)
    assert not s.step(0.95)          # not below 0.9: hold
    assert s.current().share == 0.25
    assert s.step(0.85)              # beats 0.9: advance, threshold 0.81
    assert s.state_dict()["threshold"] == pytest.approx(0.81)
    assert (s.current().tile, s.current().share) == (64, 0.5)
    assert s.step(0.5) and s.step(0.3)
    assert (s.current().tile, s.current().share) == (32, 0.5)
    assert not s.step(0.01)          # already finest: holds at the last rung
    assert s.level == 4
    assert not s.step(float("nan"))  # a non-finite feedback never advances


def test_scheduler_max_mode_and_state_roundtrip():
    s = SegMixScheduler(tiles=(16,), shares=(0.25, 0.5, 0.75), warmup_epochs=1, decay=0.5, mode="max")
    s.step(0.6)                      # error 0.4 -> threshold error 0.2 -> mIoU 0.8 needed
    assert s.state_dict()["threshold"] == pytest.approx(0.8)
    assert not s.step(0.7)
    assert s.step(0.85)
    state = s.state_dict()
    t = SegMixScheduler(tiles=(16,), shares=(0.25, 0.5, 0.75), warmup_epochs=1, decay=0.5, mode="max")
    t.load_state_dict(state)
    assert t.state_dict() == state
    assert (t.current().tile, t.current().share) == (16, 0.5)
    other = SegMixScheduler(tiles=(32,), shares=(0.25,))
    with pytest.raises(ValueError):
        other.load_state_dict(state)
    assert np.isfinite(state["feedback"])


def test_time_schedule_climbs_to_the_finest_rung_and_feedback_adjusts_it():
    """Time schedule: warm-up, then the rung rises with elapsed epochs to the finest for the last
    shuffled epoch, whatever the feedback; feedback that beats the threshold moves one rung ahead,
    feedback worse than the epoch before holds the rung one epoch."""
    def levels(feedback, **kw):
        s = SegMixScheduler(tiles=(64, 32), shares=(0.25, 0.5), warmup_epochs=1, mode="min", schedule="time",
                            total_epochs=len(feedback), **kw)
        out = [s.level]
        for f in feedback:
            s.step(f)
            out.append(s.level)
        return out[:-1]  # the level each epoch ran at

    flat = levels([0.5] * 6)
    assert flat == [0, 1, 2, 3, 4, 4] and flat[-1] == 4  # climbs with no feedback gain at all
    assert levels([float("nan")] * 6) == flat  # no feedback (no validation): time alone
    fast = levels([0.5, 0.3, 0.25, 0.2, 0.15, 0.1])
    assert fast[2] > flat[2]  # a clear gain moves ahead of time
    held = levels([0.5, 0.4, 0.6, 0.4, 0.4, 0.4])  # epoch 3 is worse than epoch 2
    assert held[3] == held[2] and held[-1] == 4
    # the saved state keeps the schedule; a state from before the time schedule resumes on feedback
    s = SegMixScheduler(tiles=(64, 32), warmup_epochs=1, schedule="time", total_epochs=6)
    s.step(0.5)
    state = s.state_dict()
    assert state["schedule"] == "time"
    old = {k: v for k, v in state.items() if k not in ("schedule", "last_error")}
    t = SegMixScheduler(tiles=(64, 32), warmup_epochs=1, schedule="time", total_epochs=6)
    t.load_state_dict(old)
    assert t.schedule == "feedback"
    with pytest.raises(ValueError, match="number of epochs"):
        SegMixScheduler(tiles=(64,), schedule="time")
