"""core.slides.slide: real Aperio SVS and pyramidal TIFF, generated TIFF/OME-TIFF/PNG, damaged files."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.slides import slide as slide_mod
from napari_histo_wsss.core.slides.slide import BUILT_LEVEL_MIN_SIDE, open_slide


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB pattern (JPEG-friendly) with some noise: distinct everywhere, so any
    misplaced read shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], axis=-1)
    return np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


def _write_pyramid(path, base: np.ndarray, levels: int = 3, mpp: float | None = 0.25, ome: bool = False, compression=None) -> None:
    """A tiled pyramidal TIFF with SubIFDs (the OME/QuPath layout) written with tifffile."""
    opts = dict(tile=(64, 64), photometric="rgb", compression=compression)
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    md = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if (ome and mpp) else ({"axes": "YXS"} if ome else None)
    with tifffile.TiffWriter(path, ome=ome) as tw:
        tw.write(base, subifds=levels - 1, metadata=md, **res, **opts)
        img = base
        for i in range(1, levels):
            img = img[::2, ::2]
            r = {"resolution": (1e4 / (mpp * 2**i), 1e4 / (mpp * 2**i)), "resolutionunit": "CENTIMETER"} if mpp else {}
            tw.write(img, subfiletype=1, metadata=None, **r, **opts)


# -- the real slides -------------------------------------------------------------------------------
def test_real_svs_metadata_and_built_levels(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert s.format == "aperio" and s.backend == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.objective_power == 20
        assert s.native_levels == 1
        # coarser levels are built until the smaller side is at most BUILT_LEVEL_MIN_SIDE
        assert s.level_downsamples == [1.0, 2.0, 4.0, 8.0]
        assert s.level_dimensions[1:] == [(1110, 1483), (555, 741), (277, 370)]
        assert min(s.level_dimensions[-1]) <= BUILT_LEVEL_MIN_SIDE < min(s.level_dimensions[-2])
        assert not s.is_built_level(0) and s.is_built_level(3)
        assert "aperio.AppMag" in s.properties


def test_real_svs_levels_are_lazy_and_consistent(cmu_svs):
    with open_slide(cmu_svs) as s:
        pyr = s.pyramid()
        assert all(isinstance(a, da.Array) and a.dtype == np.uint8 for a in pyr)
        assert [a.shape for a in pyr] == [(h, w, 3) for w, h in s.level_dimensions]
        # level_array slices and read_region agree, with level-0 locations
        region = s.read_region((1000, 1800), 0, (200, 100))
        assert region.shape == (100, 200, 3)
        np.testing.assert_array_equal(region, pyr[0][1800:1900, 1000:1200].compute())
        lv2 = s.read_region((400, 800), 2, (50, 40))
        np.testing.assert_array_equal(lv2, pyr[2][200:240, 100:150].compute())
        # a built level is the rounded 2x2 box mean of the level above (here: of level 0)
        block = s.read_region((0, 0), 0, (64, 64)).astype(np.uint32)
        want = ((block.reshape(32, 2, 32, 2, 3).sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)
        np.testing.assert_array_equal(s.read_region((0, 0), 1, (32, 32)), want)
        # H&E, not blank: the tissue region has colour
        assert region.std() > 10


def test_reads_outside_the_slide_are_white(cmu_svs):
    with open_slide(cmu_svs) as s:
        w, h = s.dimensions
        r = s.read_region((w - 10, h - 20), 0, (30, 40))
        assert (r[20:, :] == 255).all() and (r[:, 10:] == 255).all()
        np.testing.assert_array_equal(r[:20, :10], s.read_region((w - 10, h - 20), 0, (10, 20)))
        neg = s.read_region((-5, -5), 0, (10, 10))
        assert (neg[:5] == 255).all() and (neg[:, :5] == 255).all()


def test_read_scaled_and_thumbnail(cmu_svs):
    with open_slide(cmu_svs) as s:
        patch = s.read_scaled((800, 1200), (449, 449), (224, 224))
        assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
        # an exact factor-2 box comes from level 1: the 2x2 means of level 0
        half = s.read_scaled((800, 1200), (448, 448), (224, 224)).astype(np.uint32)
        full = s.read_region((800, 1200), 0, (448, 448)).astype(np.uint32)
        np.testing.assert_array_equal(half, (full.reshape(224, 2, 224, 2, 3).sum(axis=(1, 3)) + 2) // 4)
        # the 449 -> 224 patch is the same tissue (differs by at most a sub-pixel resampling shift)
        grey_p, grey_h = patch.mean(axis=2).ravel(), half.mean(axis=2).ravel()
        assert np.corrcoef(grey_p, grey_h)[0, 1] > 0.9
        enlarged = s.read_scaled((800, 1200), (100, 100), (200, 200))
        assert enlarged.shape == (200, 200, 3)
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(3.9) == 1
        assert s.best_level_for_downsample(100) == s.level_count - 1
        th = s.thumbnail(512)
        assert max(th.shape[:2]) == 512 and th.shape[0] / th.shape[1] == pytest.approx(2967 / 2220, rel=0.01)


def test_real_pyramid_tiff_matches_svs(cmu_pyramid, cmu_svs):
    with open_slide(cmu_pyramid) as t, open_slide(cmu_svs) as s:
        assert t.format == "generic-tiff" and t.native_levels == 4
        assert t.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741), (277, 370)]
        assert t.level_downsamples[3] == pytest.approx(8.0, rel=0.01)
        assert t.mpp == pytest.approx(0.499, abs=1e-3)  # from XResolution in pixels/cm
        a = t.read_region((500, 700), 0, (256, 256)).astype(int)
        b = s.read_region((500, 700), 0, (256, 256)).astype(int)
        assert np.abs(a - b).mean() < 6  # JPEG re-encoding of the same pixels (README: 2.9)
        ta, tb = t.thumbnail(256).astype(float), s.thumbnail(256).astype(float)
        assert ta.shape == tb.shape
        assert np.corrcoef(ta.mean(axis=2).ravel(), tb.mean(axis=2).ravel())[0, 1] > 0.95


# -- generated files --------------------------------------------------------------------------------
def test_generated_pyramidal_tiff(tmp_path):
    base = _texture(600, 800)
    path = tmp_path / "pyr.tif"
    _write_pyramid(path, base, levels=3, mpp=0.25)
    with open_slide(path) as s:
        assert s.format == "generic-tiff" and s.native_levels == 3
        assert s.level_dimensions[:3] == [(800, 600), (400, 300), (200, 150)]
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (800, 600)), base)
        np.testing.assert_array_equal(s.read_region((100, 60), 1, (40, 30)), base[::2, ::2][30:60, 50:90])
        np.testing.assert_array_equal(np.asarray(s.level_array(2)), base[::4, ::4])


def test_generated_ome_tiff(tmp_path):
    base = _texture(300, 520, seed=1)
    path = tmp_path / "img.ome.tif"
    _write_pyramid(path, base, levels=2, mpp=0.5, ome=True)
    with open_slide(path) as s:
        assert s.format == "ome-tiff"
        assert s.mpp == pytest.approx(0.5)
        assert s.native_levels == 2
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (64, 32)), base[20:52, 10:74])


def test_tiff_without_resolution_has_unknown_mpp(tmp_path):
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, _texture(100, 120), photometric="rgb")
    with open_slide(path) as s:
        assert s.mpp is None and s.native_levels == 1


def test_single_level_slide_built_levels_read_in_blocks(tmp_path, monkeypatch):
    """Built levels read their source in bounded blocks; block seams must not show."""
    base = _texture(1200, 1100, seed=2)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, base, photometric="rgb", tile=(128, 128))
    monkeypatch.setattr(slide_mod, "BUILT_READ_SIDE", 96)  # forces many blocks per read
    with open_slide(path) as s:
        assert s.native_levels == 1 and s.level_count == 3  # 1100 -> 550 -> 275
        f = 4
        want = ((base[:1200, :1100].astype(np.uint32).reshape(300, f, 275, f, 3).sum(axis=(1, 3)) + 8) // 16).astype(np.uint8)
        np.testing.assert_array_equal(s.read_region((0, 0), 2, (275, 300)), want)


def test_png_rgb_rgba_and_grey(tmp_path):
    rgb = _texture(90, 130, seed=3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba).save(tmp_path / "b.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "c.png")
    with open_slide(tmp_path / "a.png") as s:
        assert (s.format, s.backend, s.dimensions, s.samples_per_pixel) == ("image", "pillow", (130, 90), 3)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (130, 90)), rgb)
    with open_slide(tmp_path / "b.png") as s:
        r = s.read_region((0, 0), 0, (130, 90))
        assert (r[:10, :10] == 255).all()
        np.testing.assert_array_equal(r[10:, 10:], rgb[10:, 10:])
    with open_slide(tmp_path / "c.png") as s:
        assert s.samples_per_pixel == 1
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (130, 90))[..., 2], rgb[..., 0])


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_truncated_svs_is_a_slide_error_naming_the_file(cmu_svs, tmp_path, keep):
    data = cmu_svs.read_bytes()
    bad = tmp_path / "truncated.svs"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError, match="truncated.svs.*(truncated|damaged)"):
        open_slide(bad)


def test_truncated_tile_data_is_caught_at_open(tmp_path):
    path = tmp_path / "pyr.tif"
    _write_pyramid(path, _texture(512, 512, seed=4), levels=2, mpp=0.5, compression="zlib")
    data = path.read_bytes()
    # overwrite the last tile of level 0 with garbage: its decode must fail at open, not later
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[-1], page.databytecounts[-1]
    bad = tmp_path / "broken.tif"
    bad.write_bytes(data[:off] + os.urandom(n) + data[off + n :])
    with pytest.raises(SlideError, match="broken.tif"):
        open_slide(bad)


def test_empty_random_missing_and_folder(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match=r"empty\.svs.*empty"):
        open_slide(empty)
    rnd = tmp_path / "noise.svs"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError, match=r"noise\.svs.*not a recognised"):
        open_slide(rnd)
    with pytest.raises(SlideError, match=r"missing\.svs.*no such file"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)


def test_closed_slide_raises_slide_error(cmu_svs, cmu_pyramid):
    for path in (cmu_svs, cmu_pyramid):
        s = open_slide(path)
        arr = s.level_array(0)
        s.close()
        assert s.closed
        with pytest.raises(SlideError, match="closed"):
            s.read_region((0, 0), 0, (8, 8))
        with pytest.raises(SlideError, match=path.name):
            arr[:8, :8].compute()


def test_bad_level_and_size(cmu_svs):
    with open_slide(cmu_svs) as s:
        with pytest.raises(SlideError, match="level 9 does not exist"):
            s.read_region((0, 0), 9, (4, 4))
        with pytest.raises(SlideError, match="non-negative"):
            s.read_region((0, 0), 0, (-1, 4))
