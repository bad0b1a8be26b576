"""The npe2 reader and sample data: directly, and through a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import hashlib

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.reader import get_reader
from napari_histo_wsss.sample_data import cmu_small_region, sample_slide_path

PLUGIN = "napari-histo-wsss"


def _read(path):
    reader = get_reader(str(path))
    assert callable(reader), f"reader declined {path}"
    return reader(str(path))


# -- reader function ---------------------------------------------------------------------------------
def test_svs_layer_is_lazy_multiscale_in_micrometres(cmu_svs):
    [(data, kwargs, kind)] = _read(cmu_svs)
    assert kind == "image"
    assert isinstance(data, list) and len(data) == 4
    assert all(isinstance(a, da.Array) for a in data)  # never a decoded numpy copy
    assert [a.shape for a in data] == [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3), (370, 277, 3)]
    assert kwargs["rgb"] is True and kwargs["multiscale"] is True and kwargs["contrast_limits"] == (0, 255)
    assert kwargs["scale"] == pytest.approx((0.499, 0.499), abs=1e-3)
    md = kwargs["metadata"]
    assert md["path"] == str(cmu_svs) and md["levels"] == 4 and md["native_levels"] == 1
    assert md["level_downsamples"] == [1.0, 2.0, 4.0, 8.0]
    assert md["mpp"] == pytest.approx(0.499, abs=1e-3) and md["objective_power"] == 20
    # the lazy levels hold the slide's pixels: coarsest level is mostly bright glass with stained tissue
    small = np.asarray(data[-1])
    assert small.dtype == np.uint8 and small.mean() > 150 and small.std() > 20


def test_pyramid_tiff_layer(cmu_pyramid):
    [(data, kwargs, _)] = _read(cmu_pyramid)
    assert len(data) == 4 and kwargs["metadata"]["native_levels"] == 4
    assert kwargs["metadata"]["format"] == "generic-tiff"
    assert kwargs["scale"] == pytest.approx((0.499, 0.499), abs=1e-3)
    np.testing.assert_array_equal(np.asarray(data[3][:50, :60]), tifffile.imread(cmu_pyramid, level=3)[:50, :60])


def test_png_and_generated_ome_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "patch.png")
    [(data, kwargs, _)] = _read(tmp_path / "patch.png")
    assert kwargs["multiscale"] is False and kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs
    np.testing.assert_array_equal(np.asarray(data), rgb)
    big = np.random.default_rng(1).integers(0, 256, (1100, 700, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "x.ome.tif", big, tile=(256, 256), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    [(data, kwargs, _)] = _read(tmp_path / "x.ome.tif")
    assert kwargs["metadata"]["format"] == "ome-tiff" and kwargs["scale"] == (0.25, 0.25)
    assert [a.shape[:2] for a in data] == [(1100, 700), (550, 350)]  # one level built lazily
    np.testing.assert_array_equal(np.asarray(data[0]), big)


def test_declines_what_it_does_not_handle(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "missing.svs")) is None
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20] = 2
    Image.fromarray(mask).save(tmp_path / "mask.png")  # a label mask: left to other readers
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    assert get_reader(str(tmp_path / "mask.png")) is None
    assert get_reader(str(tmp_path / "mask.tif")) is None
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "empty")) is None


@pytest.mark.parametrize("kind", ["truncated", "zero", "random"])
def test_bad_slides_raise_slide_error_naming_the_file(cmu_svs, tmp_path, kind):
    bad = tmp_path / f"{kind}.svs"
    if kind == "truncated":
        bad.write_bytes(cmu_svs.read_bytes()[:600_000])
    elif kind == "random":
        bad.write_bytes(np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    else:
        bad.write_bytes(b"")
    reader = get_reader(str(bad))
    assert callable(reader)  # claimed by extension, so the user sees this plugin's message
    with pytest.raises(SlideError, match=f"{kind}.svs"):
        reader(str(bad))


def test_patch_folder_opens_as_one_contact_sheet(tmp_path):
    """A folder of patches (any sizes) is one lazy 2-D layer: its images side by side on white."""
    rng = np.random.default_rng(4)
    patches = [rng.integers(0, 200, (32 + 16 * i, 48, 3), dtype=np.uint8) for i in range(3)]
    for i, p in enumerate(patches):
        Image.fromarray(p).save(tmp_path / f"p{i}-[1, 0, 1].png")
    (tmp_path / ".p9.png.tmp").write_bytes(b"partial")  # temp files are skipped
    [(data, kwargs, kind)] = _read(tmp_path)
    assert kind == "image" and kwargs["rgb"]
    sheet = np.asarray(data[0] if isinstance(data, list) else data)
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    md = kwargs["metadata"]
    assert md["files"] == [f"p{i}-[1, 0, 1].png" for i in range(3)] and md["format"] == "patch folder"
    from napari_histo_wsss.core.slides.slide import open_slide

    with open_slide(tmp_path) as slide:
        for r, p in zip(slide.regions, patches):
            np.testing.assert_array_equal(sheet[r.y:r.y + r.height, r.x:r.x + r.width], p)
        inside = np.zeros(sheet.shape[:2], bool)
        for r in slide.regions:
            inside[r.y:r.y + r.height, r.x:r.x + r.width] = True
    assert (sheet[~inside] == 255).all()  # white between the images
    (tmp_path / "z-bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(SlideError, match="z-bad.png"):
        _read(tmp_path)


def test_sample_data_is_the_bundled_real_slide():
    path = sample_slide_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    [(data, kwargs, kind)] = cmu_small_region()
    assert kind == "image" and len(data) == 4 and kwargs["metadata"]["format"] == "aperio"


# -- through napari ----------------------------------------------------------------------------------
@pytest.mark.gui
def test_viewer_open_svs_and_pyramid(make_napari_viewer, cmu_svs, cmu_pyramid):
    viewer = make_napari_viewer(show=True)  # a hidden canvas renders black
    for path, native in ((cmu_svs, 1), (cmu_pyramid, 4)):
        layers = viewer.open(str(path), plugin=PLUGIN)
        assert len(layers) == 1
        layer = layers[0]
        assert layer.multiscale and layer.rgb and len(layer.data) == 4
        assert all(isinstance(a, da.Array) for a in layer.data)
        assert tuple(layer.scale) == pytest.approx((0.499, 0.499), abs=1e-3)
        assert layer.metadata["native_levels"] == native and layer.metadata["path"] == str(path)
        assert layer.source.reader_plugin == PLUGIN
    # both share the micrometre world: same extent
    a, b = viewer.layers
    np.testing.assert_allclose(a.extent.world, b.extent.world, rtol=1e-3)
    # napari draws from a coarser pyramid level at this zoom, and the canvas shows stained
    # (saturated) tissue, i.e. the lazy levels really render
    viewer.reset_view()
    assert a.data_level > 0
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(int)
    assert (rgb.max(axis=2) - rgb.min(axis=2) > 40).mean() > 0.05


@pytest.mark.gui
def test_viewer_sample_data_and_bad_file(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "cmu-small-region")
    assert len(layers) == 1 and layers[0].multiscale and layers[0].metadata["objective_power"] == 20
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(Exception, match="broken.svs"):
        viewer.open(str(bad), plugin=PLUGIN)
