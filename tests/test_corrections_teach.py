"""Corrections teach stage one: grid patches inside pixels the pathologist corrected or reviewed get
exact labels from the corrected mask, for the classifier and the segmenter datasets of a project."""

from __future__ import annotations

import numpy as np

from napari_histo_wsss.core.data.datasets import load_dataset, reviewed_patch_labels
from napari_histo_wsss.core.data.project import Project


def _project(tmp_path, cmu_svs):
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=32, target_mpp=4.0)
    sid = project.add_slide(cmu_svs)
    return project, sid, project.grid(sid)


def test_reviewed_patches_get_the_corrected_classes(tmp_path, cmu_svs):
    project, sid, grid = _project(tmp_path, cmu_svs)
    assert reviewed_patch_labels(project, sid) == {}  # no corrections: nothing
    rec = project.slides[sid]
    ds = grid.downsample  # the review canvas at the working resolution
    h, w = int(np.ceil(rec.height / ds)), int(np.ceil(rec.width / ds))
    k = project.classes.num_classes
    corr = np.full((h, w), k, np.uint8)  # background everywhere
    a, b = 0, 1  # two tissue patches
    n = int(round(grid.size0 / ds))
    ra, ca = int(round(grid.y[a] / ds)), int(round(grid.x[a] / ds))
    rb, cb = int(round(grid.y[b] / ds)), int(round(grid.x[b] / ds))
    corr[ra:ra + n, ca:ca + n] = 1  # patch a: all stroma
    corr[rb:rb + n, cb:cb + n] = 0  # patch b: tumour with a stroma corner
    corr[rb:rb + n // 2, cb:cb + n // 2] = 1
    reviewed = np.zeros((h, w), bool)
    reviewed[ra:ra + n, ca:ca + n] = True
    flag = np.zeros((h, w), bool)
    flag[rb:rb + n, cb:cb + n] = True
    flag[rb, cb:cb + n] = False  # one row short of full: still over 90 %
    project.write_mask(sid, "corrected", corr, ds)
    project.write_mask(sid, "corrected_flag", flag, ds)
    project.write_mask(sid, "reviewed", reviewed, ds)
    got = reviewed_patch_labels(project, sid)
    key_a = (int(grid.x[a]), int(grid.y[a]), int(grid.size0))
    key_b = (int(grid.x[b]), int(grid.y[b]), int(grid.size0))
    assert set(got) == {key_a, key_b}
    assert got[key_a].tolist() == [0, 1, 0] and got[key_b].tolist() == [1, 1, 0]

    # the pathologist's earlier patch label on a is replaced by the exact one; another label is kept
    project.set_patch_labels(sid, grid.x[a], grid.y[a], grid.size0, [1, 0, 0])
    project.set_patch_labels(sid, grid.x[2], grid.y[2], grid.size0, [0, 0, 1])
    spec = load_dataset(project.root)
    by_name = {s.name: s.labels.tolist() for s in spec.train}
    assert by_name[f"{sid}_{key_a[0]}_{key_a[1]}_{key_a[2]}"] == [0, 1, 0]
    assert by_name[f"{sid}_{key_b[0]}_{key_b[1]}_{key_b[2]}"] == [1, 1, 0]
    assert by_name[f"{sid}_{int(grid.x[2])}_{int(grid.y[2])}_{int(grid.size0)}"] == [0, 0, 1]
    assert len(spec.train) == 3

    # a patch only half reviewed is not settled
    reviewed[:] = False
    reviewed[ra:ra + n // 2, ca:ca + n] = True
    project.write_mask(sid, "reviewed", reviewed, ds)
    assert key_a not in reviewed_patch_labels(project, sid)


def test_corrected_patches_carry_their_masks_into_stage_one(tmp_path, cmu_svs):
    """The corrected mask of a settled patch (unconfirmed pixels as background) rides with the
    sample, and a stage-one run on the project learns pixels from it (its log says how many)."""
    import torch

    from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

    project, sid, grid = _project(tmp_path, cmu_svs)
    rec = project.slides[sid]
    ds = grid.downsample
    h, w = int(np.ceil(rec.height / ds)), int(np.ceil(rec.width / ds))
    k = project.classes.num_classes
    n = int(round(grid.size0 / ds))
    r0, c0 = int(round(grid.y[0] / ds)), int(round(grid.x[0] / ds))
    corr = np.full((h, w), k, np.uint8)
    corr[r0:r0 + n, c0:c0 + n] = 0
    corr[r0:r0 + n, c0 + n // 2:c0 + n] = 1  # right half stroma
    flag = np.zeros((h, w), bool)
    flag[r0 + 1:r0 + n, c0:c0 + n] = True  # the first row not confirmed
    project.write_mask(sid, "corrected", corr, ds)
    project.write_mask(sid, "corrected_flag", flag, ds)
    for i, lab in enumerate(([1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]), start=1):
        project.set_patch_labels(sid, grid.x[i], grid.y[i], grid.size0, lab)
    spec = load_dataset(project.root)
    masked = [s for s in spec.train if s.mask is not None]
    assert len(masked) == 1 and len(spec.train) == 6
    m = masked[0].mask
    assert m.shape == (32, 32) and (m[0] == k).all()  # the unconfirmed row is not learned from
    assert (m[1:, : n // 2] == 0).all() and (m[1:, n // 2:] == 1).all()
    assert masked[0].labels.tolist() == [1, 1, 0]

    cfg = TrainConfig(weights="none", batch_size=2, epochs=1, steps=2, crop_size=None, synth_share=0.0,
                      val_fraction=0.2, seed=0, output_stride=32, cam_mode="last")
    events = list(train_classifier(spec, tmp_path / "run", cfg))
    assert events[-1].kind == "done"
    text = " ".join(str(e.message) for e in events if e.message)
    assert "pixel loss on the corrected masks of 1 patch, weight 0.5" in text
    no_pix = list(train_classifier(spec, tmp_path / "run0", TrainConfig(**{**cfg.to_dict(), "correction_pixel_weight": 0.0})))
    assert "pixel loss on the corrected masks" not in " ".join(str(e.message) for e in no_pix if e.message)
    # same seed, same batches: only the pixel loss on the corrected patch tells the two runs apart
    from napari_histo_wsss.core.stage1.train import load_run

    with_pix, without = load_run(tmp_path / "run", "last")[0], load_run(tmp_path / "run0", "last")[0]
    assert not torch.allclose(with_pix.head.weight, without.head.weight)
    again = list(train_classifier(spec, tmp_path / "run1", cfg))
    assert again[-1].kind == "done"
    assert torch.equal(load_run(tmp_path / "run1", "last")[0].head.weight, with_pix.head.weight)


def test_masks_follow_the_image_through_augmentation_and_crops():
    """Flips, turns and random crops move a corrected mask exactly as its image."""
    import torch

    from napari_histo_wsss.core.data.datasets import WeakLabelDataset, WeakSample
    from napari_histo_wsss.core.stage1.train import _RandomCrops, _SeededItems

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        rgb = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
        mask = (rgb[..., 0] >= 128).astype(np.uint8)  # class 1 where the red channel is high
        samples.append(WeakSample(f"p{i}", np.array([1, 1, 0], np.uint8), None, lambda rgb=rgb: rgb, mask=mask))
    samples.append(WeakSample("plain", np.array([1, 0, 0], np.uint8), None, lambda: samples[0].image()))
    ds = _SeededItems(_RandomCrops(WeakLabelDataset(samples, size=48, augment=True, masks=True, background=3), 32), 5)
    turned = 0
    for i in range(4):
        x, y, m = ds[i]
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
        # the colour jitter keeps the order of the red channel around its middle, not its value: compare
        # against the un-jittered image moved by the same geometry instead
        red = x[0]
        assert ((red[m == 1].mean() > red[m == 0].mean()).item())
        turned += int(not torch.equal(m, torch.from_numpy(samples[i].mask[:32, :32].astype(np.int64))))
    assert turned > 0
    x, y, m = ds[4]
    assert (m == 3).all()  # no corrected mask: background everywhere, nothing learned
