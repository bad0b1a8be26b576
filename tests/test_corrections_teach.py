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
