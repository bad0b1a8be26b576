"""A folder of patches as one slide (a contact sheet): the real WSSS4LUAD images of different sizes,
the grid tiled per image, the project's guard against a folder that changed, live suggestions."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import ProjectError, SlideError
from napari_histo_wsss.core.slides.grid import make_grid
from napari_histo_wsss.core.slides.mosaic import GUTTER, folder_layout, patch_files
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.slides.tissue import detect_tissue


def test_wsss4luad_folder_is_a_sheet_of_its_images(wsss4luad_dir):
    folder = wsss4luad_dir / "val" / "img"
    files = patch_files(folder)
    with open_slide(folder) as slide:
        assert slide.format == "patch folder" and [r.name for r in slide.regions] == [f.name for f in files]
        sizes = {r.name: (r.width, r.height) for r in slide.regions}
        assert len(set(sizes.values())) > 5  # the images really differ in size
        for r in slide.regions[::7]:  # pixels: each image exactly in its box
            ref = np.asarray(Image.open(folder / r.name).convert("RGB"))
            np.testing.assert_array_equal(slide.read_region((r.x, r.y), 0, (r.width, r.height)), ref)
        boxes = np.array([(r.x, r.y, r.x + r.width, r.y + r.height) for r in slide.regions])
        w0, h0 = slide.dimensions
        assert boxes[:, 2].max() <= w0 and boxes[:, 3].max() <= h0
        for i in range(len(boxes)):  # no two images closer than the gutter
            a = boxes[i]
            for b in boxes[i + 1:]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= GUTTER
        tissue = detect_tissue(slide)
        grid = make_grid(slide, tissue, patch_size=128, target_mpp=None, min_tissue=0.5)
        assert len(grid) > 100
        # every grid patch starts on its own image's lattice and reaches no other image
        for x, y in zip(grid.x.tolist(), grid.y.tolist()):
            inside = np.flatnonzero((boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3]))
            assert len(inside) == 1
            bx, by = boxes[inside[0], :2]
            assert (x - bx) % grid.stride0 == 0 and (y - by) % grid.stride0 == 0
            touched = ((boxes[:, 0] < x + grid.size0) & (boxes[:, 2] > x)
                       & (boxes[:, 1] < y + grid.size0) & (boxes[:, 3] > y))
            assert touched.sum() == 1
        assert np.all(np.diff(grid.y) >= 0)  # row-major over the sheet
    assert folder_layout(folder) == folder_layout(folder)  # the layout depends on the folder only


def _patches(folder, n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        img = np.full((size, size, 3), 255, np.uint8)
        img[4:-4, 4:-4] = rng.integers(80, 200, (size - 8, size - 8, 3))  # stained, not glass
        Image.fromarray(img).save(folder / f"patch{i:02d}.png")


def test_same_size_patches_give_one_grid_patch_each(tmp_path):
    _patches(tmp_path / "f", n=5, size=64)
    with open_slide(tmp_path / "f") as slide:
        grid = make_grid(slide, None, patch_size=64, target_mpp=None)
        assert sorted(zip(grid.x.tolist(), grid.y.tolist())) == sorted((r.x, r.y) for r in slide.regions)


def test_project_keeps_a_patch_folder_and_refuses_it_once_changed(tmp_path):
    folder = tmp_path / "patches"
    _patches(folder)
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=64, target_mpp=None)
    sid = project.add_slide(folder)
    assert project.add_slide(folder) == sid  # the same folder again: the same slide
    grid = project.grid(sid)
    assert len(grid) == 4
    project.set_patch_labels(sid, grid.x[:2], grid.y[:2], grid.size0, np.array([[1, 0, 0], [0, 1, 0]]))
    reopened = Project.open(project.root)
    with reopened.open_slide(sid) as slide:
        assert len(slide.regions) == 4
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "patch00b.png")  # sorts in between
    with pytest.raises(ProjectError, match="patches.*changed since it was added.*5 images now"):
        Project.open(project.root).open_slide(sid)
    (folder / "patch00b.png").unlink()
    with Project.open(project.root).open_slide(sid) as slide:  # restored: usable again, labels intact
        assert len(slide.regions) == 4
    assert len(Project.open(project.root).patch_labels(sid)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="empty.*no PNG, JPEG or TIFF"):
        project.add_slide(empty)
    assert list(project.slides) == [sid]


def test_suggestions_on_a_wsss4luad_patch_folder(tmp_path, wsss4luad_dir):
    """The headless suggest on a project whose slide is the WSSS4LUAD folder: the feature cache covers
    the images, suggestions lie inside images, and labelled images steer the next batch."""
    from napari_histo_wsss.core.stage1.suggest import project_suggestions

    folder = tmp_path / "img"  # a link: the shared images are read in place, never copied
    folder.symlink_to(wsss4luad_dir / "val" / "img", target_is_directory=True)
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=128, target_mpp=None)
    sid = project.add_slide(folder)
    events = list(project_suggestions(project, n=6, run=False))
    done = events[-1]
    assert done.kind == "done" and len(done.rows) == 6
    with project.open_slide(sid) as slide:
        boxes = [(r.x, r.y, r.x + r.width, r.y + r.height) for r in slide.regions]
    for r in done.rows:
        assert any(a <= r.x < c and b <= r.y < d for a, b, c, d in boxes)
    assert any(project.features_dir(sid).glob("*.zarr"))
    # label the first batch from the masks' majority class, then ask again: the head is fitted
    grid = project.grid(sid)
    masks = wsss4luad_dir / "val" / "mask"
    labels = []
    for r in done.rows:
        box = next(b for b in boxes if b[0] <= r.x < b[2] and b[1] <= r.y < b[3])
        name = next(im.name for im in open_slide(folder).regions if (im.x, im.y) == box[:2])
        m = np.asarray(Image.open(masks / name))[r.y - box[1]:r.y - box[1] + grid.size0, r.x - box[0]:r.x - box[0] + grid.size0]
        lab = np.zeros(3, np.uint8)
        for c in range(3):
            lab[c] = (m == c).mean() > 0.05
        labels.append(lab if lab.any() else np.array([0, 1, 0], np.uint8))
    project.set_patch_labels(sid, [r.x for r in done.rows], [r.y for r in done.rows], grid.size0, np.stack(labels))
    again = list(project_suggestions(project, n=6, run=False))[-1]
    assert not ({(r.x, r.y) for r in again.rows} & {(r.x, r.y) for r in done.rows})
    assert all(r.predicted for r in again.rows)  # the live head's view of each suggestion
    shutil.rmtree(project.root)


def test_a_patch_folder_mask_exports_one_png_per_image(tmp_path, wsss4luad_dir, capsys):
    """A mask over the sheet comes back as the folder's own masks: one palette PNG per image, at the
    image's size and name. Round trip: the WSSS4LUAD ground truth pasted onto the sheet, exported,
    then scored against the ground-truth folder by `histo-wsss evaluate`."""
    import json

    from napari_histo_wsss.cli import main

    folder = wsss4luad_dir / "val" / "img"
    gt = wsss4luad_dir / "val" / "mask"
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=128, target_mpp=None)
    sid = project.add_slide(folder)
    with project.open_slide(sid) as slide:
        regions = slide.regions
        w0, h0 = slide.dimensions
    sheet = np.full((h0, w0), 3, np.uint8)  # background between the images
    for r in regions:
        sheet[r.y:r.y + r.height, r.x:r.x + r.width] = np.asarray(Image.open(gt / r.name))
    project.write_mask(sid, "corrected", sheet, 1.0)
    out = tmp_path / "masks"
    assert main(["export", str(project.root), str(out), "--slide", sid, "--mask", "corrected", "--per-image"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in gt.iterdir())
    for r in regions:  # exact at full resolution
        np.testing.assert_array_equal(np.asarray(Image.open(out / r.name)), np.asarray(Image.open(gt / r.name)))
    # a coarser mask (2 sheet pixels per mask pixel, as the CAM masks are) still lands on each image
    project.write_mask(sid, "pseudo", sheet[1::2, 1::2], 2.0)
    out2 = tmp_path / "masks2"
    assert main(["export", str(project.root), str(out2), "--slide", sid, "--mask", "pseudo", "--per-image"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out2), str(gt), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["miou"] > 0.95, scores
    # nothing is overwritten, and nothing is written into the patch folder
    assert main(["export", str(project.root), str(out2), "--slide", sid, "--mask", "pseudo", "--per-image"]) == 2
    assert "exists" in capsys.readouterr().err
    inside = folder / "masks"
    assert main(["export", str(project.root), str(inside), "--slide", sid, "--mask", "pseudo", "--per-image"]) == 2
    assert not inside.exists() and len(patch_files(folder)) == 31


def test_cams_on_a_patch_folder_gate_each_image_as_pseudo_masks_does(tmp_path, wsss4luad_dir, capsys):
    """`histo-wsss cams` on a patch folder classifies every image as `pseudo-masks` classifies an
    image and gates it on its own: no class reaches an image whose probability stays below the
    gating, whatever the other images hold."""
    from napari_histo_wsss.cli import main
    from napari_histo_wsss.core.review import MASK_REGION_PROBS, calibrated_gating, load_canvas
    from napari_histo_wsss.core.stage1.cams import allowed_classes, cams_for_image
    from napari_histo_wsss.core.stage1.train import TrainConfig, load_run, train_classifier

    folder = tmp_path / "four"  # links: the shared images are read in place
    folder.mkdir()
    for name in ("00.png", "02.png", "05.png", "10.png"):
        (folder / name).symlink_to(wsss4luad_dir / "val" / "img" / name)
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=64, target_mpp=None)
    sid = project.add_slide(folder)
    grid = project.grid(sid)
    with project.open_slide(sid) as slide:
        regions = list(slide.regions)
    xs, ys, labels = [], [], []
    for x, y in zip(grid.x.tolist(), grid.y.tolist()):
        r = next(r for r in regions if r.x <= x < r.x + r.width and r.y <= y < r.y + r.height)
        m = np.asarray(Image.open(wsss4luad_dir / "val" / "mask" / r.name))[y - r.y:y - r.y + 64, x - r.x:x - r.x + 64]
        lab = np.array([(m == c).mean() >= 0.05 for c in range(3)], np.uint8)
        if lab.any():
            xs.append(x), ys.append(y), labels.append(lab)
    project.set_patch_labels(sid, xs, ys, 64, np.stack(labels))
    cfg = TrainConfig(method="cam", epochs=1, steps=10, batch_size=8, weights="imagenet", device="cpu", patch_size=64,
                      synth_share=0.0)
    for _ev in train_classifier(project.root, project.runs_dir / "cls-four", cfg):
        pass
    assert main(["cams", str(project.root), "--device", "cpu"]) == 0
    assert "4 images classified" in capsys.readouterr().out
    probs = project.read_mask(sid, MASK_REGION_PROBS)[0].astype(np.float32)
    model, _, run_cfg = load_run(project.runs_dir / "cls-four")
    gating = calibrated_gating(project.runs_dir / "cls-four") or 0.5
    pseudo, ds = project.read_mask(sid, "pseudo")
    for i, r in enumerate(regions):
        rgb = np.asarray(Image.open(folder / r.name).convert("RGB"))
        expected = cams_for_image(model, rgb, device="cpu", mode=run_cfg.cam_mode, window=64, normalize=False)[1]
        np.testing.assert_allclose(probs[:, i], expected, atol=2e-3)
        allowed = allowed_classes(project.classes, probs=probs[:, i], prob_threshold=gating)
        box = pseudo[int(r.y / ds):int((r.y + r.height) / ds), int(r.x / ds):int((r.x + r.width) / ds)]
        present = set(np.unique(box).tolist()) - {project.classes.background_index}
        assert present <= set(np.flatnonzero(allowed).tolist()), (r.name, present, allowed)
    canvas = load_canvas(project, sid)  # read back: the same per-image gating
    np.testing.assert_allclose(canvas.region_probs(), probs)


def test_info_on_a_patch_folder(wsss4luad_dir, capsys):
    import json

    from napari_histo_wsss.cli import main

    assert main(["info", str(wsss4luad_dir / "val" / "img"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "patch folder" and facts["images"] == 31 and facts["grid"]["patches"] > 0


def test_the_review_canvas_takes_a_patch_folders_images_from_the_open_slide(tmp_path, wsss4luad_dir, monkeypatch):
    """The Review panel lays its canvas on the GUI thread: with the slide it already holds open,
    the images' boxes come from it and no image header is read again."""
    from napari_histo_wsss.core.review import canvas_regions

    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("00.png", "02.png", "05.png"):
        (folder / name).symlink_to(wsss4luad_dir / "val" / "img" / name)
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=64, target_mpp=None)
    sid = project.add_slide(folder)
    opened = project.open_slide(sid)
    want = canvas_regions(project, sid, (100, 200), 4.0)
    assert want is not None and len(want) == 3

    def no_reopen(*_a, **_k):
        raise AssertionError("the slide was opened again")

    monkeypatch.setattr(Project, "open_slide", no_reopen)
    monkeypatch.setattr("PIL.Image.open", no_reopen)
    assert canvas_regions(project, sid, (100, 200), 4.0, slide=opened) == want
    opened.close()
