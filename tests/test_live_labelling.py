"""Feature cache, live head and label suggestions (core/stage1/{features,live,suggest}.py, `histo-wsss suggest`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.slides.tissue import detect_tissue
from napari_histo_wsss.core.stage1.features import (
    FEATURE_STRIDE,
    FeatureExtractor,
    FeatureSpec,
    build_slide_features,
    image_features,
)
from napari_histo_wsss.core.stage1.live import UNCERTAIN, LiveHead, pseudo_from_logits, standardiser
from napari_histo_wsss.core.stage1.suggest import EXPLORE, embed, suggest, typicality


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(FeatureSpec())


def test_slide_features_resume_after_a_stop_and_match_one_pass(cmu_svs, tmp_path, extractor):
    store = tmp_path / "f.zarr"
    spec = FeatureSpec(tile=256, margin=32)
    with open_slide(cmu_svs) as slide:
        tissue = detect_tissue(slide)
        ds = 4.0  # 128 px cells of level 0
        asked = {"n": 0}

        def stop_after_two():
            asked["n"] += 1
            return asked["n"] > 2

        events = list(build_slide_features(slide, tissue, ds, spec, store=store, should_stop=stop_after_two,
                                           extractor=extractor))
        assert events[-1].kind == "cancelled"
        total = events[0].steps
        resumed = list(build_slide_features(slide, tissue, ds, spec, store=store, extractor=extractor))
        assert resumed[0].step == 2 and resumed[-1].kind == "done"  # two tiles were kept
        assert sum(e.kind == "step" for e in resumed) == total - 2
        cached = resumed[-1].result
        fresh = list(build_slide_features(slide, tissue, ds, spec, store=None, extractor=extractor))[-1].result
    assert np.array_equal(cached.dense(), fresh.dense())
    assert cached.tissue.any() and not cached.tissue.all()  # the slide's glass is flagged
    # glass cells were not computed: their features are zero; tissue cells are not
    assert np.abs(fresh.dense()[fresh.tissue]).sum(axis=-1).min() > 0


def test_patch_folder_features_are_computed_image_by_image(wsss4luad_dir, tmp_path, extractor):
    """A patch folder's sheet: one forward pass per image (its cells and a white margin), none over
    the white between images; each image's cells are the backbone on that image alone; a stop
    resumes image by image."""
    folder = tmp_path / "img"
    folder.mkdir()
    for name in sorted(p.name for p in (wsss4luad_dir / "val" / "img").glob("*.png"))[:5]:
        (folder / name).symlink_to(wsss4luad_dir / "val" / "img" / name)  # read in place, never copied
    spec = FeatureSpec()
    m, mc = spec.margin, spec.margin // FEATURE_STRIDE
    with open_slide(folder) as slide:
        tissue = detect_tissue(slide)
        calls = []

        class Counting:
            channels = extractor.channels

            def __call__(self, rgb):
                calls.append(rgb.shape[:2])
                return extractor(rgb)

        store = tmp_path / "f.zarr"
        stop = iter([False, False, True])
        first = list(build_slide_features(slide, tissue, 1.0, spec, store=store, extractor=Counting(),
                                          should_stop=lambda: next(stop, True)))
        assert first[-1].kind == "cancelled" and len(calls) == 2
        events = list(build_slide_features(slide, tissue, 1.0, spec, store=store, extractor=Counting()))
        assert events[-1].kind == "done" and events[0].steps == len(slide.regions) == 5
        assert len(calls) == 5  # two before the stop, three after: no image computed twice
        sheet = events[-1].result
        dense = sheet.dense()
        inside = np.zeros(sheet.shape, bool)
        for r, shape in zip(slide.regions, calls):
            r0, c0 = r.y // FEATURE_STRIDE, r.x // FEATURE_STRIDE
            r1, c1 = -(-(r.y + r.height) // FEATURE_STRIDE), -(-(r.x + r.width) // FEATURE_STRIDE)
            assert shape == ((r1 - r0) * FEATURE_STRIDE + 2 * m, (c1 - c0) * FEATURE_STRIDE + 2 * m)
            inside[r0:r1, c0:c1] = True
            # the image alone, padded with white to whole cells and the margin
            rgb = np.asarray(Image.open(folder / r.name).convert("RGB"))
            pad = np.pad(rgb, ((m, (r1 - r0) * FEATURE_STRIDE - r.height + m),
                               (m, (c1 - c0) * FEATURE_STRIDE - r.width + m), (0, 0)), constant_values=255)
            want = extractor(pad)[mc:mc + r1 - r0, mc:mc + c1 - c0].astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(dense[r0:r1, c0:c1], want, atol=1e-3)
        assert not dense[~inside].any() and not sheet.tissue[~inside].any()  # the white between: never computed
        assert sheet.tissue[inside].mean() > 0.5


def test_image_units_cover_each_image_and_cut_large_ones_into_tile_pieces():
    from napari_histo_wsss.core.slides.mosaic import FolderImage
    from napari_histo_wsss.core.stage1.features import image_units

    small, large = FolderImage("a.png", 0, 0, 224, 200), FolderImage("b.png", 480, 0, 1100, 700)
    units = image_units([small, large], 32.0, 16)
    assert units[0] == (0, 7, 0, 7)  # 224 x 200 px: 7 x 7 cells (the last row part white)
    pieces = units[1:]
    assert len(pieces) == 3 * 2  # 1100 x 700 px = 35 x 22 cells, in pieces of at most 16 cells a side
    cover = np.zeros((40, 60), int)
    for r0, r1, c0, c1 in pieces:
        assert r1 - r0 <= 16 and c1 - c0 <= 16
        cover[r0:r1, c0:c1] += 1
    assert (cover[0:22, 15:50] == 1).all() and cover.sum() == 22 * 35  # each cell once, none outside
    assert image_units([small], 64.0, 16) == [(0, 4, 0, 4)]  # at another working resolution


def test_features_of_another_backbone_setting_are_not_reused(cmu_svs, tmp_path, extractor):
    assert FeatureSpec(tile=256).key(4.0) != FeatureSpec(tile=512).key(4.0)
    assert FeatureSpec().key(4.0) != FeatureSpec().key(2.0)
    assert FeatureSpec(backbone="resnet18").key(4.0) != FeatureSpec().key(4.0)


def _clusters(rng, n_per, centres):
    x = np.concatenate([c + 0.3 * rng.standard_normal((n_per, len(c))) for c in centres]).astype(np.float32)
    return x


def test_live_head_learns_separable_classes_and_says_what_it_cannot_learn():
    rng = np.random.default_rng(0)
    c = 16
    centres = [np.eye(c)[0] * 3, np.eye(c)[1] * 3]
    x = _clusters(rng, 30, centres)
    y = np.zeros((60, 3), np.uint8)
    y[:30, 0] = 1
    y[30:, 1] = 1
    mean, std = standardiser(x)
    head = LiveHead(3, mean, std).fit(x, y)
    p = head.probabilities(x)
    assert (p[:30, 0] > 0.75).all() and (p[30:, 1] > 0.75).all()  # (L2 1.0 keeps them from the extremes)
    assert (p[:30, 1] < 0.25).all() and (p[30:, 0] < 0.25).all()
    assert np.isneginf(head.bias[2]) and (p[:, 2] == 0).all()
    notes = head.warnings(["tumor", "stroma", "normal"])
    assert len(notes) == 1 and "normal" in notes[0]
    y[:, 1] = 1  # stroma on every patch: nothing says where it is absent
    head.fit(x, y)
    assert any("every labelled patch shows stroma" in w for w in head.warnings(["tumor", "stroma", "normal"]))
    # cell CAMs are the same linear map: raw argmax, uncertain below the floor, no class off tissue
    z = np.stack([np.full((2, 2), 2.0), np.full((2, 2), 0.5), np.full((2, 2), -np.inf)])
    z[1, 0, 0] = 3.0
    z[:, 1, 1] = -np.inf
    lab = pseudo_from_logits(z, floor=0.8)
    assert lab[0, 0] == 2 and lab[0, 1] == 1 and lab[1, 1] == 0
    z[0, 1, 0] = 0.2
    assert pseudo_from_logits(z, floor=0.8)[1, 0] == UNCERTAIN


def test_live_head_fit_reaches_the_optimum_from_any_start():
    """The head's objective is strictly convex: the fit stops at its minimum (zero gradient), whatever
    the warm start, so a refit depends on the labels only."""
    rng = np.random.default_rng(3)
    n, c, k = 60, 40, 3
    x = rng.normal(0, 1, (n, c)).astype(np.float32)
    y = (x[:, :k] + rng.normal(0, 1.0, (n, k)) > 0).astype(np.float32)  # noisy: not separable
    mean, std = np.zeros(c, np.float32), np.ones(c, np.float32)
    cold = LiveHead(k, mean, std).fit(x, y)
    warm = LiveHead(k, mean, std)
    warm.weight = rng.normal(0, 3, (k, c)).astype(np.float32)  # a far-off start
    warm.bias = np.full(k, 4.0, np.float32)
    warm.fit(x, y)
    np.testing.assert_allclose(warm.weight, cold.weight, atol=2e-3)
    np.testing.assert_allclose(warm.bias, cold.bias, atol=2e-3)
    # the gradient of the objective (mean weighted BCE + l2 / 2 |w|^2 / c) vanishes there
    pos = y.sum(0)
    pw = np.clip((n - pos) / pos, 0.2, 5.0)
    z = x @ cold.weight.T.astype(np.float64) + cold.bias
    s = 1 / (1 + np.exp(-z))
    g = (-pw * y * (1 - s) + (1 - y) * s) / (n * k)
    assert np.abs(g.T @ x + cold.l2 * cold.weight / c).max() < 2e-6 and np.abs(g.sum(0)).max() < 2e-6


def test_live_head_fit_makes_no_torch_optimiser():
    """The first torch optimiser of a process imports torch._dynamo (a second of module loading
    that holds the GIL and stalls the GUI): the live head's fit must not make one."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, torch\n"
            "from napari_histo_wsss.core.stage1.live import LiveHead, warm_up\n"
            "warm_up()\n"
            "x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)\n"
            "LiveHead(2, np.zeros(8, np.float32), np.ones(8, np.float32)).fit(x, (x[:, :2] > 0).astype(np.float32))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cold_start_is_a_reproducible_random_sample_of_the_unlabelled_patches():
    rng = np.random.default_rng(1)
    x = _clusters(rng, 40, [np.eye(4)[i] * 5 for i in range(4)])
    coords = embed(x, x.mean(0), x.std(0) + 1e-3)
    labelled = np.zeros(len(x), bool)
    labelled[:10] = True
    picks = suggest(coords, labelled, 20)
    idx = [p.index for p in picks]
    assert len(set(idx)) == 20 and not labelled[idx].any()
    assert all(p.random and p.reason == "random sample" for p in picks)
    assert idx == [p.index for p in suggest(coords, labelled, 20)]  # same labels, same batch (GUI = CLI)
    assert idx != [p.index for p in suggest(coords, labelled, 20, seed=1)]
    # a random sample, not the most typical patches: over many draws every cluster is drawn about
    # as often as it holds unlabelled patches
    counts = np.bincount([p.index // 40 for s in range(40) for p in suggest(coords, labelled, 20, seed=s)], minlength=4)
    share = counts / counts.sum()
    assert np.allclose(share, [30 / 150, 40 / 150, 40 / 150, 40 / 150], atol=0.05), share


def test_typicality_ranks_isolated_patches_low():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (1, 8)) + 12]).astype(np.float32)
    t = typicality(x)
    assert t.shape == (301,) and t[-1] == t.min() and t[-1] < 0.25 and np.median(t[:300]) == pytest.approx(0.5, abs=0.05)
    # with a reference subset (large slides) the ranking holds
    t2 = typicality(x, reference=100)
    assert t2[-1] == t2.min() and np.corrcoef(t[:300], t2[:300])[0, 1] > 0.7


def test_part_of_the_batch_is_targeted_at_typical_uncertain_patches():
    rng = np.random.default_rng(2)
    coords = np.concatenate([rng.standard_normal((60, 4)), rng.standard_normal((1, 4)) + 20]).astype(np.float32)
    labelled = np.zeros(61, bool)
    labelled[:20] = True
    probs = np.full((61, 2), 0.99, np.float32)
    probs[[30, 31, 60], 0] = 0.5  # two doubtful common patches, one doubtful outlier
    # (pool_factor=1: the targeted part is the best-scoring patches themselves, not medoids of a wider pool)
    picks = suggest(coords, labelled, 4, probs=probs, trainable=np.array([True, True]), pool_factor=1, explore=0.5)
    targeted = [p for p in picks if not p.random]
    assert len(targeted) == 2 and len(picks) == 4
    assert {p.index for p in targeted} == {30, 31} and all(p.reason == "uncertain" for p in targeted)
    assert picks[:2] == targeted  # targeted first, then the random part
    assert not labelled[[p.index for p in picks]].any() and len({p.index for p in picks}) == 4
    # the default share: a quarter targeted
    picks = suggest(coords, labelled, 8, probs=probs, trainable=np.array([True, True]))
    assert sum(not p.random for p in picks) == 8 - round(8 * EXPLORE) == 2
    # explore=0: all targeted; the doubtful outlier only comes after the typical doubtful patches
    picks = suggest(coords, labelled, 3, probs=probs, trainable=np.array([True, True]), explore=0.0, pool_factor=1)
    assert [p.index for p in picks][:2] in ([30, 31], [31, 30])
    assert not any(p.random for p in picks)
    # a trained classifier that disagrees makes a patch doubtful too
    probs[[30, 31, 60], 0] = 0.99
    other = probs.copy()
    other[45, 1] = 0.01
    picks = suggest(coords, labelled, 1, probs=probs, trainable=np.array([True, True]), other_probs=other, explore=0.0,
                    pool_factor=1)
    assert picks[0].index == 45 and picks[0].reason == "models disagree"


def test_image_features_flag_white_glass(wsss4luad_dir, extractor):
    rgb = np.asarray(Image.open(wsss4luad_dir / "val" / "img" / "02.png").convert("RGB"))
    f = image_features(extractor, rgb)
    assert f.features.shape[:2] == (-(-rgb.shape[0] // 32), -(-rgb.shape[1] // 32))
    assert f.tissue.any() and not f.tissue.all()  # image 02 is two-thirds glass


def test_suggest_command_cold_start_then_with_labels(cmu_svs, tmp_path, capsys):
    project = Project.create(tmp_path / "p", "wsss4luad", patch_size=32, target_mpp=4.0)
    sid = project.add_slide(cmu_svs)
    assert main(["suggest", str(project.root), "--n", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no patch is labelled yet" in out
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert len(rows) == 5 and {r["slide_id"] for r in rows} == {sid}
    assert len({(r["x"], r["y"]) for r in rows}) == 5
    assert any(project.features_dir(sid).glob("*.zarr"))  # the cache is kept in the project
    grid = project.grid(sid)
    picked = [(int(r["x"]), int(r["y"])) for r in rows]
    project.set_patch_labels(sid, [p[0] for p in picked[:3]], [p[1] for p in picked[:3]], grid.size0,
                             np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]]))
    assert main(["suggest", str(project.root), "--n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no patch shows normal" in out.replace("no labelled patch shows normal", "no patch shows normal")
    rows2 = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert len(rows2) == 4 and not {(int(r["x"]), int(r["y"])) for r in rows2} & set(picked[:3])
    assert all(r["predicted"] for r in rows2)
    # bad input: one line, no traceback
    assert main(["suggest", str(project.root), "--n", "0"]) != 0
    assert main(["suggest", str(project.root), "--slide", "nope"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope" in err


def test_balanced_head_does_not_drown_a_rare_class():
    # 200 patches of class 0, 8 of a rare class 1 that overlaps it in feature space
    rng = np.random.default_rng(4)
    c = 16
    common = rng.normal(0, 1, (200, c))
    rare = rng.normal(0, 1, (8, c)) + 3.5 * np.eye(c)[0]
    x = np.concatenate([common, rare]).astype(np.float32)
    y = np.zeros((208, 2), np.uint8)
    y[:200, 0] = 1
    y[200:, 1] = 1
    mean, std = x.mean(0), x.std(0)
    test_rare = (rng.normal(0, 1, (100, c)) + 3.5 * np.eye(c)[0]).astype(np.float32)
    plain = LiveHead(2, mean, std, balanced=False).fit(x, y)
    balanced = LiveHead(2, mean, std).fit(x, y)
    def recall(h):
        return float((h.logits(test_rare).argmax(axis=1) == 1).mean())
    assert recall(balanced) > recall(plain) + 0.2, (recall(plain), recall(balanced))
    # the common class is still found on its own patches
    test_common = rng.normal(0, 1, (100, c)).astype(np.float32)
    assert float((balanced.logits(test_common).argmax(axis=1) == 0).mean()) > 0.9


def test_suggest_compares_the_live_head_with_the_projects_trained_run(cmu_svs, tmp_path, capsys):
    from _review_project import RUN, labelled_project_with_classifier

    from napari_histo_wsss.core.data.datasets import to_tensor
    from napari_histo_wsss.core.stage1.suggest import trained_patch_probs
    from napari_histo_wsss.core.stage1.train import load_run

    project, sid = labelled_project_with_classifier(tmp_path / "p.wsss", cmu_svs)
    grid = project.grid(sid)
    # no comparison by default (it did not help in the simulated annotator)
    assert main(["suggest", str(project.root), "--n", "3", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert not any(r["trained"] for r in rows) and all(float(r["disagreement"]) == 0 for r in rows)
    assert main(["suggest", str(project.root), "--n", "6", "--run", "newest", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert len(rows) == 6 and all(r["trained"] for r in rows)  # the run's view of every suggested patch
    dis = np.array([float(r["disagreement"]) for r in rows])
    assert (dis >= 0).all() and (dis <= 1).all() and dis.max() > 0
    # the probabilities are the run's own: a patch read as training reads it, through the classifier
    done = [ev for ev in trained_patch_probs(project, sid, grid, project.runs_dir / RUN) if ev.kind == "done"][-1]
    assert "reused" in done.message  # kept in the project by the command, tied to the checkpoint
    model = load_run(project.runs_dir / RUN)[0]
    patch = int(project.settings["patch_size"])
    with project.open_slide(sid) as slide:
        for i in (0, len(grid) // 2, len(grid) - 1):
            rgb = slide.read_scaled((int(grid.x[i]), int(grid.y[i])), (grid.size0, grid.size0), (patch, patch))
            with torch.no_grad():
                expected = torch.sigmoid(model(to_tensor(rgb)[None]))[0].numpy()
            np.testing.assert_allclose(done.probs[i], expected, atol=1e-5)
    # a retrained checkpoint is not mixed with the old predictions
    ckpt = project.runs_dir / RUN / "checkpoints" / "best.pt"
    st = ckpt.stat()
    import os

    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # a stop between batches ends the pass there: one batch classified, nothing kept
    asked = []
    evs = list(trained_patch_probs(project, sid, grid, project.runs_dir / RUN, batch=2,
                                   should_stop=lambda: asked.append(1) or len(asked) > 1))
    assert [e.kind for e in evs] == ["step", "cancelled"] and evs[-1].step == 2
    # between batches the caller's thread keeps its grad mode (a worker thread is reused for training)
    from napari_histo_wsss.core.stage1.suggest import classify_patches

    batches = classify_patches(model, (np.full((patch, patch, 3), 200, np.uint8) for _ in range(4)), batch=2)
    assert next(batches).shape == (2, project.classes.num_classes) and torch.is_grad_enabled()
    again = [ev for ev in trained_patch_probs(project, sid, grid, project.runs_dir / RUN) if ev.kind == "done"][-1]
    assert "reused" not in again.message and np.allclose(again.probs, done.probs, atol=1e-5)
    capsys.readouterr()
    # no comparison when asked, and a clear line for a run that does not exist
    assert main(["suggest", str(project.root), "--n", "3", "--run", "none", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((project.root / "suggestions.csv").read_text().splitlines()))
    assert not any(r["trained"] for r in rows) and all(float(r["disagreement"]) == 0 for r in rows)
    assert main(["suggest", str(project.root), "--run", "cls-nope", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cls-nope" in err
