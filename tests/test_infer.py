"""Whole-slide prediction: tiling + cosine blending equal whole-image prediction for a pointwise
model, tissue-only tiles, the incomplete marker (cancel, full disk), memory bounded by tiles
rather than slide size, image folders -> palette PNGs."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import to_tensor
from napari_histo_wsss.core.errors import HistoWSSSError, SlideError
from napari_histo_wsss.core.io.export import ExportError, open_label_pyramid
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.stage2.infer import cosine_window, predict_folder, predict_slide, segmenter_predict_fn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from generated_slide import GeneratedSlide  # noqa: E402

CLASSES = get_preset("wsss4luad")
_W = torch.tensor([[2.0, -1.0, 0.5], [-1.5, 2.0, 0.0], [0.3, 0.2, -2.0]])


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model': softmax of a colour mapping (no spatial context)."""
    return torch.softmax(torch.einsum("kc,bchw->bkhw", _W, x) * 2, dim=1)


def test_cosine_window_is_a_partition_of_unity():
    w = cosine_window(64, 16)
    overlap = w[-16:] + w[:16]
    assert np.allclose(overlap, 1.0, atol=1e-6)
    assert w.min() > 0 and w[16:-16].min() == 1.0
    with pytest.raises(HistoWSSSError):
        cosine_window(64, 40)


def test_tiled_blended_prediction_equals_whole_image(cmu_svs, tmp_path):
    with open_slide(cmu_svs) as slide:
        whole = pointwise(to_tensor(slide.read_region((0, 0), 0, slide.dimensions))[None])[0].numpy()
        ev = list(predict_slide(slide, pointwise, tmp_path / "maps.ome.zarr", tile=256, overlap=48, batch_size=5,
                                classes=CLASSES, tissue=False, output="maps"))
        assert ev[0].kind == "start" and ev[-1].kind == "done"
        maps = open_label_pyramid(tmp_path / "maps.ome.zarr").level(0)[...].astype(np.float32)
        assert maps.shape == whole.shape
        assert np.abs(maps - whole).max() < 2e-3  # float16 storage
        ev = list(predict_slide(slide, pointwise, tmp_path / "lab.ome.zarr", tile=256, overlap=48, batch_size=5,
                                classes=CLASSES, tissue=False))
    pyr = open_label_pyramid(tmp_path / "lab.ome.zarr")
    lab = pyr.read_index()
    assert (lab == whole.argmax(0)).mean() > 0.9999
    assert [lv.shape for lv in pyr.levels][1] == tuple((s + 1) // 2 for s in lab.shape)
    assert (pyr.read_index(1) == lab[::2, ::2]).all()  # nearest-neighbour pyramid


def test_blending_is_exact_next_to_skipped_glass_tiles(tmp_path):
    """With tissue-only tiles, every pixel inside a predicted tile still gets the exact blend
    (the carried margins of skipped neighbours are handled), and the rest is left unwritten."""
    from napari_histo_wsss.core.stage2.infer import plan_tiles

    slide = GeneratedSlide((1500, 1100), [(300, 300, 150), (1000, 700, 260), (1400, 150, 60)])
    tissue = slide.tissue_mask(8)
    list(predict_slide(slide, pointwise, tmp_path / "m.ome.zarr", tile=128, overlap=32, batch_size=3,
                       classes=CLASSES, tissue=tissue, output="maps"))
    plan = plan_tiles(slide, 128, 32, 1.0, tissue)
    assert 0 < plan.active.sum() < plan.active.size
    covered = np.zeros((1100, 1500), bool)
    for r, c in zip(*np.nonzero(plan.active)):
        covered[r * 96:r * 96 + 128, c * 96:c * 96 + 128] = True
    whole = pointwise(to_tensor(slide.read_region((0, 0), 0, (1500, 1100)))[None])[0].numpy()
    maps = open_label_pyramid(tmp_path / "m.ome.zarr").level(0)[...].astype(np.float32)
    assert np.abs(maps[:, covered] - whole[:, covered]).max() < 2e-3
    assert (maps[:, ~covered] == 0).all()


def test_tissue_only_tiles_and_working_resolution(cmu_svs, tmp_path):
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return pointwise(x)

    with open_slide(cmu_svs) as slide:
        ev = list(predict_slide(slide, counting, tmp_path / "p.ome.zarr", tile=128, overlap=16, batch_size=8,
                                classes=CLASSES, target_mpp=2 * slide.mpp))
    done = ev[-1]
    pyr = open_label_pyramid(tmp_path / "p.ome.zarr")
    assert pyr.downsample == pytest.approx(2.0)
    assert pyr.levels[0].shape == (1484, 1110)
    assert sum(calls) == done.metrics["tiles"] < pyr.meta["tiles_total"]  # glass tiles were skipped
    lab = pyr.read_index()
    assert (lab == CLASSES.background_index).any() and (lab < CLASSES.background_index).any()


def test_white_glass_is_background_with_a_segmenter(tmp_path):
    from napari_histo_wsss.core.models import Segmenter

    torch.manual_seed(0)
    model = Segmenter(CLASSES.num_classes, "efficientnet-lite0", weights="none")
    slide = GeneratedSlide((700, 500), [(300, 250, 180)])
    ev = list(predict_slide(slide, segmenter_predict_fn(model, CLASSES), tmp_path / "s.ome.zarr", tile=256, overlap=32,
                            classes=CLASSES, tissue=slide.tissue_mask(8)))
    lab = open_label_pyramid(tmp_path / "s.ome.zarr").read_index()
    assert ev[-1].kind == "done"
    assert lab[20, 20] == CLASSES.background_index and lab[250, 300] < CLASSES.background_index


def test_cancelled_prediction_stays_marked_incomplete(cmu_svs, tmp_path):
    out = tmp_path / "c.ome.zarr"
    n = {"calls": 0}

    def stop():
        n["calls"] += 1
        return n["calls"] > 2

    with open_slide(cmu_svs) as slide:
        ev = list(predict_slide(slide, pointwise, out, tile=256, overlap=32, batch_size=2, classes=CLASSES,
                                tissue=False, should_stop=stop))
    assert ev[-1].kind == "cancelled" and "incomplete" in ev[-1].message
    with pytest.raises(ExportError, match="incomplete"):
        open_label_pyramid(out)
    assert open_label_pyramid(out, require_complete=False).complete is False
    with open_slide(cmu_svs) as slide, pytest.raises(ExportError, match="already exists"):
        list(predict_slide(slide, pointwise, out, classes=CLASSES, tissue=False))


def test_full_disk_during_write_leaves_output_incomplete(cmu_svs, tmp_path, monkeypatch):
    import zarr.storage

    real_set = zarr.storage.LocalStore.set
    writes = {"n": 0}

    async def failing_set(self, key, value):
        if key.split("/")[-1].isdigit() or "/0/" in key:  # chunk writes, after the metadata
            writes["n"] += 1
            if writes["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    out = tmp_path / "full.ome.zarr"
    with open_slide(cmu_svs) as slide, pytest.raises(ExportError, match="disk is full") as info:
        list(predict_slide(slide, pointwise, out, tile=256, overlap=32, batch_size=4, classes=CLASSES, tissue=False))
    assert str(out) in str(info.value)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    meta = json.loads((out / ".zattrs").read_text())["histo_wsss"]
    assert meta["complete"] is False
    with pytest.raises(ExportError, match="incomplete"):
        open_label_pyramid(out)


def test_slide_without_tissue_is_a_clear_error(tmp_path):
    slide = GeneratedSlide((2000, 2000), [])
    with pytest.raises(SlideError, match="no tissue"):
        list(predict_slide(slide, pointwise, tmp_path / "x.ome.zarr", classes=CLASSES, tissue=slide.tissue_mask()))
    assert not (tmp_path / "x.ome.zarr").exists()


_MEMORY_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {bench!r})
from generated_slide import GeneratedSlide
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.stage2.infer import predict_slide
torch.set_num_threads(1)
side = int(sys.argv[1])
islands = [(1500, 1500, 700), (side - 1500, side - 1500, 700), (side // 2, 1500, 600)]
slide = GeneratedSlide((side, side), islands)
fn = lambda x: torch.softmax(x[:, [0, 1, 2, 0]] * 3, dim=1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ev = list(predict_slide(slide, fn, sys.argv[2], tile=512, overlap=64, batch_size=4,
                        classes=get_preset('wsss4luad'), tissue=slide.tissue_mask(64)))
assert ev[-1].kind == 'done', ev[-1]
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, ev[-1].metrics['tiles'])
"""


def test_memory_is_bounded_by_tiles_not_slide_size(tmp_path):
    """Peak memory for a generated 50k x 50k slide vs a 5k x 5k one with the same tissue."""
    script = _MEMORY_SCRIPT.format(bench=str(REPO / "bench"))
    peaks = {}
    for side in (5000, 50000):
        res = subprocess.run([sys.executable, "-c", script, str(side), str(tmp_path / f"m{side}.ome.zarr")],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        base, peak, tiles = (int(v) for v in res.stdout.split())
        peaks[side] = (peak - base) / 1024  # MiB above the imports
        assert tiles > 20
    assert peaks[50000] < peaks[5000] * 1.5 + 64, peaks
    assert (tmp_path / "m50000.ome.zarr" / "labels" / "tissue" / "0").is_dir()
    pyr = open_label_pyramid(tmp_path / "m50000.ome.zarr")
    assert pyr.levels[0].shape == (50000, 50000)
    assert pyr.read_index(0, (1400, 1400, 1600, 1600)).max() < CLASSES.background_index
    assert (pyr.read_index(0, (25000, 25000, 25100, 25100)) == CLASSES.background_index).all()


def test_predict_folder_writes_palette_pngs_with_the_same_names(wsss4luad_dir, tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    for name in ("00.png", "02.png", "05.png"):
        (src / name).write_bytes((wsss4luad_dir / "val" / "img" / name).read_bytes())
    ev = list(predict_folder(src, tmp_path / "out", pointwise, CLASSES, tile=128, overlap=16))
    assert ev[-1].kind == "done"
    for name in ("00.png", "02.png", "05.png"):
        out = Image.open(tmp_path / "out" / name)
        rgb = np.asarray(Image.open(src / name).convert("RGB"))
        assert out.mode == "P" and out.size == (rgb.shape[1], rgb.shape[0])
        expected = pointwise(to_tensor(rgb)[None])[0].argmax(0).numpy()
        assert (np.asarray(out) == expected).mean() > 0.999
