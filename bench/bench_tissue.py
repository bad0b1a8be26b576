"""Does the tissue mask keep the tissue? ``core.slides.tissue.detect_tissue`` on real images.

* GlaS test A (60 colon images cut from inside the tissue, expert gland masks): the share of gland
  pixels the tissue mask leaves out (pale mucin and goblet cells are tissue), mean and the number
  of images with more than 5 % left out.
* WSSS4LUAD validation (31 lung images with masks): the share of non-background ground-truth
  pixels left out of the mask (its "background" class also holds small white alveolar spaces
  inside the tissue, so background kept inside the mask is not an error here and is not scored).
* The bundled slide (CMU-1-Small-Region.svs): the tissue share of the slide, for the record of
  how a slide with glass is affected.

    python bench/bench_tissue.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.slides.tissue import detect_tissue
from napari_histo_wsss.sample_data import sample_slide_path


def _mask_at(path: Path, shape: tuple[int, int]) -> np.ndarray:
    with open_slide(path) as s:
        m = detect_tissue(s).mask
    if m.shape != shape:
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize(shape[::-1], Image.NEAREST)) > 0
    return m


def main() -> None:
    data = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    t0 = time.perf_counter()
    glas = data / "glas-testA"
    left = []
    for img in sorted((glas / "img").glob("*.png")):
        gt = np.asarray(Image.open(glas / "mask_instance" / img.name)) > 0
        left.append(1.0 - _mask_at(img, gt.shape)[gt].mean())
    left = np.array(left)
    luad = data / "wsss4luad-subset" / "val"
    missed = []
    for img in sorted((luad / "img").glob("*.png")):
        gt = np.asarray(Image.open(luad / "mask" / img.name))
        tissue = gt != 3  # class 3 is background in WSSS4LUAD masks
        missed.append(1.0 - _mask_at(img, gt.shape)[tissue].mean())
    with open_slide(sample_slide_path()) as s:
        cmu = detect_tissue(s).fraction()
    print(f"GlaS test A ({len(left)} images): gland pixels left out of the tissue mask {left.mean():.3f} "
          f"(median {np.median(left):.3f}, max {left.max():.3f}); images with > 5 % left out: {(left > 0.05).sum()}")
    print(f"WSSS4LUAD val ({len(missed)} images): tissue pixels left out {np.mean(missed):.3f}")
    print(f"CMU-1-Small-Region.svs: tissue share of the slide {cmu:.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
