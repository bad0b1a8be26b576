"""A project on the real CMU slide with labelled patches and a classifier trained one tiny epoch on
CPU (a few seconds), shared by tests/test_review.py and tests/test_review_widget.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.stage1.train import TrainConfig, train_classifier

# 32-px patches at 4 um/px: about 30 tissue patches on CMU-1-Small-Region, a 277 x 370 px canvas.
PATCH = 32
MPP = 4.0
RUN = "cls-cam-test"


def labelled_project_with_classifier(root: Path, slide: Path) -> tuple[Project, str]:
    """Top half of the tissue patches labelled stroma, bottom half tumour; run ``runs/cls-cam-test``."""
    project = Project.create(root, "wsss4luad", patch_size=PATCH, target_mpp=MPP)
    sid = project.add_slide(slide)
    grid = project.grid(sid)
    top = grid.y < np.median(grid.y)
    for idx, lab in ((np.flatnonzero(top)[:8], [0, 1, 0]), (np.flatnonzero(~top)[:8], [1, 0, 0])):
        project.set_patch_labels(sid, grid.x[idx], grid.y[idx], grid.size0, np.array(lab))
    # no synthetic images: the review tests check review mechanics on the tiny classifier they were written
    # for (with the default synthetic share, one class's CAM can stay zero on the whole slide, and the tests'
    # expected canvases divide by each class's peak)
    cfg = TrainConfig(method="cam", epochs=1, batch_size=4, weights="imagenet", device="cpu", patch_size=PATCH,
                      synth_share=0.0)
    for _ev in train_classifier(project.root, project.runs_dir / RUN, cfg):
        pass
    return project, sid
