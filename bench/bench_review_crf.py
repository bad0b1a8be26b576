"""Review / ``histo-wsss cams``: what the dense CRF costs on a whole-slide canvas.

The slide path refines its automatic pseudo-mask with the dense CRF of ``pseudo-masks``
(``ReviewSettings.refine = "crf"``, ``core/review.py: refined_labels``). This bench computes the
CAMs of a real slide (default: the shared CMU Aperio slide) with a stage-one run, once, without
saving, then times on that canvas:

* the CAM job itself (tiles, for scale);
* the CRF as the Review runs it: 2048-px tiles with 256-px overlaps, tiles whose tissue holds a
  single class keep it without a CRF (exact for the CRF's energy);
* the CRF over every tile (``where`` not given), for comparison, and how many pixels the two
  disagree on.

It also reports how many tissue pixels the CRF changes. The run can be any stage-one run whose
classes are the preset's, e.g. one of ``bench/stage1_quality.py``'s default runs:

    python bench/bench_review_crf.py --run /tmp/s1qall/runs/p128-synth-pix-split0-seed0 [--slide S] [--max-side 4096]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.data.project import Project
    from napari_histo_wsss.core.review import (
        CamTile,
        CRFParams,
        ReviewSettings,
        _gates,
        compute_slide_cams,
        new_canvas,
        outside_canvas,
        plan_slide_cams,
        pseudo_from_canvas,
        refined_labels,
    )
    from napari_histo_wsss.core.stage1.refine import dense_crf_labels

    data = Path(os.environ.get("HISTO_WSSS_DATA", "../shared/data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a stage-one run folder")
    ap.add_argument("--slide", default=str(data / "wsi-cmu-small-region" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--preset", default="wsss4luad")
    ap.add_argument("--max-side", type=int, default=ReviewSettings().max_side)
    ap.add_argument("--full", action="store_true", help="also run the CRF over every tile (slow)")
    args = ap.parse_args(argv)
    classes = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "p.wsss", classes, patch_size=128)
        sid = project.add_slide(args.slide)
        settings = ReviewSettings(device="cpu", max_side=args.max_side)
        plan = plan_slide_cams(project, sid, settings.tile, settings.max_side)
        canvas = new_canvas(project, sid, plan, settings.rule, "crf")
        t0 = time.perf_counter()
        gating = 0.5
        for ev in compute_slide_cams(project, sid, args.run, settings, save=False, plan=plan):
            if isinstance(ev, CamTile):
                canvas.put(ev.ty, ev.tx, ev.cams, ev.probs, ev.rgb, ev.box, logits=ev.logits)
            if ev.kind == "done":
                gating = ev.metrics["gating"]
        cam_s = time.perf_counter() - t0
        h, w = canvas.shape
        tissue = ~outside_canvas(canvas, None)
        print(f"slide {Path(args.slide).name}: canvas {w}x{h} px at {canvas.downsample:.2f}x "
              f"({len(plan.tiles)} CAM tiles, tissue {tissue.mean():.0%} of it); CAM job {cam_s:.1f} s")
        plain = pseudo_from_canvas(canvas, classes, 0.2, gating, None, refined=False)
        t0 = time.perf_counter()
        labels = refined_labels(canvas, classes, gating)
        crf_s = time.perf_counter() - t0
        assert labels is not None, "no CRF: is pydensecrf installed?"
        refined = pseudo_from_canvas(canvas, classes, 0.2, gating, None)
        allowed = _gates(canvas, classes, gating)[0]
        changed = (refined != plain)[tissue].mean()
        print(f"CRF as the Review runs it (2048-px tiles, 256-px overlap, single-class tiles "
              f"skipped): {crf_s:.1f} s; classes allowed {int(allowed.sum())}; it changes {changed:.1%} of the tissue pixels")
        if args.full:
            params = CRFParams().scaled(canvas.work_downsample / canvas.downsample)
            t0 = time.perf_counter()
            full = dense_crf_labels(canvas.logits, canvas.rgb, params, allowed=allowed)
            full_s = time.perf_counter() - t0
            print(f"CRF over every tile: {full_s:.1f} s ({full_s / max(crf_s, 1e-9):.1f}x); "
                  f"disagrees with the skipping CRF on {(full != labels)[tissue].mean():.2%} of the tissue pixels")
        np.asarray(labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
