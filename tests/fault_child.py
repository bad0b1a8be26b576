"""Child process for tests/test_faults.py: writes in a loop and prints ``ack N`` after each
finished write, until the parent kills it with SIGKILL somewhere in the middle of a write.

    python tests/fault_child.py project DIR      # Project.set_patch_labels + write_mask, forever
    python tests/fault_child.py checkpoint DIR   # models.save_model of a model stamped with N, forever
    python tests/fault_child.py predict DIR      # infer.predict_slide of DIR/slide.png (acks per batch)

The values written at step N are functions of N (see ``labels_for`` and the test), so the parent
can check that what it reopens is exactly one of the states the child went through.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = "wsss4luad"


def labels_for(n: int, num_classes: int) -> list[int]:
    """The label vector written for patch ``n`` (never all zero)."""
    bits = [(n >> k) & 1 for k in range(num_classes)]
    return bits if any(bits) else [1] + bits[1:]


def _project(folder: Path) -> None:
    from napari_histo_wsss.core.data.project import Project

    root = folder / "project"
    if (root / "project.json").is_file():
        proj = Project.open(root)
        sid = next(iter(proj.slides))
    else:
        proj = Project.create(root, CLASSES, patch_size=64, target_mpp=None)
        sid = proj.add_slide(folder / "slide.png")
    c = proj.classes.num_classes
    n = len(proj.patch_labels())
    while True:
        proj.set_patch_labels(sid, n * 64, 0, 64, labels_for(n, c), who="fault-test")
        proj.write_mask(sid, "pseudo", np.full((96, 128), n % (c + 1), dtype=np.uint8), 8.0)
        print(f"ack {n}", flush=True)
        n += 1


def _checkpoint(folder: Path) -> None:
    import torch

    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.models import CAMClassifier, save_model

    classes = get_preset(CLASSES)
    model = CAMClassifier(classes.num_classes, backbone="efficientnet-lite0", weights="none")
    n = 0
    while True:
        with torch.no_grad():
            model.head.weight.fill_(float(n))
        save_model(folder / "checkpoints" / "last.pt", model, {"classes": classes, "step": n})
        print(f"ack {n}", flush=True)
        n += 1


def _predict(folder: Path) -> None:
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.stage2.infer import predict_slide, segmenter_predict_fn
    from napari_histo_wsss.core.stage2.train import load_segmenter

    model, classes, _, _ = load_segmenter(folder / "run")
    fn = segmenter_predict_fn(model, classes, "cpu")
    with open_slide(folder / "slide.png") as slide:
        for ev in predict_slide(slide, fn, folder / "out" / "slide.ome.zarr", tile=96, overlap=16, batch_size=2,
                                classes=classes, downsample=1.0):
            print(f"ack {ev.step} {ev.kind}", flush=True)


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    {"project": _project, "checkpoint": _checkpoint, "predict": _predict}[mode](where)
