"""Small generated inputs shared by test_batch.py and test_faults.py: H&E-coloured "slides" on
white glass and an untrained segmenter run folder made through the public model API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable, get_preset
from napari_histo_wsss.core.models import Segmenter, save_model
from napari_histo_wsss.core.stage2.train import SegConfig


def tissue_image(width: int, height: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8: a few pink/purple ellipses (tissue) on near-white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[inside] = (np.array([200, 110, 170]) + rng.integers(-20, 20, (int(inside.sum()), 3))).clip(0, 255)
    return img


def write_slides(folder: Path) -> dict[str, Path]:
    """A PNG, a tiled TIFF and a JPEG slide plus a truncated (corrupt) tiled TIFF."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"a": folder / "a.png", "b": folder / "b.tif", "c": folder / "c.jpg", "corrupt": folder / "d_corrupt.tif"}
    Image.fromarray(tissue_image(400, 300, 1)).save(paths["a"])
    tifffile.imwrite(paths["b"], tissue_image(500, 350, 2), tile=(128, 128), photometric="rgb")
    Image.fromarray(tissue_image(300, 300, 3)).save(paths["c"], quality=95)
    whole = folder.parent / f".{folder.name}-whole.tif"
    tifffile.imwrite(whole, tissue_image(500, 350, 4), tile=(128, 128), photometric="rgb", compression="zlib")
    data = whole.read_bytes()
    paths["corrupt"].write_bytes(data[: len(data) // 2])
    whole.unlink()
    return paths


def segmenter_run(folder: Path, classes: ClassTable | None = None, seed: int = 0) -> Path:
    """An untrained (random) EfficientNet-Lite0 segmenter saved as a train-seg run folder."""
    classes = classes or get_preset("wsss4luad")
    torch.manual_seed(seed)
    model = Segmenter(classes.num_classes, "efficientnet-lite0", "none", 16)
    save_model(folder / "checkpoints" / "best.pt", model,
               {"classes": classes, "config": SegConfig(weights="none").to_dict(), "patch_size": 128})
    return folder
