"""Live labelling in a real viewer: does the GUI keep running while the feature cache builds and the
live head refits, and how long from a label to the updated live layer? (issue 13)

On the bundled CMU-1-Small-Region slide with the plugin's panels docked (``histo-wsss gui``), a
project at ``--mpp`` um/px with ``--patch`` px patches:

* ``feature build``: the Labelling panel's *Live CAMs* switched on: the slide's feature cache built
  in the background job; a probe timer on the GUI thread records the longest gap (stall);
* ``label -> live layer``: ``--labels`` single-patch edits made as the number keys make them
  (``PatchGridOverlay.toggle_class``), one after the other: time from the edit until the live
  pseudo-mask layer holds the refitted result (median, max), and the longest GUI stall meanwhile.

    xvfb-run -a -s "-screen 0 1600x1200x24" python bench/bench_live_gui.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gui_stall import _probe  # noqa: E402  (the same stall probe as the GUI stall bench)

DATA = Path(os.environ.get("HISTO_WSSS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--tick", type=int, default=10, help="probe timer interval, ms")
    args = ap.parse_args(argv)

    import napari

    from napari_histo_wsss.cli.gui import open_gui

    viewer, w = open_gui(viewer=napari.Viewer(show=True))
    proj = w["Project"]
    proj.classes.preset.setCurrentText("wsss4luad")
    proj.patch_size.setValue(args.patch)
    proj.target_mpp.setValue(args.mpp)
    proj.min_tissue.setValue(0.5)
    root = Path(tempfile.mkdtemp()) / "p"
    proj.create_project(root)
    proj.add_slide_file(DATA / "wsi-cmu-small-region" / "CMU-1-Small-Region.svs")
    proj.detect_grid()
    lab = w["Patch labelling"]
    _probe(args.tick, lambda: lab.overlay is not None, 300)
    live, ov = lab.live, lab.overlay
    rows = [("idle (floor of this machine)", "3 s", _probe(args.tick, lambda: False, 3.0))]

    t0 = time.perf_counter()
    live.enable_box.setChecked(True)
    st = _probe(args.tick, lambda: live.ready and live._generation > 0, 600)
    rows.append(("feature build (background job)", f"{time.perf_counter() - t0:.1f} s", st))

    rng = np.random.default_rng(0)
    order = rng.permutation(len(ov.grid))[: args.labels]
    times, stalls = [], []
    for j, i in enumerate(order):
        before = live._generation
        t1 = time.perf_counter()
        ov.select(np.array([i]))
        ov.toggle_class(j % 2)  # alternate tumour / stroma
        s = _probe(args.tick, lambda b=before, j=j: live._generation > b and live.head is not None
                   and live.head.n_labels == j + 1, 60)
        times.append(time.perf_counter() - t1)
        stalls.append(s["max_ms"])
    rows.append((f"label -> live layer ({args.labels} edits)",
                 f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms",
                 {"max_ms": max(stalls)}))
    g = ov.grid
    print(f"slide CMU-1-Small-Region at {args.mpp} um/px: {len(g)} patches of {args.patch} px, "
          f"feature map {live.features.shape[0]} x {live.features.shape[1]} cells")
    print("| step | time | longest GUI stall |")
    print("|---|---|---|")
    for name, t, s in rows:
        print(f"| {name} | {t} | {s['max_ms']:.0f} ms |")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
