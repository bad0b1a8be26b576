"""Dataset importers, bad input, make_patches on the real WSSS4LUAD images, torch datasets."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable, get_preset
from napari_histo_wsss.core.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MaskedDataset,
    MaskedSample,
    WeakLabelDataset,
    detect_layout,
    format_label_name,
    list_images,
    load_dataset,
    make_patches,
    parse_label_name,
    read_index_mask,
    to_tensor,
)
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import DatasetError

WSSS = get_preset("wsss4luad")


def _labels_csv(wsss4luad_dir: Path) -> dict[str, dict]:
    """The rows of labels.csv for the validation images (with masks), by file stem."""
    with open(wsss4luad_dir / "labels.csv", newline="") as f:
        return {Path(r["file"]).stem: r for r in csv.DictReader(f) if r["split"] == "val"}


def _save_palette_mask(path: Path, idx: np.ndarray, table: ClassTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(idx.astype(np.uint8), mode="P")
    im.putpalette(table.palette())
    im.save(path)


def _save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _masked_pair(root: Path, split: str, stem: str, idx: np.ndarray, table: ClassTable) -> None:
    _save_rgb(root / split / "img" / f"{stem}.png", _noise(*idx.shape))
    _save_palette_mask(root / split / "mask" / f"{stem}.png", idx, table)


# -- label names --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, style, labels",
    [
        ("436219-9328-56427-[1, 1, 0].png", "wsss4luad", [1, 1, 0]),
        ("a-[0,0,1].png", "wsss4luad", [0, 0, 1]),
        ("1031280-2300-27920-[1 0 0 1].png", "luad-histoseg", [1, 0, 0, 1]),
        ("TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.2500+0[1101].png", "bcss-wsss", [1, 1, 0, 1]),
    ],
)
def test_parse_label_name(name, style, labels):
    got_style, got = parse_label_name(Path("/data") / name)
    assert got_style == style and got.dtype == np.uint8 and got.tolist() == labels


@pytest.mark.parametrize(
    "name", ["a-[1, 0, 2].png", "a-[1,0 1].png", "a-[].png", "a-[1, 0, ].png", "a-[x y].png", "a-[1 0 1]x.png", "plain.png"]
)
def test_malformed_label_names_name_the_file(name):
    with pytest.raises(DatasetError) as e:
        parse_label_name(Path("/data") / name)
    assert f"/data/{name}" in str(e.value)


def test_format_label_name_round_trips():
    name = format_label_name("img_0_224", np.array([1, 0, 1], np.uint8))
    assert name == "img_0_224-[1, 0, 1].png"
    assert parse_label_name(name)[1].tolist() == [1, 0, 1]


# -- importers ----------------------------------------------------------------------------------
def test_wsss4luad_real_folder(wsss4luad_dir):
    spec = load_dataset(wsss4luad_dir)
    assert spec.layout == "wsss4luad" and spec.classes == WSSS and spec.root == wsss4luad_dir
    by_name = {s.name: s for s in spec.train}
    assert len(by_name) == 4
    with open(wsss4luad_dir / "labels.csv", newline="") as f:
        listed = {Path(r["file"]).stem: [int(r[f"label_{c}"]) for c in ("tumor", "stroma", "normal")]
                  for r in csv.DictReader(f) if r["split"] == "train_example"}
    assert {n: s.labels.tolist() for n, s in by_name.items()} == listed
    assert by_name["436219-9328-56427-[1, 1, 0]"].labels.tolist() == [1, 1, 0]
    assert by_name["449636-23526-9666-[0, 0, 1]"].labels.tolist() == [0, 0, 1]
    img = by_name["436219-9328-56427-[1, 1, 0]"].image()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and 150 < img.shape[0] < 300
    assert len(spec.val) == 31 and spec.test == []
    expected = _labels_csv(wsss4luad_dir)
    for s in spec.val:
        row = expected[s.name]
        mask = s.mask()
        assert mask.shape == (int(row["height"]), int(row["width"])) and mask.dtype == np.uint8
        assert s.labels.tolist() == [int(row[f"label_{c}"]) for c in ("tumor", "stroma", "normal")], s.name
    assert "31 val" in spec.describe()


def test_luad_histoseg_generated_layout(tmp_path):
    table = get_preset("luad-histoseg")
    root = tmp_path / "LUAD-HistoSeg"
    names = {"1031280-2300-27920-[1 0 0 1].png": [1, 0, 0, 1], "22-0-0-[0 1 1 0].png": [0, 1, 1, 0],
             "5-224-448-[0 0 0 1].png": [0, 0, 0, 1]}
    for i, n in enumerate(names):
        _save_rgb(root / "training" / n, _noise(32, 32, i))
    (root / "training" / ".tmp-half-written-[1 0 0 0].png").write_bytes(b"")  # temporaries are skipped
    idx = np.array([[0, 1], [4, 3]], np.uint8).repeat(16, 0).repeat(16, 1)
    _masked_pair(root, "val", "v0", idx, table)
    _masked_pair(root, "test", "t0", idx[::-1], table)
    _masked_pair(root, "test", "t1", np.full((20, 30), 2, np.uint8), table)
    spec = load_dataset(root)
    assert spec.layout == "luad-histoseg" and spec.classes == table
    assert {s.path.name: s.labels.tolist() for s in spec.train} == names
    assert [s.name for s in spec.val] == ["v0"] and [s.name for s in spec.test] == ["t0", "t1"]
    assert spec.val[0].labels.tolist() == [1, 1, 0, 1] and spec.test[1].labels.tolist() == [0, 0, 1, 0]
    assert np.array_equal(spec.val[0].mask(), idx)


def test_bcss_wsss_generated_layout(tmp_path):
    root = tmp_path / "BCSS-WSSS"
    names = {"TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png": [1, 1, 0, 1],
             "TCGA-E2-A1B6-DX1_xmin21181_ymin13468_MPP-0.2500+2[0010].png": [0, 0, 1, 0]}
    for i, n in enumerate(names):
        _save_rgb(root / "training" / n, _noise(16, 16, i))
    spec = load_dataset(root)
    assert spec.layout == "bcss-wsss" and spec.classes.white_background is False
    assert {s.path.name: s.labels.tolist() for s in spec.train} == names


def test_masked_folder_needs_and_uses_a_class_table(tmp_path):
    root = tmp_path / "pairs"
    table = ClassTable.custom(["gland", "other"])
    _save_palette_mask(root / "mask" / "a.png", np.array([[0, 1], [2, 2]], np.uint8), table)
    _save_rgb(root / "img" / "a.png", _noise(2, 2))
    assert detect_layout(root) == "masked-folder"
    with pytest.raises(DatasetError, match="needs a class table"):
        load_dataset(root)
    spec = load_dataset(root, classes=table)
    assert spec.train == [] and [s.name for s in spec.val] == ["a"] and spec.val[0].labels.tolist() == [1, 1]


def test_rgb_masks_map_class_colours(tmp_path):
    idx = np.array([[0, 1, 2, 3]], np.uint8)
    colours = np.array([c.color for c in WSSS.classes] + [(255, 255, 255)], np.uint8)
    _save_rgb(tmp_path / "m.png", colours[idx])
    assert np.array_equal(read_index_mask(tmp_path / "m.png", WSSS), idx)
    bad = colours[idx].copy()
    bad[0, 2] = (1, 2, 3)
    _save_rgb(tmp_path / "bad.png", bad)
    with pytest.raises(DatasetError, match=r"bad.png: RGB mask colour \(1, 2, 3\)"):
        read_index_mask(tmp_path / "bad.png", WSSS)


def test_greyscale_and_alpha_index_masks(tmp_path):
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    Image.fromarray(idx, mode="L").save(tmp_path / "l.png")
    Image.fromarray(np.dstack([idx, np.full_like(idx, 255)])).save(tmp_path / "la.png")
    Image.fromarray(idx.astype(np.uint16)).save(tmp_path / "i16.png")
    for name, mode in (("l.png", "L"), ("la.png", "LA"), ("i16.png", "I;16")):
        assert Image.open(tmp_path / name).mode == mode
        got = read_index_mask(tmp_path / name, WSSS)
        assert got.dtype == np.uint8 and np.array_equal(got, idx), name


# -- bad input ------------------------------------------------------------------------------------
def test_one_malformed_name_in_a_training_folder(tmp_path):
    for i, n in enumerate(["a-[1, 0, 0].png", "b-[0, 1, 0].png", "c-[0, 1, 3].png"]):
        _save_rgb(tmp_path / "training" / n, _noise(8, 8, i))
    with pytest.raises(DatasetError, match=r"c-\[0, 1, 3\].png: malformed label \[0, 1, 3\]"):
        load_dataset(tmp_path)


def test_label_length_differs_from_class_table(wsss4luad_dir):
    with pytest.raises(DatasetError) as e:
        load_dataset(wsss4luad_dir, classes="luad-histoseg")
    assert "train_examples/" in str(e.value) and "3 entries but the class table has 4" in str(e.value)


def test_mask_size_differs_from_image(tmp_path):
    root = tmp_path / "ds"
    _save_rgb(root / "val" / "img" / "x.png", _noise(20, 30))
    _save_palette_mask(root / "val" / "mask" / "x.png", np.zeros((20, 31), np.uint8), WSSS)
    with pytest.raises(DatasetError, match=r"val/mask/x.png: mask is 31x20 px but its image x.png is 30x20 px"):
        load_dataset(root, classes=WSSS)
    with pytest.raises(DatasetError, match=r"val/mask/x.png: mask is 31x20 px"):
        MaskedSample("x", root / "val" / "img" / "x.png", root / "val" / "mask" / "x.png", WSSS).mask()
    out = tmp_path / "patches"
    with pytest.raises(DatasetError, match=r"val/mask/x.png: mask is 31x20 px"):
        make_patches(root / "val" / "img", root / "val" / "mask", out, WSSS, patch_size=16)
    assert not out.exists() and list(tmp_path.glob(".*")) == []


def test_class_index_outside_the_table(tmp_path):
    root = tmp_path / "ds"
    idx = np.zeros((24, 24), np.uint8)
    idx[3, 4] = 7
    _save_rgb(root / "img" / "good.png", _noise(24, 24))
    _save_palette_mask(root / "mask" / "good.png", np.ones((24, 24), np.uint8), WSSS)
    _save_rgb(root / "img" / "y.png", _noise(24, 24))
    _save_palette_mask(root / "mask" / "y.png", idx, WSSS)
    sample = load_dataset(root, classes=WSSS).val[1]  # listing reads no pixels; reading validates
    with pytest.raises(DatasetError, match=r"mask/y.png: mask holds class index\(es\) \[7\] outside the class table"):
        sample.mask()
    out = tmp_path / "patches"
    with pytest.raises(DatasetError, match=r"mask/y.png: mask holds class index\(es\) \[7\]"):
        make_patches(root / "img", root / "mask", out, WSSS, patch_size=16)
    assert not out.exists() and list(tmp_path.glob(".*")) == []  # nothing half-written left behind


def test_unpaired_images_and_masks(tmp_path):
    _save_rgb(tmp_path / "img" / "a.png", _noise(4, 4))
    _save_rgb(tmp_path / "img" / "b.png", _noise(4, 4))
    _save_palette_mask(tmp_path / "mask" / "a.png", np.zeros((4, 4), np.uint8), WSSS)
    with pytest.raises(DatasetError, match=r"img/b.png: image has no mask of the same name"):
        load_dataset(tmp_path, classes=WSSS)
    with pytest.raises(DatasetError, match=r"img/b.png: image has no mask"):
        make_patches(tmp_path / "img", tmp_path / "mask", tmp_path / "out", WSSS)


@pytest.mark.parametrize("content", ["empty", "unlabelled images", "file"])
def test_no_recognised_layout_names_the_folder(tmp_path, content):
    root = tmp_path / "data"
    if content == "file":
        root.write_text("not a folder")
    else:
        root.mkdir()
        if content == "unlabelled images":
            _save_rgb(root / "slide_a.png", _noise(8, 8))
            _save_rgb(root / "training" / "slide_b.png", _noise(8, 8))
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    assert str(root) in str(e.value)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing")


def test_ambiguous_stems(tmp_path):
    _save_rgb(tmp_path / "a.png", _noise(4, 4))
    _save_rgb(tmp_path / "a.tif", _noise(4, 4))
    with pytest.raises(DatasetError, match=r"a.(png|tif): two images share the name 'a'"):
        list_images(tmp_path)


# -- make_patches on the real WSSS4LUAD validation images ----------------------------------------
def test_make_patches_reproduces_labels_csv_and_splits_by_image(wsss4luad_dir, tmp_path):
    val = wsss4luad_dir / "val"
    expected = _labels_csv(wsss4luad_dir)
    out = tmp_path / "patches"
    stats = make_patches(val / "img", val / "mask", out, "wsss4luad", patch_size=224,
                         val_fraction=0.2, test_fraction=0.1, seed=3, min_tissue=0.0)
    split = stats["images"]
    assert stats["n_images"] == {"train": 22, "val": 6, "test": 3}
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(expected)  # each image in one split
    # held-out images and masks are byte copies; none of them gave a training patch
    for part in ("val", "test"):
        for stem in split[part]:
            assert (out / part / "img" / f"{stem}.png").read_bytes() == (val / "img" / f"{stem}.png").read_bytes()
            assert (out / part / "mask" / f"{stem}.png").read_bytes() == (val / "mask" / f"{stem}.png").read_bytes()
    with open(out / "patches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == stats["n_patches"] == len(list((out / "train").iterdir()))
    assert {Path(r["source"]).stem for r in rows} == set(split["train"])
    union: dict[str, np.ndarray] = {}
    for r in rows:
        labels = np.array([int(r[f"label_{c}"]) for c in WSSS.names])
        fracs = np.array([float(r[f"frac_{c}"]) for c in WSSS.names])
        assert np.array_equal(labels, (fracs > 0).astype(int)), r  # any pixel of a class labels the patch
        assert np.array_equal(parse_label_name(r["file"])[1], labels)
        assert sum(fracs) + float(r["frac_background"]) == pytest.approx(1.0, abs=1e-5)
        patch = Image.open(out / r["file"])
        assert patch.size == (224, 224)
        union[Path(r["source"]).stem] = union.get(Path(r["source"]).stem, 0) | labels
    # patches cover their image: the union of patch labels is the image-level label of labels.csv
    for stem in split["train"]:
        assert union[stem].tolist() == [int(expected[stem][f"label_{c}"]) for c in WSSS.names], stem
    counts = {c: sum(int(r[f"label_{c}"]) for r in rows) for c in WSSS.names}
    assert stats["class_counts"] == counts and sum(stats["label_combinations"].values()) == len(rows)

    # the output is itself a dataset: patches layout, its own class table, val/test pairs
    spec = load_dataset(out)
    assert spec.layout == "patches" and spec.classes == WSSS
    assert len(spec.train) == len(rows) and sorted(s.name for s in spec.val) == split["val"]
    assert sorted(s.name for s in spec.test) == split["test"]

    again = make_patches(val / "img", val / "mask", tmp_path / "again", "wsss4luad", patch_size=224,
                         val_fraction=0.2, test_fraction=0.1, seed=3, min_tissue=0.0)
    assert again["images"] == split  # the seed fixes the split
    with pytest.raises(DatasetError, match="not empty"):
        make_patches(val / "img", val / "mask", out, "wsss4luad")


def test_make_patches_one_padded_patch_per_image_reproduces_class_fractions(wsss4luad_dir, tmp_path):
    """With a patch larger than every image each image becomes one white-padded patch, so the
    patch fractions rescaled to the image area must equal labels.csv's per-image fractions."""
    val = wsss4luad_dir / "val"
    expected = _labels_csv(wsss4luad_dir)
    size = max(max(int(r["width"]), int(r["height"])) for r in expected.values())
    stats = make_patches(val / "img", val / "mask", tmp_path / "one", WSSS, patch_size=size, min_tissue=0.0)
    assert stats["n_patches"] == 31 and stats["n_padded_images"] == 31
    with open(tmp_path / "one" / "patches.csv", newline="") as f:
        rows = {Path(r["source"]).stem: r for r in csv.DictReader(f)}
    for stem, want in expected.items():
        scale = size * size / (int(want["width"]) * int(want["height"]))
        for c in WSSS.names:
            assert float(rows[stem][f"frac_{c}"]) * scale == pytest.approx(float(want[f"frac_{c}"]), abs=2e-4), (stem, c)
    combos = {}
    for want in expected.values():
        key = "+".join(c for c in WSSS.names if want[f"label_{c}"] == "1")
        combos[key] = combos.get(key, 0) + 1
    assert stats["label_combinations"] == combos  # tumor+stroma 25, stroma 2, normal 2, ... (README)
    assert combos["tumor+stroma"] == 25


def test_make_patches_thresholds(tmp_path):
    """min_class_fraction drops small class shares from a label; min_tissue drops glass patches."""
    idx = np.full((32, 64), 3, np.uint8)  # left patch: all background; right patch: 90% stroma + 10% tumor
    idx[:, 32:] = 1
    idx[:3, 32:] = 0
    (tmp_path / "img").mkdir()
    _save_rgb(tmp_path / "img" / "a.png", _noise(32, 64))
    _save_palette_mask(tmp_path / "mask" / "a.png", idx, WSSS)
    stats = make_patches(tmp_path / "img", tmp_path / "mask", tmp_path / "o1", WSSS, patch_size=32)
    assert stats["dropped"] == {"background": 1, "no_label": 0}
    assert [p.name for p in (tmp_path / "o1" / "train").iterdir()] == ["a_32_0-[1, 1, 0].png"]
    stats = make_patches(tmp_path / "img", tmp_path / "mask", tmp_path / "o2", WSSS, patch_size=32, min_class_fraction=0.2)
    assert [p.name for p in (tmp_path / "o2" / "train").iterdir()] == ["a_32_0-[0, 1, 0].png"]


# -- torch datasets -----------------------------------------------------------------------------
def test_to_tensor_normalises():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255
    t = to_tensor(rgb)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[0, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], rel=1e-5)
    assert t[2, 1, 2].item() == pytest.approx(-IMAGENET_MEAN[2] / IMAGENET_STD[2], rel=1e-5)
    with pytest.raises(ValueError):
        to_tensor(rgb.astype(np.float32))


def test_weak_label_dataset_on_real_patches(wsss4luad_dir):
    spec = load_dataset(wsss4luad_dir)
    ds = WeakLabelDataset(spec.train, size=96, augment=True)
    assert len(ds) == 4
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    x, y = batch
    assert x.shape == (4, 3, 96, 96) and x.dtype == torch.float32 and y.shape == (4, 3) and y.dtype == torch.float32
    assert set(y.flatten().tolist()) <= {0.0, 1.0}
    assert x.min() > -2.2 and x.max() < 2.7  # ImageNet-normalised range
    native, labels = WeakLabelDataset(spec.train)[0]
    h, w = spec.train[0].image().shape[:2]
    assert native.shape == (3, h, w) and torch.equal(labels, torch.from_numpy(spec.train[0].labels.astype(np.float32)))


def test_masked_dataset_shapes_and_aligned_augmentation(wsss4luad_dir, tmp_path):
    spec = load_dataset(wsss4luad_dir)
    x, m = MaskedDataset(spec.val[:2], size=128)[1]
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and m.shape == (128, 128) and m.dtype == torch.int64
    assert set(torch.unique(m).tolist()) <= {0, 1, 2, 3}
    x, m = MaskedDataset(spec.val[:1])[0]
    assert m.shape == x.shape[1:] == spec.val[0].mask().shape

    # an image painted in the class colours: after random flips/rotations the mask must still
    # describe the pixels (colour jitter is mild, so the nearest class colour stays the same)
    idx = np.zeros((40, 40), np.uint8)
    idx[:10] = 1
    idx[:, :7] = 2
    idx[30:, 30:] = 3
    colours = np.array([c.color for c in WSSS.classes] + [(255, 255, 255)], np.float32)
    _save_rgb(tmp_path / "img" / "p.png", colours[idx].astype(np.uint8))
    _save_palette_mask(tmp_path / "mask" / "p.png", idx, WSSS)
    ds = MaskedDataset(load_dataset(tmp_path, classes=WSSS).val, augment=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        x, m = ds[0]
        rgb = ((x * std + mean) * 255).permute(1, 2, 0).numpy()
        nearest = np.argmin(((rgb[:, :, None, :] - colours[None, None]) ** 2).sum(-1), axis=-1)
        assert np.array_equal(nearest, m.numpy())
        seen.add(m.numpy().tobytes())
    assert len(seen) > 3  # the augmentation really varies


def test_project_layout_reads_patches_from_the_slide(tmp_path, cmu_svs):
    p = Project.create(tmp_path / "proj", "wsss4luad", patch_size=64, target_mpp=2.0)
    sid = p.add_slide(cmu_svs)
    p.set_patch_labels(sid, [256, 1024], [512, 1024], 256, np.array([[1, 0, 0], [0, 1, 1]]))
    spec = load_dataset(p.root)
    assert spec.layout == "project" and spec.classes == WSSS and spec.val == []
    assert [s.labels.tolist() for s in spec.train] == [[1, 0, 0], [0, 1, 1]]
    sample = pickle.loads(pickle.dumps(spec.train[1]))  # DataLoader workers receive pickled samples
    img = sample.image()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5  # real tissue, not blank
    x, y = WeakLabelDataset(spec.train)[0]
    assert x.shape == (3, 64, 64) and y.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(DatasetError, match="differ from the requested table"):
        load_dataset(p.root, classes="luad-histoseg")
