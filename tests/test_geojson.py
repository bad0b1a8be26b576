"""QuPath GeoJSON that opens cleanly: every geometry valid (OGC/JTS, as QuPath checks it), one
MultiPolygon feature per class by default (or one Polygon per region with ``split``), holes kept as
inner rings (or filled), outlines simplified by a stated tolerance that still rasterises back to a
real WSSS4LUAD ground-truth mask, the ring orientation of RFC 7946, and an empty mask refused with
one line and nothing written."""

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import shape as to_shape

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import read_index_mask
from napari_histo_wsss.core.io.export import (
    GEOJSON_TOLERANCE,
    UNLABELLED,
    ExportError,
    export_geojson,
    mask_to_geometry,
    rasterize_geojson,
    read_geojson,
)
from napari_histo_wsss.core.stage1.cams import save_pseudo_mask

CLASSES = get_preset("wsss4luad")
BG = CLASSES.background_index


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def signed_area(ring: list) -> float:
    r = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def check_qupath_doc(path, classes_present: set[str]) -> list[dict]:
    """The file as QuPath reads it: a FeatureCollection of annotation features with a class name
    and colour, Polygon/MultiPolygon geometry that shapely (GEOS, JTS's twin) calls valid, closed
    rings, exteriors counter-clockwise and holes clockwise in the written (x, y) (RFC 7946)."""
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    colours = {c.name: list(c.color) for c in [*CLASSES.classes, CLASSES.background]}
    for f in doc["features"]:
        assert f["type"] == "Feature" and f["properties"]["objectType"] == "annotation"
        cls = f["properties"]["classification"]
        assert cls["name"] in classes_present and cls["color"] == colours[cls["name"]]
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        g = to_shape(geom)
        assert shapely.is_valid(g), shapely.is_valid_reason(g)
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for poly in polys:
            for k, ring in enumerate(poly):
                assert ring[0] == ring[-1] and len(ring) >= 4
                assert all(isinstance(v, (int, float)) for p in ring for v in p)
                assert (signed_area(ring) > 0) == (k == 0)
    return doc["features"]


def test_real_mask_one_valid_multipolygon_per_class(wsss4luad_dir, tmp_path):
    mask = read_index_mask(wsss4luad_dir / "val" / "mask" / "09.png", CLASSES)  # all three classes
    out = tmp_path / "09.geojson"
    export_geojson(mask, out, CLASSES, downsample=4.0, origin=(1000, 2000), include_background=True)
    present = {CLASSES.names[k] if k < BG else CLASSES.background.name for k in np.unique(mask).tolist()}
    feats = check_qupath_doc(out, present)
    assert len(feats) == len(present) == 4  # one feature per class, not one per fragment
    assert {f["properties"]["classification"]["name"] for f in feats} == present
    assert all(f["geometry"]["type"] == "MultiPolygon" for f in feats)
    xs = [p[0] for f in feats for poly in f["geometry"]["coordinates"] for r in poly for p in r]
    assert min(xs) >= 1000 and max(xs) <= 1000 + 4 * mask.shape[1]


@pytest.mark.parametrize("name", ["09", "21"])
def test_round_trip_iou_exact_and_default_tolerance(wsss4luad_dir, tmp_path, name):
    mask = read_index_mask(wsss4luad_dir / "val" / "mask" / f"{name}.png", CLASSES)
    exact, simple = tmp_path / "exact.geojson", tmp_path / "simple.geojson"
    export_geojson(mask, exact, CLASSES, downsample=2.0, origin=(10, 20), include_background=True, tolerance=0)
    export_geojson(mask, simple, CLASSES, downsample=2.0, origin=(10, 20), include_background=True)
    for path, floor in ((exact, 0.99), (simple, 0.95)):
        back = rasterize_geojson(read_geojson(path), mask.shape, CLASSES, downsample=2.0, origin=(10, 20))
        for k in range(BG + 1):
            if (mask == k).any():
                assert iou(back == k, mask == k) >= floor, (path.name, k)
        if path is exact:
            assert (back == mask).all()  # pixel edges: exact
    # the default tolerance actually simplifies: far fewer vertices than the pixel edges
    count = lambda p: sum(len(r) for a in read_geojson(p) for poly in a.polygons for r in poly)  # noqa: E731
    assert count(simple) < 0.6 * count(exact)


@pytest.mark.parametrize("tolerance", [0.0, GEOJSON_TOLERANCE, 2.0])
def test_self_touching_shapes_give_valid_geometry(tmp_path, tolerance):
    m = np.full((24, 24), BG, np.uint8)
    m[1:3, 1:3] = 0
    m[3:5, 3:5] = 0                       # two squares touching at a corner
    m[8:11, 1:4] = 1
    m[9, 2], m[8, 3] = BG, BG             # a C whose gap meets the outside at a corner
    m[12:22, 12:22] = 2
    yy, xx = np.mgrid[14:20, 14:20]
    m[14:20, 14:20] = np.where((yy + xx) % 2 == 0, 2, 0)  # pixel-diagonal checkerboard inside class 2
    m[1:7, 12:18] = 1
    m[3, 14], m[4, 15] = BG, BG           # two holes touching at a corner
    out = tmp_path / "t.geojson"
    export_geojson(m, out, CLASSES, tolerance=tolerance, include_background=True)
    feats = check_qupath_doc(out, set(CLASSES.names) | {CLASSES.background.name})
    assert len(feats) == 4
    if tolerance == 0:
        back = rasterize_geojson(read_geojson(out), m.shape, CLASSES)
        assert (back == m).all()
    for k in range(3):  # every class alone as well
        assert shapely.is_valid(mask_to_geometry(m == k, tolerance=tolerance))


def test_holes_kept_as_rings_or_filled(tmp_path):
    m = np.full((40, 40), BG, np.uint8)
    m[5:35, 5:35] = 0
    m[12:28, 12:28] = 1        # a hole of another class ...
    m[18:22, 18:22] = 0        # ... with an island of the first class in it
    out = tmp_path / "h.geojson"
    export_geojson(m, out, CLASSES)
    tumor = next(a for a in read_geojson(out) if a.name == CLASSES.names[0])
    assert sorted(len(p) for p in tumor.polygons) == [1, 2]  # frame with its hole ring, island
    back = rasterize_geojson(out, m.shape, CLASSES, fill=BG)
    assert (back == m).all()  # the hole stays a hole (stroma shows through), the island is back
    export_geojson(m, out, CLASSES, holes=False, split=True)
    tumor = [a for a in read_geojson(out) if a.name == CLASSES.names[0]]
    assert len(tumor) == 1 and len(tumor[0].polygons) == 1 and len(tumor[0].polygons[0]) == 1
    filled = rasterize_geojson([tumor[0]], m.shape, CLASSES, fill=BG)
    assert (filled[5:35, 5:35] == 0).all() and (filled[:5] == BG).all()


def test_split_gives_one_valid_polygon_per_region(tmp_path):
    m = np.full((30, 30), BG, np.uint8)
    m[2:8, 2:8] = 0
    m[8:12, 8:12] = 0          # corner-touching: a region of its own (4-connected regions)
    m[20:28, 3:9] = 0
    m[15:25, 15:25] = 1
    out = tmp_path / "s.geojson"
    export_geojson(m, out, CLASSES, split=True, tolerance=0)
    feats = check_qupath_doc(out, set(CLASSES.names))
    assert [f["geometry"]["type"] for f in feats] == ["Polygon"] * 4
    assert sorted(f["properties"]["classification"]["name"] for f in feats) == ["stroma"] + ["tumor"] * 3
    assert len({f["id"] for f in feats}) == 4


@pytest.mark.parametrize("fill", [UNLABELLED, BG])
def test_empty_mask_is_refused_and_nothing_written(tmp_path, fill):
    out = tmp_path / "empty.geojson"
    with pytest.raises(ExportError, match=r"empty\.geojson.*no labelled pixels"):
        export_geojson(np.full((16, 16), fill, np.uint8), out, CLASSES)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.write_text("precious")  # an existing output survives a refused replacement
    with pytest.raises(ExportError, match="no labelled pixels"):
        export_geojson(np.full((16, 16), fill, np.uint8), out, CLASSES)
    assert out.read_text() == "precious"


def test_cli_options_and_empty_mask_one_line(tmp_path, capsys):
    lab = np.full((60, 80), BG, np.uint8)
    lab[5:40, 5:50] = 0
    lab[15:25, 15:25] = 1
    lab[45:55, 60:75] = 1
    src = tmp_path / "mask.png"
    save_pseudo_mask(src, lab, CLASSES)
    out = tmp_path / "a.geojson"
    assert main(["export", str(src), str(out), "--downsample", "4"]) == 0
    feats = check_qupath_doc(out, set(CLASSES.names))
    assert [f["geometry"]["type"] for f in feats] == ["MultiPolygon"] * 2
    assert main(["export", str(src), str(out), "--overwrite", "--split", "--tolerance", "0", "--no-holes"]) == 0
    feats = check_qupath_doc(out, set(CLASSES.names))
    assert len(feats) == 3 and all(len(f["geometry"]["coordinates"]) == 1 for f in feats)  # no hole rings
    capsys.readouterr()
    empty = tmp_path / "empty.png"
    save_pseudo_mask(empty, np.full((20, 20), BG, np.uint8), CLASSES)
    assert main(["export", str(empty), str(tmp_path / "e.geojson")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("histo-wsss export: error:") and "e.geojson" in err[0]
    assert "no labelled pixels" in err[0] and not (tmp_path / "e.geojson").exists()


def test_cancel_between_classes_writes_nothing(tmp_path):
    """``should_stop`` is asked before each class: a stop after the first class leaves no file."""
    from napari_histo_wsss.core.data.classes import PRESETS

    classes = PRESETS["wsss4luad"]
    labels = np.zeros((40, 60), np.uint8)
    labels[:, 20:40], labels[:, 40:] = 1, 2
    asked = []

    def stop_after_one() -> bool:
        asked.append(1)
        return len(asked) > 1

    out = tmp_path / "m.geojson"
    assert export_geojson(labels, out, classes, should_stop=stop_after_one) is None
    assert len(asked) == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    assert export_geojson(labels, out, classes, should_stop=lambda: False) == out
    assert len(read_geojson(out)) == 3
