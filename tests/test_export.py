"""Exports: QuPath GeoJSON of real WSSS4LUAD masks and of a real slide prediction reads back and
rasterises to the same mask; OME-Zarr labels with the colour table; tiled pyramidal palette
TIFF; palette PNG; npe2 writers; patch-label CSV; clear errors for bad input."""

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import read_index_mask
from napari_histo_wsss.core.io.export import (
    UNLABELLED,
    ExportError,
    export_geojson,
    export_ome_zarr,
    export_palette_png,
    export_patch_labels_csv,
    export_tiff,
    mask_to_polygons,
    open_label_pyramid,
    rasterize_geojson,
    read_geojson,
)

CLASSES = get_preset("wsss4luad")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("name", ["00", "03", "12", "21"])
def test_geojson_of_real_mask_rasterises_back(wsss4luad_dir, tmp_path, name):
    mask = read_index_mask(wsss4luad_dir / "val" / "mask" / f"{name}.png", CLASSES)
    out = tmp_path / f"{name}.geojson"
    export_geojson(mask, out, CLASSES, downsample=4.0, origin=(1000, 2000), include_background=True, tolerance=0)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    for f in doc["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in CLASSES.names + ["background"]
        assert len(props["classification"]["color"]) == 3
        assert f["geometry"]["type"] == "MultiPolygon"  # one per class
        for ring in (r for poly in f["geometry"]["coordinates"] for r in poly):
            assert ring[0] == ring[-1] and len(ring) >= 5
            xs = [p[0] for p in ring]
            assert min(xs) >= 1000 and max(xs) <= 1000 + 4 * mask.shape[1]
    back = rasterize_geojson(read_geojson(out), mask.shape, CLASSES, downsample=4.0, origin=(1000, 2000))
    for k in range(CLASSES.background_index + 1):
        if (mask == k).any():
            assert iou(back == k, mask == k) > 0.99
    assert (back == mask).all()  # pixel-edge polygons are exact


def test_polygons_keep_holes_and_diagonal_neighbours_apart():
    m = np.zeros((12, 12), dtype=bool)
    m[1:9, 1:9] = True
    m[3:6, 3:6] = False          # a hole
    m[9, 9] = m[10, 10] = True   # touch only at a corner: two separate regions
    polys = mask_to_polygons(m)
    assert sorted(len(p) for p in polys) == [1, 1, 2]
    big = max(polys, key=lambda p: len(p))
    assert big[0].shape[1] == 2 and np.array_equal(big[0][0], big[0][-1])
    assert len(big[0]) == 5 and len(big[1]) == 5  # rectangles: 4 corners + closing point


def test_geojson_of_real_slide_prediction_round_trip(cmu_svs, tmp_path):
    """A real prediction over the CMU slide (tissue tiles, per-pixel colour model) -> GeoJSON
    in level-0 coordinates -> rasterised at the pyramid level it came from."""
    from napari_histo_wsss.core.slides.slide import open_slide
    from napari_histo_wsss.core.stage2.infer import predict_slide

    w = torch.tensor([[2.0, -1.0, 0.5], [-1.5, 2.0, 0.0], [0.3, 0.2, -2.0]])
    fn = lambda x: torch.softmax(torch.einsum("kc,bchw->bkhw", w, x) * 2, dim=1)  # noqa: E731
    with open_slide(cmu_svs) as slide:
        list(predict_slide(slide, fn, tmp_path / "p.ome.zarr", tile=256, overlap=32, classes=CLASSES, downsample=4.0))
    pyr = open_label_pyramid(tmp_path / "p.ome.zarr")
    lab = pyr.read_index(1)
    ds = pyr.level_downsamples[1]
    for tolerance, floor in ((0.0, 0.99), (None, 0.95)):  # exact pixel edges, default simplification
        kw = {} if tolerance is None else {"tolerance": tolerance}
        export_geojson(lab, tmp_path / "p.geojson", CLASSES, downsample=ds, **kw)
        feats = read_geojson(tmp_path / "p.geojson")
        assert {f.name for f in feats} == {CLASSES.names[k] for k in np.unique(lab).tolist() if k < CLASSES.num_classes}
        assert len(feats) == len({f.name for f in feats})  # one feature per class
        assert max(r[:, 0].max() for f in feats for p in f.polygons for r in p) <= 2220 + ds
        back = rasterize_geojson(feats, lab.shape, CLASSES, downsample=ds, fill=CLASSES.background_index)
        for k in range(CLASSES.num_classes):
            if (lab == k).any():
                assert iou(back == k, lab == k) > floor


def test_rasterize_rejects_unknown_classes_and_bad_files(tmp_path):
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
               "properties": {"classification": {"name": "fat", "color": [1, 2, 3]}}}
    (tmp_path / "a.geojson").write_text(json.dumps([feature]))  # QuPath also writes bare lists
    with pytest.raises(ExportError, match="fat"):
        rasterize_geojson(tmp_path / "a.geojson", (8, 8), CLASSES)
    (tmp_path / "b.geojson").write_text("{not json")
    with pytest.raises(ExportError, match="b.geojson"):
        read_geojson(tmp_path / "b.geojson")
    with pytest.raises(ExportError, match="not class indices"):
        export_geojson(np.full((4, 4), 7, np.uint8), tmp_path / "c.geojson", CLASSES)


def test_ome_zarr_labels_metadata_and_levels(wsss4luad_dir, tmp_path):
    mask = read_index_mask(wsss4luad_dir / "val" / "mask" / "03.png", CLASSES)
    mask = np.tile(mask, (3, 3))
    mask[:5, :5] = UNLABELLED
    export_ome_zarr(mask, tmp_path / "m.ome.zarr", CLASSES, downsample=2.0, mpp=0.5, chunk=256)
    attrs = json.loads((tmp_path / "m.ome.zarr" / "labels" / "tissue" / ".zattrs").read_text())
    assert json.loads((tmp_path / "m.ome.zarr" / "labels" / ".zattrs").read_text())["labels"] == ["tissue"]
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"][0] for d in ms["datasets"]]
    assert scales == [1.0 * 2**k for k in range(len(scales))] and len(scales) >= 3
    colors = {c["label-value"]: c["rgba"] for c in attrs["image-label"]["colors"]}
    assert colors[1] == [0, 64, 128, 255] and colors[CLASSES.background_index + 1] == [255, 255, 255, 255]
    assert attrs["image-label"]["source"] == {"image": "../../"}
    pyr = open_label_pyramid(tmp_path / "m.ome.zarr")
    assert (pyr.read_index() == mask).all()
    assert int(pyr.level(0)[0, 0]) == 0  # unlabelled is 0 on disk
    assert (pyr.read_index(2) == mask[::4, ::4]).all()
    with pytest.raises(ExportError, match="already exists"):
        export_ome_zarr(mask, tmp_path / "m.ome.zarr", CLASSES)


def test_tiled_pyramidal_palette_tiff(wsss4luad_dir, tmp_path):
    mask = np.tile(read_index_mask(wsss4luad_dir / "val" / "mask" / "00.png", CLASSES), (4, 5))
    export_tiff(mask, tmp_path / "m.tif", CLASSES, downsample=2.0, mpp=0.25, tile=256)
    with tifffile.TiffFile(tmp_path / "m.tif") as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert (page.colormap[:, 0] // 257).tolist() == [0, 64, 128]
        levels = tf.series[0].levels
        assert len(levels) >= 2
        assert (levels[0].asarray() == mask).all() and (levels[1].asarray() == mask[::2, ::2]).all()
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.5, rel=1e-3)  # pixels per cm at 0.5 um/px


def test_palette_png_round_trip(wsss4luad_dir, tmp_path):
    mask = read_index_mask(wsss4luad_dir / "val" / "mask" / "05.png", CLASSES)
    export_palette_png(mask, tmp_path / "05.png", CLASSES)
    im = Image.open(tmp_path / "05.png")
    assert im.mode == "P" and (np.asarray(im) == mask).all()
    assert im.getpalette()[:6] == [0, 64, 128, 64, 128, 0]


def test_npe2_writers(tmp_path):
    from napari_histo_wsss.writer import (
        write_labels_geojson,
        write_labels_ome_zarr,
        write_labels_png,
        write_labels_tiff,
    )

    values = np.zeros((40, 50), dtype=np.uint8)  # plugin layer: class index + 1, 0 = unlabelled
    values[5:15, 5:25] = 1
    values[20:35, 10:40] = 3
    meta = {"metadata": {"histo_wsss": "prediction", "classes": CLASSES.to_dict()}, "scale": (8.0, 8.0),
            "translate": (100.0, 50.0), "name": "prediction"}
    assert write_labels_geojson(str(tmp_path / "a.geojson"), values, meta) == [str(tmp_path / "a.geojson")]
    feats = read_geojson(tmp_path / "a.geojson")
    assert sorted(f.name for f in feats) == ["normal", "tumor"]
    tumor = next(f for f in feats if f.name == "tumor")
    assert tumor.polygons[0][0][:, 0].min() == 50 + 5 * 8 and tumor.polygons[0][0][:, 1].min() == 100 + 5 * 8
    back = rasterize_geojson(feats, values.shape, CLASSES, downsample=8.0, origin=(50, 100))
    assert ((back.astype(np.int32) + 1) % 256 == values).all()
    write_labels_png(str(tmp_path / "a.png"), values, meta)
    assert (np.asarray(Image.open(tmp_path / "a.png")) == (values.astype(np.int32) - 1) % 256).all()
    write_labels_tiff(str(tmp_path / "a.tif"), [values, values[::2, ::2]], meta)
    assert (tifffile.imread(tmp_path / "a.tif")[5, 5]) == 0
    write_labels_ome_zarr(str(tmp_path / "a.ome.zarr"), values, meta)
    assert (open_label_pyramid(tmp_path / "a.ome.zarr").level(0)[...] == values).all()


def test_patch_labels_csv(cmu_svs, tmp_path):
    from napari_histo_wsss.core.data.project import Project

    project = Project.create(tmp_path / "p.wsss", CLASSES)
    sid = project.add_slide(cmu_svs)
    project.set_patch_labels(sid, [0, 448], [224, 224], 448, np.array([[1, 0, 1], [0, 1, 0]]), who="test")
    export_patch_labels_csv(project.patch_labels(), tmp_path / "labels.csv")
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["x"] for r in rows] == ["0", "448"] and rows[0]["tumor"] == "1" and rows[0]["normal"] == "1"
    assert rows[1]["stroma"] == "1" and rows[0]["who"] == "test" and rows[0]["slide_id"] == sid
