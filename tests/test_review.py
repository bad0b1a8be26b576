"""The review step in core (no Qt): the slide CAM canvas, its tiling, the automatic pseudo-mask,
the corrected-pixel rules, the project mask names, and ``histo-wsss cams`` on the real CMU slide
with a classifier trained one tiny epoch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _review_project import RUN, labelled_project_with_classifier

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.project import Project
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.review import (
    COMPUTED_MASKS,
    MASK_CAM,
    MASK_CAM_LOGITS,
    MASK_CAM_PROBS,
    MASK_CORRECTED,
    MASK_CORRECTED_FLAG,
    MASK_PSEUDO,
    MASK_REVIEWED,
    CamCanvas,
    CamTile,
    Corrections,
    ReviewSettings,
    ThresholdIndex,
    compute_slide_cams,
    corrections_for_plan,
    load_canvas,
    load_corrections,
    outside_canvas,
    plan_cams,
    plan_slide_cams,
    pseudo_from_canvas,
    slide_probs,
    tissue_on_canvas,
    uncertain_index,
    with_uncertain,
)
from napari_histo_wsss.core.stage1.cams import pseudo_mask
from napari_histo_wsss.core.stage1.refine import crf_available

LUAD = get_preset("wsss4luad")


# ---------------------------------------------------------------------------------------------
# pure numpy
# ---------------------------------------------------------------------------------------------
class _HalfTissue:
    """A tissue mask stand-in: tissue only left of level-0 x = ``edge``."""

    def __init__(self, edge: float) -> None:
        self.edge = edge

    def box_fraction(self, x0: float, y0: float, w0: float, h0: float) -> float:
        return float(max(0.0, min(1.0, (self.edge - x0) / w0)))


def test_plan_cams_tiles_the_canvas_and_skips_glass():
    # 10,000 x 6,000 level-0 px at 4x working resolution: 2500 x 1500 canvas under a 4096 max side
    plan = plan_cams((10_000, 6_000), 4.0, 512, 4096)
    assert plan.shape == (1500, 2500) and plan.downsample == 4.0 and plan.tile == 512 and plan.tile_work == 512
    assert plan.tiles == [(ty, tx) for ty in range(3) for tx in range(5)]  # last row/column cropped at the edge
    # a max side below the working size coarsens the canvas, the tile keeps its model-pixel size
    small = plan_cams((10_000, 6_000), 4.0, 512, 1000)
    assert small.shape == (600, 1000) and small.downsample == 10.0 and small.tile_work == 512 and small.tile == 205
    # tiles without tissue are not planned
    half = plan_cams((10_000, 6_000), 4.0, 512, 4096, tissue=_HalfTissue(5000))
    assert {tx for _ty, tx in half.tiles} == {0, 1, 2}
    canvas = CamCanvas.empty(3, plan.shape, plan.tile, plan.downsample)
    assert canvas.probs.shape == (3, 3, 5)


def _random_canvas(seed: int = 0, side: int = 96, tile: int = 32) -> CamCanvas:
    rng = np.random.default_rng(seed)
    canvas = CamCanvas.empty(LUAD.num_classes, (side, side + 16), tile, 4.0)
    for ty in range(canvas.probs.shape[1]):
        for tx in range(canvas.probs.shape[2]):
            if (ty, tx) == (0, 0):
                continue  # one tile not computed: stays background
            sy, sx = canvas.tile_slices(ty, tx)
            h, w = sy.stop - sy.start, sx.stop - sx.start
            rgb = rng.integers(120, 200, (h, w, 3), dtype=np.uint8)
            rgb[: h // 2, : w // 3] = 250  # a block of white glass
            canvas.put(ty, tx, rng.random((LUAD.num_classes, h, w), dtype=np.float32),
                       rng.random(LUAD.num_classes, dtype=np.float32), rgb)
    return canvas


def test_pseudo_from_canvas_is_cams_pseudo_mask_of_the_whole_slide():
    """The Review canvas, the image folders and stage two's MLPS sets make pseudo-masks with the
    same rule: the canvas's mask is ``core.stage1.cams.pseudo_mask`` of the whole slide, gated once by the
    slide-level probabilities and normalised once per class, with the white-glass rule."""
    canvas = _random_canvas()
    for thr, gate in ((0.2, 0.5), (0.6, 0.9), (0.0, 0.0)):
        mask = pseudo_from_canvas(canvas, LUAD, thr, gate, 200)
        assert (mask[canvas.tile_slices(0, 0)] == LUAD.background_index).all()
        expect = pseudo_mask(canvas.cams, LUAD, rgb=canvas.rgb, probs=slide_probs(canvas), prob_threshold=gate,
                             bg_threshold=thr)
        np.testing.assert_array_equal(mask, expect)
        assert (mask == LUAD.background_index).any() and (mask < LUAD.background_index).any()
        # the review's display: tissue below the threshold is "uncertain", glass stays background
        shown = pseudo_from_canvas(canvas, LUAD, thr, gate, 200, uncertain=True)
        low = (mask == LUAD.background_index) & (shown != LUAD.background_index)
        assert (shown[low] == uncertain_index(LUAD)).all() and (low.any() == (thr > 0))
        np.testing.assert_array_equal(np.where(low, LUAD.background_index, shown), mask)
        np.testing.assert_array_equal(with_uncertain(mask, canvas, LUAD, 200), shown)
    # without the white rule the glass block gets tissue classes
    assert (pseudo_from_canvas(canvas, LUAD, 0.0, 0.0, None)[canvas.tile_slices(1, 1)] < LUAD.background_index).all()


def test_canvas_scores_are_cached_until_a_tile_arrives():
    canvas = _random_canvas(1)
    before = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, 200)
    assert any(k[0] == "scores" for k in canvas.cache)  # the threshold-independent scores are cached
    sy, sx = canvas.tile_slices(1, 1)
    shape = (sy.stop - sy.start, sx.stop - sx.start)
    cams = np.zeros((LUAD.num_classes,) + shape, np.float32)
    cams[2] = 5.0  # "normal" everywhere, stronger than anything on the slide
    canvas.put(1, 1, cams, np.array([0.0, 0.0, 1.0], np.float32), canvas.rgb[sy, sx])
    after = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, 200)
    tissue = ~np.asarray(canvas.cache[next(k for k in canvas.cache if k[0] == "outside")])[sy, sx]
    assert (after[sy, sx][tissue] == 2).all() and not (before[sy, sx][tissue] == 2).all()
    # the new peak of "normal" re-normalises it over the whole slide: weaker elsewhere now
    assert (after == 2).sum() < (before == 2).sum() + tissue.sum()


def test_threshold_moves_change_only_the_pixels_between_the_thresholds():
    """A CAM-threshold move through the sorted index gives exactly the whole-slide mask at the new
    threshold, touching only the pixels whose score lies in between; corrections are kept."""
    canvas = _random_canvas(2)
    index = ThresholdIndex(canvas, LUAD, 0.5, 200)
    assert index.fits(canvas, 0.5, 200) and not index.fits(canvas, 0.6, 200)
    edits = Corrections(pseudo_from_canvas(canvas, LUAD, 0.3, 0.5, 200, uncertain=True), LUAD.num_classes)
    edits.data[5, 40] = 1  # a painted pixel
    edits.touched[5, 40] = True
    painted = edits.flag()[5, 40]
    shown = 0.3
    for thr in (0.5, 0.45, 0.1, 0.0, 0.8):
        flat, values = index.changed(shown, thr)
        whole = pseudo_from_canvas(canvas, LUAD, thr, 0.5, 200, uncertain=True)
        before = edits.auto.copy()
        edits.set_auto_at(flat, values)
        np.testing.assert_array_equal(edits.auto, whole)
        assert set(np.flatnonzero(before != whole)) <= set(flat.tolist())
        assert len(flat) < whole.size
        shown = thr
    assert edits.data[5, 40] == 1 and (edits.flag()[5, 40] or not painted)


def test_overlapping_tiles_blend_to_the_field_they_cut():
    """Tiles widened by a margin and blended with the cosine window add up to a partition of
    unity: a field cut into overlapping boxes comes back exactly, so tile edges cannot show;
    the CAMs are zero off the tissue mask."""
    plan = plan_cams((400 * 4, 300 * 4), 4.0, 64, 4096)
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    field = np.stack([np.sin(yy / 17) + 2, np.cos(xx / 23) + 2, (yy + xx) / 700])
    tissue = np.ones((300, 400), bool)
    tissue[:, :20] = False
    canvas = CamCanvas.empty(3, plan.shape, plan.tile, plan.downsample, tissue=tissue)
    for ty, tx in plan.tiles:
        sy, sx = plan.box(ty, tx)
        assert sy.start == max(0, ty * plan.tile - plan.margin) and sx.stop == min(400, (tx + 1) * plan.tile + plan.margin)
        canvas.put(ty, tx, field[:, sy, sx], np.ones(3, np.float32), np.zeros((sy.stop - sy.start, sx.stop - sx.start, 3), np.uint8), (sy, sx))
    np.testing.assert_allclose(canvas.cams[:, :, 20:], field[:, :, 20:], rtol=1e-5)
    assert (canvas.cams[:, :, :20] == 0).all() and canvas.peaks()[0] == pytest.approx(field[0, :, 20:].max())


def test_undo_puts_back_the_strokes_old_values():
    """Undo keeps its own history of napari's paint atoms (no private layer state)."""
    class Atom:
        def __init__(self, key, mask, old):
            self.slice_key, self.mask, self.old_values = key, mask, old

    e = Corrections(np.zeros((4, 4), np.uint8), 3)
    m = np.array([[True, False], [False, True]])
    e.data[0:2, 0:2][m] = 3
    e.record([Atom((slice(0, 2), slice(0, 2)), m, np.array([1, 1], np.uint8))])
    e.data[3, 3] = 0
    e.record([(np.array([[3], [3]]), np.array([1], np.uint8), 0)])
    assert e.flag().sum() == 3
    assert e.undo() and e.data[3, 3] == 1 and e.flag().sum() == 2
    assert e.undo() and (e.data == 1).all() and not e.flag().any()
    assert not e.undo()


def test_undo_after_a_threshold_move_gives_the_automatic_value_of_now():
    """A stroke painted, thresholds moved (the automatic mask changed under it), then undo: the
    pixels go back to what the automatic mask says now, not to the stale value of before the
    stroke; a pixel corrected before the stroke keeps that correction."""
    e = Corrections(np.zeros((4, 4), np.uint8), 3)
    e.data[1, 1] = 3  # an earlier correction
    e.record([(np.array([[1], [1]]), np.array([1], np.uint8), 3)])
    e.data[0, 0] = e.data[1, 1] = 2  # the stroke: one automatic pixel, one corrected pixel
    e.record([(np.array([[0, 1], [0, 1]]), np.array([1, 3], np.uint8), 2)])
    e.set_auto(np.full((4, 4), 1, np.uint8))  # thresholds moved: the automatic class is now 1
    assert e.data[0, 0] == 2 and e.data[1, 1] == 2 and e.data[2, 2] == 2  # painted pixels kept
    e.data[0, 0] = 3  # touched but left; undo must still reach it
    assert e.undo()
    assert e.data[0, 0] == 2 and not e.flag()[0, 0]  # automatic value of now (class 1 -> 2)
    assert e.data[1, 1] == 3 and e.flag()[1, 1]  # the earlier correction is back


def test_corrections_keep_the_users_pixels():
    auto = np.zeros((6, 6), np.uint8)
    e = Corrections(auto.copy(), LUAD.num_classes)
    assert (e.data == 1).all() and not e.flag().any()
    # paint class 1 over a block, erase one pixel, and paint a pixel with the value it already had
    e.data[0:2, 0:2] = 2
    e.data[5, 5] = 0
    e.touch_from_paint([(np.array([[0, 0, 1, 1, 5, 4], [0, 1, 0, 1, 5, 4]]), None, None)])
    assert e.flag().sum() == 5 and not e.flag()[4, 4]
    np.testing.assert_array_equal(np.bincount(e.corrected()[e.flag()], minlength=4), [0, 4, 0, 1])
    np.testing.assert_array_equal(e.area_per_class(), [0, 4, 0, 1])
    # new automatic values (thresholds moved): corrected pixels stay, others follow
    new = np.full((6, 6), 2, np.uint8)
    e.set_auto(new)
    assert (e.data[0:2, 0:2] == 2).all() and e.data[5, 5] == 0 and e.data[3, 3] == 3 and e.data[4, 4] == 3
    assert e.flag().sum() == 5
    # a region update, then "undo" of a stroke (value back to automatic) clears its flag
    e.set_auto(np.zeros((2, 2), np.uint8), (slice(0, 2), slice(0, 2)))
    assert e.flag()[0:2, 0:2].all()
    e.data[0:2, 0:2] = e.auto[0:2, 0:2] + 1
    assert not e.flag()[0:2, 0:2].any()
    masks = e.masks()
    assert set(masks) == {MASK_PSEUDO, MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED}
    assert masks[MASK_CORRECTED][5, 5] == LUAD.background_index and masks[MASK_CORRECTED_FLAG].sum() == 1
    masks[MASK_PSEUDO][:] = 9  # copies: writing them out cannot race the editor
    assert (e.auto != 9).all()


def test_touch_from_paint_accepts_slice_key_atoms():
    class Atom:
        def __init__(self, key, mask=None):
            self.slice_key, self.mask = key, mask

    e = Corrections(np.zeros((4, 4), np.uint8), 3)
    e.touch_from_paint([Atom((slice(0, 2), slice(0, 2)), np.array([[True, False], [False, True]])),
                        Atom((slice(3, 4), slice(3, 4)))])
    assert e.touched.sum() == 3 and e.touched[0, 0] and e.touched[1, 1] and e.touched[3, 3]


def test_review_settings_are_checked():
    ReviewSettings().validate()
    for bad in (dict(mode="nope"), dict(tile=8), dict(cam_threshold=1.5), dict(gating=-0.1), dict(white_level=300)):
        with pytest.raises(HistoWSSSError, match="review setting"):
            ReviewSettings(**bad).validate()


# ---------------------------------------------------------------------------------------------
# a project on the CMU slide with a tiny trained classifier
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, cmu_svs) -> tuple[Path, str]:
    project, sid = labelled_project_with_classifier(tmp_path_factory.mktemp("review") / "case.wsss", cmu_svs)
    return project.root, sid


@pytest.fixture
def case(trained, tmp_path) -> tuple[Project, str]:
    """A fresh copy of the trained project (tests write masks into it)."""
    root, sid = trained
    shutil.copytree(root, tmp_path / "case.wsss")
    return Project.open(tmp_path / "case.wsss"), sid


_CLI = ["--tile", "128", "--mode", "last", "--device", "cpu"]


def _masks(project: Project, sid: str, names) -> dict:
    p = Project.open(project.root)
    return {n: p.read_mask(sid, n) for n in names}


def test_cams_command_writes_the_layers_and_refuses_to_replace_them(case, capsys):
    project, sid = case
    assert main(["cams", str(project.root), *_CLI]) == 0
    got = _masks(project, sid, COMPUTED_MASKS)
    cam, ds = got[MASK_CAM]
    probs, pds = got[MASK_CAM_PROBS]
    pseudo, pds2 = got[MASK_PSEUDO]
    assert cam.dtype == np.float16 and cam.shape[0] == LUAD.num_classes and cam.shape[1:] == pseudo.shape
    assert ds == pds2 and pds == pytest.approx(ds * int(round(pds / ds)))
    assert np.nanmin(cam) >= 0 and np.nanmax(cam) <= 1
    assert probs.shape[1:] == (int(np.ceil(cam.shape[1] / (pds / ds))), int(np.ceil(cam.shape[2] / (pds / ds))))
    computed = ~np.isnan(probs[0])
    assert computed.any() and (~computed).any()  # glass tiles are skipped
    assert set(np.unique(pseudo)) <= set(range(LUAD.background_index + 1)) and len(np.unique(pseudo)) >= 2
    # what was saved is the canvas of the job's tiles and its automatic mask at the default
    # thresholds (CAM 0.2, gating 0.5: the tiny run has no validation masks to calibrate it)
    # (and, by default, refined by the dense CRF of pseudo-masks when pydensecrf is there)
    refine = "crf" if crf_available() else "none"
    canvas = CamCanvas.empty(LUAD.num_classes, pseudo.shape, int(round(pds / ds)), ds,
                             tissue=tissue_on_canvas(project, sid, pseudo.shape, ds), rule="raw")
    canvas.refine, canvas.work_downsample = refine, project.grid(sid).downsample
    for ev in compute_slide_cams(project, sid, Path(project.runs_dir) / RUN,
                                 ReviewSettings(mode="last", tile=128, device="cpu"), save=False):
        if isinstance(ev, CamTile):
            canvas.put(ev.ty, ev.tx, ev.cams, ev.probs, ev.rgb, ev.box, logits=ev.logits)
    assert ev.kind == "done" and ev.metrics["written"] == [] and ev.metrics["gating"] == 0.5
    assert ev.metrics["refine"] == refine
    assert ev.metrics["rule"] == "raw" and ev.metrics["offsets"] == [0.0] * LUAD.num_classes  # no validation masks
    # saved normalised once per slide: each class's strongest pixel is 1
    np.testing.assert_allclose(cam, canvas.cams / canvas.peaks()[:, None, None], atol=1e-3)
    assert np.nanmax(cam.reshape(cam.shape[0], -1), axis=1) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(probs, canvas.probs.astype(np.float16))
    np.testing.assert_array_equal(pseudo, pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, 200))
    # the default rule is pseudo-masks' raw argmax: on tissue, each pixel is the gated class with
    # the largest logit (the softmax of the winner is at least 1/k, so the CAM threshold 0.2 marks
    # nothing uncertain), and the logits are saved with the mask; the dense CRF then moves
    # borders (most pixels keep the argmax) and never brings back a class the gating removed
    logits, lds = got[MASK_CAM_LOGITS]
    assert lds == ds and logits.dtype == np.float16
    np.testing.assert_allclose(logits, canvas.logits, atol=2e-2, rtol=2e-3)
    allowed = slide_probs(canvas) >= 0.5
    allowed[int(np.argmax(slide_probs(canvas)))] = True
    z = np.where(allowed[:, None, None], canvas.logits, -np.inf)
    tissue = ~outside_canvas(canvas, 200)
    plain = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, 200, refined=False)
    np.testing.assert_array_equal(plain[tissue], np.argmax(z, axis=0)[tissue])
    assert set(np.unique(pseudo[tissue])) <= set(np.flatnonzero(allowed).tolist())
    agree = (pseudo[tissue] == plain[tissue]).mean()
    assert agree == 1.0 if refine == "none" else 0.7 < agree < 1.0, agree
    assert (pseudo[~tissue] == LUAD.background_index).all()
    # reopened, the canvas keeps the rule and gives the same mask (up to the white-glass rule on
    # the slide read again at canvas resolution, and float16 storage)
    again = load_canvas(Project.open(project.root), sid, refine)
    assert again.rule == "raw" and again.refine == refine
    assert (pseudo_from_canvas(again, LUAD, 0.2, 0.5, 200) == pseudo).mean() > 0.98
    # the earlier rule stays a switch; it writes no logits, and removes stale ones
    assert main(["cams", str(project.root), *_CLI, "--rule", "normalised", "--overwrite"]) == 0
    assert MASK_CAM_LOGITS not in Project.open(project.root).mask_names(sid)
    old = load_canvas(Project.open(project.root), sid)
    assert old.rule == "normalised"
    assert (Project.open(project.root).read_mask(sid, MASK_PSEUDO)[0] == pseudo_from_canvas(old, LUAD, 0.2, 0.5, 200)).mean() > 0.98
    assert main(["cams", str(project.root), *_CLI, "--overwrite"]) == 0
    capsys.readouterr()
    # again without --overwrite: a one-line error, nothing replaced
    before = {n: Path(project.root, "masks", sid, n, "zarr.json").stat().st_mtime_ns for n in COMPUTED_MASKS}
    assert main(["cams", str(project.root), *_CLI]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite" in err and sid in err and "cam_probs" in err
    assert before == {n: Path(project.root, "masks", sid, n, "zarr.json").stat().st_mtime_ns for n in COMPUTED_MASKS}
    # bad choices are one-line errors too
    assert main(["cams", str(project.root), "--run", "cls-nope", "--overwrite", *_CLI]) == 2
    assert "cls-nope" in capsys.readouterr().err
    assert main(["cams", str(project.root), "--slide", "nope", *_CLI]) == 2
    assert "unknown slide id 'nope'" in capsys.readouterr().err


def test_cams_command_never_replaces_the_pathologists_work(case):
    project, sid = case
    assert main(["cams", str(project.root), *_CLI]) == 0
    pseudo, ds = project.read_mask(sid, MASK_PSEUDO)
    edits = Corrections(pseudo.copy(), LUAD.num_classes)
    edits.data[10:20, 10:20] = 1  # painted tumour
    edits.touched[10:20, 10:20] = True
    edits.reviewed[:50] = True
    for name, arr in edits.masks().items():
        if name != MASK_PSEUDO:
            project.write_mask(sid, name, arr, ds)
    work = _masks(project, sid, (MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED))
    # recompute with another threshold: the automatic mask changes, the corrections do not
    assert main(["cams", str(project.root), "--overwrite", "--cam-threshold", "0.9", *_CLI]) == 0
    after = _masks(project, sid, (MASK_PSEUDO, MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED))
    assert (after[MASK_PSEUDO][0] == LUAD.background_index).sum() > (pseudo == LUAD.background_index).sum()
    for name, (arr, mds) in work.items():
        np.testing.assert_array_equal(after[name][0], arr)
        assert after[name][1] == mds
    # the Review panel's "Load saved" puts the corrections back on top of the new automatic mask
    loaded = load_corrections(project, sid, after[MASK_PSEUDO][0], after[MASK_PSEUDO][1])
    assert (loaded.corrected()[10:20, 10:20] == 0).all() and loaded.reviewed[:50].all()
    np.testing.assert_array_equal(loaded.flag(), work[MASK_CORRECTED_FLAG][0].astype(bool))


def test_compute_cancel_writes_nothing_or_the_computed_tiles(case):
    project, sid = case
    settings = ReviewSettings(mode="last", tile=128, device="cpu")
    seen = []

    def stop_after_two() -> bool:
        return len(seen) >= 2

    events = []
    for ev in compute_slide_cams(project, sid, Path(project.runs_dir) / RUN, settings, stop_after_two, keep_partial=False):
        events.append(ev)
        if isinstance(ev, CamTile):
            seen.append(ev)
    assert events[0].kind == "start" and events[-1].kind == "cancelled" and len(seen) == 2
    assert "nothing was written" in events[-1].message and events[-1].metrics["written"] == []
    assert not set(COMPUTED_MASKS) & set(project.mask_names(sid))
    # the Review panel keeps what it computed
    seen.clear()
    for last in compute_slide_cams(project, sid, Path(project.runs_dir) / RUN, settings, stop_after_two):
        seen += [last] if isinstance(last, CamTile) else []
    assert last.kind == "cancelled" and last.metrics["tiles"] == 2 < last.metrics["tiles_planned"]
    probs, _ = project.read_mask(sid, MASK_CAM_PROBS)
    assert int((~np.isnan(probs[0])).sum()) == 2
    # a generator closed early (GUI worker, second Ctrl-C) also keeps its tiles
    gen = compute_slide_cams(project, sid, Path(project.runs_dir) / RUN, settings, overwrite=True)
    assert next(gen).kind == "start" and isinstance(next(gen), CamTile)
    gen.close()
    probs, _ = project.read_mask(sid, MASK_CAM_PROBS)
    assert int((~np.isnan(probs[0])).sum()) == 1


def test_corrections_saved_at_another_resolution_are_resampled(case):
    project, sid = case
    assert main(["cams", str(project.root), *_CLI]) == 0
    pseudo, ds = project.read_mask(sid, MASK_PSEUDO)
    # corrections made on a mask twice as coarse (an earlier, smaller max. side)
    coarse = (int(np.ceil(pseudo.shape[0] / 2)), int(np.ceil(pseudo.shape[1] / 2)))
    flag = np.zeros(coarse, bool)
    flag[5:10, 5:10] = True
    project.write_mask(sid, MASK_CORRECTED, np.full(coarse, 1, np.uint8), ds * 2)
    project.write_mask(sid, MASK_CORRECTED_FLAG, flag, ds * 2)
    edits = load_corrections(project, sid, np.full(pseudo.shape, 0, np.uint8), ds)
    assert edits.flag()[10:20, 10:20].all() and edits.flag().sum() == 100
    assert (edits.corrected()[edits.flag()] == 1).all()


def test_stage_two_reads_what_the_command_wrote(case):
    """``train-seg`` on a project needs its pseudo-masks; ``histo-wsss cams`` makes them headless."""
    from napari_histo_wsss.core.data.datasets import load_dataset
    from napari_histo_wsss.core.stage2.train import _project_samples

    project, sid = case
    spec = load_dataset(project.root)
    with pytest.raises(HistoWSSSError, match="no pseudo-mask"):
        _project_samples(spec)
    assert main(["cams", str(project.root), *_CLI]) == 0
    samples = _project_samples(load_dataset(project.root))
    assert len(samples) == 16
    masks = [s.masks[0]() for s in samples]
    assert all(m.shape == (32, 32) for m in masks) and any((m < LUAD.background_index).any() for m in masks)


def test_recomputing_keeps_every_corrected_pixel(case):
    """The Review panel recomputes CAMs on the saved state: new tiles replace automatic values only.
    A pixel painted "background / exclude" (the automatic background value) stays corrected too."""
    project, sid = case
    assert main(["cams", str(project.root), *_CLI]) == 0
    pseudo, ds = project.read_mask(sid, MASK_PSEUDO)
    tissue = np.argwhere(pseudo < LUAD.background_index)
    (r0, c0), (r1, c1) = tissue[0], tissue[-1]
    edits = Corrections(pseudo.copy(), LUAD.num_classes)
    edits.data[r0, c0] = LUAD.background_index + 1  # painted "background / exclude"
    edits.data[r1, c1] = (pseudo[r1, c1] + 1) % LUAD.num_classes + 1  # another tissue class
    edits.touched[[r0, r1], [c0, c1]] = True
    for name, arr in edits.masks().items():
        project.write_mask(sid, name, arr, ds)
    plan = plan_slide_cams(project, sid, 128, 4096)
    state = corrections_for_plan(project, sid, plan)
    np.testing.assert_array_equal(state.flag(), edits.flag())
    canvas = CamCanvas.empty(LUAD.num_classes, plan.shape, plan.tile, plan.downsample)
    new = (int(edits.corrected()[r1, c1]) + 1) % LUAD.num_classes  # differs from both corrections
    for ty, tx in plan.tiles:  # every tile arrives with a new automatic mask
        sy, sx = canvas.tile_slices(ty, tx)
        state.set_auto(np.full((sy.stop - sy.start, sx.stop - sx.start), new, np.uint8), (sy, sx))
    assert state.flag()[r0, c0] and state.flag()[r1, c1] and state.flag().sum() == 2
    np.testing.assert_array_equal(state.corrected()[[r0, r1], [c0, c1]], edits.corrected()[[r0, r1], [c0, c1]])
    # with a saved mask of another raster the automatic values start as background
    other = corrections_for_plan(project, sid, plan_slide_cams(project, sid, 128, 200))
    assert other.auto.shape != pseudo.shape and (other.auto == LUAD.background_index).all()


def _edge_boundary_rates(mask: np.ndarray, valid: np.ndarray, tile: int) -> tuple[np.ndarray, float]:
    """Share of pixel pairs across each interior tile edge (rows, then columns) whose classes
    differ, and the same share's median over all other lines: a straight-line class boundary
    along a tile edge shows as an edge far above the median."""
    rates, other = [], []
    for arr, ok in ((mask, valid), (mask.T, valid.T)):
        pair = ok[1:] & ok[:-1]
        diff = (arr[1:] != arr[:-1]) & pair
        per_line = diff.sum(axis=1) / np.maximum(pair.sum(axis=1), 1)
        enough = pair.sum(axis=1) >= 16
        at_edge = (np.arange(1, arr.shape[0]) % tile) == 0
        rates += per_line[at_edge & enough].tolist()
        other += per_line[~at_edge & enough].tolist()
    return np.array(rates), float(np.median(other))


def test_no_class_boundary_along_tile_edges_on_the_bundled_slide(case):
    """Gating and normalisation are decided per slide and tiles are blended, so the pseudo-mask
    of the bundled slide shows no straight line along tile edges; the per-tile rule the review
    used before (each tile gated and normalised on its own) does, on the same CAMs."""
    project, sid = case
    plan = plan_slide_cams(project, sid, 128, 4096)
    canvas = CamCanvas.empty(LUAD.num_classes, plan.shape, plan.tile, plan.downsample,
                             tissue=tissue_on_canvas(project, sid, plan.shape, plan.downsample))
    for ev in compute_slide_cams(project, sid, Path(project.runs_dir) / RUN,
                                 ReviewSettings(mode="last", tile=128, device="cpu"), save=False, plan=plan):
        if isinstance(ev, CamTile):
            canvas.put(ev.ty, ev.tx, ev.cams, ev.probs, ev.rgb, ev.box)
    assert len(canvas.computed_tiles()) >= 6
    valid = canvas.computed_region() & canvas.tissue
    mask = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, 200, uncertain=True)
    assert len(np.unique(mask[valid])) >= 2  # a mask with boundaries to look at
    edges, typical = _edge_boundary_rates(mask, valid, plan.tile)
    assert edges.size and edges.max() <= max(3 * typical, 0.1), (edges.max(), typical)
    # the old per-tile rule on the same CAMs: straight boundaries along tile edges
    per_tile = np.full(plan.shape, LUAD.background_index, np.uint8)
    for ty, tx in canvas.computed_tiles():
        sy, sx = canvas.tile_slices(ty, tx)
        per_tile[sy, sx] = pseudo_mask(canvas.cams[:, sy, sx], LUAD, rgb=canvas.rgb[sy, sx],
                                       probs=canvas.probs[:, ty, tx], bg_threshold=0.2)
    old_edges, old_typical = _edge_boundary_rates(per_tile, valid, plan.tile)
    assert old_edges.max() > max(3 * old_typical, 0.1), (old_edges.max(), old_typical)


def test_each_image_of_a_patch_folder_is_gated_on_its_own():
    """On a patch folder's sheet a class present in one image is not allowed in the others: each
    image is gated on its own probabilities, also in the index a threshold move uses and after the
    canvas is read back; before they are known, the tiles an image touches stand in."""
    from napari_histo_wsss.core.review import ThresholdIndex

    h, w = 64, 160
    canvas = CamCanvas.empty(LUAD.num_classes, (h, w), 32, 1.0, rule="raw")
    canvas.regions = [(0, 64, 0, 64), (0, 64, 96, 160)]
    canvas.tissue = canvas.region_raster() >= 0
    logits = np.full((LUAD.num_classes, h, w), -6.0, np.float32)
    logits[0, :, :64] = 2.0            # image 0: tumour
    logits[1, 20:28, 20:28] = 4.0      # ... with a small spot where stroma's logit is higher
    logits[1, :, 96:] = 3.0            # image 1: stroma
    rgb = np.full((h, w, 3), 150, np.uint8)
    for ty in range(2):
        for tx in range(5):
            sy, sx = canvas.tile_slices(ty, tx)
            tile_probs = np.array([0.9 if tx < 2 else 0.1, 0.9 if tx >= 3 else 0.1, 0.0], np.float32)
            canvas.put(ty, tx, np.zeros((3, 32, 32), np.float32), tile_probs, rgb[sy, sx], logits=logits[:, sy, sx])
    # before the images are classified: the tiles each image touches
    np.testing.assert_allclose(canvas.region_probs(), [[0.9, 0.1], [0.1, 0.9], [0.0, 0.0]])
    canvas.set_region_probs(np.array([[0.95, 0.05], [0.2, 0.97], [0.01, 0.02]]))
    mask = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None)
    assert (mask[:, :64] == 0).all() and (mask[:, 96:] == 1).all()  # the spot stays tumour
    assert (mask[:, 64:96] == LUAD.background_index).all()
    index = ThresholdIndex(canvas, LUAD, 0.5, None)  # what a threshold move uses: the same classes
    np.testing.assert_array_equal(index.classes, mask.ravel()[index.pixels])
    # the sheet-wide gating would have let stroma into image 0's spot
    canvas.regions = None
    canvas.cache = {}
    assert (pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None)[20:28, 20:28] == 1).all()


# ---------------------------------------------------------------------------------------------
# the dense CRF on the canvas (pseudo-masks' default refinement, also the Review's)
# ---------------------------------------------------------------------------------------------
def _blurry_border_canvas(refine: str = "crf") -> tuple[CamCanvas, int, int]:
    """A 64 x 128 raw-rule canvas whose logits switch from tumour to stroma at x = 48 with a soft
    ramp, over an image whose stain edge is at x = 64 (purple tumour left of it, pink stroma right)."""
    h, w, stain_edge, logit_edge = 64, 128, 64, 48
    canvas = CamCanvas.empty(LUAD.num_classes, (h, w), 64, 2.0, rule="raw")
    canvas.refine, canvas.work_downsample = refine, 2.0
    x = np.arange(w, dtype=np.float32)
    ramp = np.clip((x - logit_edge) / 40.0, -1, 1)  # soft: the logits cannot place the border
    logits = np.zeros((LUAD.num_classes, h, w), np.float32)
    logits[0] = -1.5 * ramp
    logits[1] = 1.5 * ramp
    logits[2] = -8.0
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :stain_edge] = (90, 40, 140)     # tumour: dense haematoxylin
    rgb[:, stain_edge:] = (230, 140, 180)   # stroma: eosin
    for tx in range(2):
        sy, sx = canvas.tile_slices(0, tx)
        canvas.put(0, tx, np.zeros((3, h, 64), np.float32), np.array([0.9, 0.9, 0.01], np.float32), rgb[sy, sx],
                   logits=logits[:, sy, sx])
    return canvas, logit_edge, stain_edge


def _border(mask: np.ndarray) -> float:
    """Mean x of the first stroma pixel per row."""
    return float(np.mean([np.argmax(row == 1) for row in mask]))


@pytest.mark.skipif(not crf_available(), reason="pydensecrf not installed")
def test_refined_canvas_moves_the_class_border_to_the_stain_edge():
    """With ``refine="crf"`` (the Review default) the canvas's mask comes from a dense CRF over the
    canvas's RGB: the border the upsampled logits put at x = 48 moves to the stain edge at x = 64;
    unrefined it stays at the logits' border. The threshold index and the whole mask agree."""
    canvas, logit_edge, stain_edge = _blurry_border_canvas("crf")
    refined = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None)
    plain = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None, refined=False)
    assert abs(_border(plain) - logit_edge) <= 1
    assert abs(_border(refined) - stain_edge) <= 2, _border(refined)
    assert set(np.unique(refined)) == {0, 1}  # normal, gated off, never comes back
    index = ThresholdIndex(canvas, LUAD, 0.5, None)
    np.testing.assert_array_equal(index.classes, refined.ravel()[index.pixels])
    # the same canvas unrefined: the logits' border, and an index that no longer fits
    canvas.refine = "none"
    assert not index.fits(canvas, 0.5, None)
    np.testing.assert_array_equal(pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None), plain)


@pytest.mark.skipif(not crf_available(), reason="pydensecrf not installed")
def test_pseudo_updates_show_the_unrefined_mask_first_and_can_stop_in_the_crf():
    from napari_histo_wsss.core.review import pseudo_updates, refined_labels

    canvas, _, stain_edge = _blurry_border_canvas("crf")
    events = list(pseudo_updates(canvas, LUAD, 0.2, 0.5, None, lambda: False))
    assert [e.step for e in events] == [1, 2, 3] and events[-1].index is not None
    np.testing.assert_array_equal(events[0].mask, pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None, uncertain=True,
                                                                     refined=False))
    np.testing.assert_array_equal(events[1].mask, pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None, uncertain=True))
    assert abs(_border(events[1].mask) - stain_edge) <= 2
    # refined labels are cached: the next gating move back costs no CRF (one whole mask, then the index)
    assert [e.step for e in pseudo_updates(canvas, LUAD, 0.2, 0.5, None, lambda: False)] == [1, 2]
    # a stop asked during the CRF: nothing refined is cached, nothing more is shown
    fresh, _, _ = _blurry_border_canvas("crf")
    asked = []

    def stop_in_crf() -> bool:
        asked.append(1)
        return len(asked) > 1  # let the job start, stop at the CRF
    shown = list(pseudo_updates(fresh, LUAD, 0.2, 0.5, None, stop_in_crf))
    assert [e.step for e in shown] == [1]
    assert not any(k[0] == "refined" for k in fresh.cache)
    assert refined_labels(fresh, LUAD, 0.5, lambda: True) is None


@pytest.mark.skipif(not crf_available(), reason="pydensecrf not installed")
def test_refining_a_patch_folder_keeps_each_images_own_gating():
    """On a sheet the CRF runs image by image with each image's own classes, as pseudo-masks runs
    it: a class gated off in one image never comes back there, whatever its neighbours hold."""
    canvas, _, _ = _blurry_border_canvas("crf")
    canvas.regions = [(0, 64, 0, 60), (0, 64, 68, 128)]
    canvas.tissue = canvas.region_raster() >= 0
    canvas.set_region_probs(np.array([[0.95, 0.05], [0.9, 0.97], [0.01, 0.02]]))  # image 0: tumour only
    mask = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None)
    assert (mask[:, :60] == 0).all()
    assert set(np.unique(mask[:, 68:])) <= {0, 1} and (mask[:, 68:] == 1).mean() > 0.9
    assert (mask[:, 60:68] == LUAD.background_index).all()


def test_crf_kernels_follow_the_canvas_resolution():
    from napari_histo_wsss.core.stage1.refine import CRFParams

    p = CRFParams()
    half = p.scaled(0.5)  # a canvas twice as coarse as the model's input
    assert half.bilateral_sxy == p.bilateral_sxy / 2 and half.gaussian_sxy == p.gaussian_sxy / 2
    assert half.bilateral_srgb == p.bilateral_srgb and half.bilateral_compat == p.bilateral_compat
    assert p.scaled(0.01).gaussian_sxy == 1.0  # never below a pixel


# ---------------------------------------------------------------------------------------------
# the prob-area floor of pseudo-masks, on the canvas
# ---------------------------------------------------------------------------------------------
def test_the_area_floor_drops_a_probable_class_that_covers_little_of_the_slide_or_image():
    """A class whose probability passes the gating but that wins under 5 % of the tissue in the
    ungated argmax (logits + the run's raw offsets) is dropped, per slide and per patch-folder image."""
    from napari_histo_wsss.core.review import ThresholdIndex

    h, w = 64, 160
    logits = np.full((LUAD.num_classes, h, w), -6.0, np.float32)
    logits[0, :, :64] = 2.0            # tumour
    logits[1, 20:28, 20:28] = 4.0      # a stroma spot: 64 px, 1.6 % of the tissue left of x = 64
    logits[1, :, 96:] = 3.0            # stroma on the right
    rgb = np.full((h, w, 3), 150, np.uint8)

    def canvas_of(regions, tissue_right: bool) -> CamCanvas:
        canvas = CamCanvas.empty(LUAD.num_classes, (h, w), 32, 1.0, rule="raw")
        canvas.regions = regions
        canvas.tissue = np.zeros((h, w), bool)
        canvas.tissue[:, :64] = True
        canvas.tissue[:, 96:] = tissue_right
        for ty in range(2):
            for tx in range(5):
                sy, sx = canvas.tile_slices(ty, tx)
                canvas.put(ty, tx, np.zeros((3, 32, 32), np.float32), np.array([0.9, 0.9, 0.0], np.float32),
                           rgb[sy, sx], logits=logits[:, sy, sx])
        return canvas

    slide = canvas_of(None, tissue_right=False)  # a slide of tumour with a stroma spot
    assert (pseudo_from_canvas(slide, LUAD, 0.2, 0.5, None)[20:28, 20:28] == 1).all()  # no floor: stroma
    slide.presence = np.array([0.05, 0.0, 0.0, 0.0], np.float32)
    shares, per_image = slide.class_shares(LUAD)
    assert per_image is None and shares == pytest.approx([1 - 64 / 4096, 64 / 4096, 0.0])
    mask = pseudo_from_canvas(slide, LUAD, 0.2, 0.5, None)
    assert (mask[:, :64] == 0).all()  # the spot is tumour: stroma covers under the floor
    np.testing.assert_array_equal(ThresholdIndex(slide, LUAD, 0.5, None).classes,
                                  mask.ravel()[ThresholdIndex(slide, LUAD, 0.5, None).pixels])
    # the offsets move the ungated argmax the floor measures: raw offsets that favour stroma by 9
    # give it the whole left image, so it passes the floor there and tumour does not
    slide.presence = np.array([0.05, 0.0, 9.0, 0.0], np.float32)
    assert (pseudo_from_canvas(slide, LUAD, 0.2, 0.5, None)[:, :64] == 1).all()
    # a patch folder: each image measured on its own (the stroma image does not lift the spot)
    sheet = canvas_of([(0, 64, 0, 64), (0, 64, 96, 160)], tissue_right=True)
    sheet.set_region_probs(np.array([[0.95, 0.9], [0.9, 0.97], [0.01, 0.02]]))
    assert (pseudo_from_canvas(sheet, LUAD, 0.2, 0.5, None)[20:28, 20:28] == 1).all()
    sheet.presence = np.array([0.05, 0.0, 0.0, 0.0], np.float32)
    shares, per_image = sheet.class_shares(LUAD)
    assert per_image.shape == (2, 3) and per_image[0, 1] == pytest.approx(64 / 4096) and per_image[1, 1] == 1.0
    mask = pseudo_from_canvas(sheet, LUAD, 0.2, 0.5, None)
    assert (mask[:, :64] == 0).all() and (mask[:, 96:] == 1).all()


def test_the_runs_area_floor_is_used_by_cams_and_saved_with_the_canvas(case):
    """A run that calibrated the prob-area gating: ``histo-wsss cams`` applies its floor and
    offsets, saves them beside the CAMs, and a canvas read back makes the same mask."""
    import json

    from napari_histo_wsss.core.review import MASK_CAM_PRESENCE

    project, sid = case
    run = Path(project.runs_dir) / RUN
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # as a run with validation masks records it (the tiny run has none)
        r["min_area"] = 1.0
        r["raw_offsets"] = {"raw": [0.0, 0.5, 0.0], "prob-raw": [0.0, 0.0, 0.0], "prob-area": [0.0, -0.5, 0.0]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["cams", str(project.root), *_CLI, "--refine", "none"]) == 0
    reopened = Project.open(project.root)
    saved = reopened.read_mask(sid, MASK_CAM_PRESENCE)[0]
    np.testing.assert_allclose(saved, [[1.0, 0.0, 1.0, 0.0]])
    pseudo = reopened.read_mask(sid, MASK_PSEUDO)[0]
    tissue_classes = set(np.unique(pseudo)) - {LUAD.background_index}
    # a floor of 1: only a class that fills a whole window is left (two windows of 320 model px
    # nearly cover this small slide: 280 x 370 model px)
    assert len(tissue_classes) == 1
    again = load_canvas(reopened, sid)
    np.testing.assert_allclose(again.presence, [1.0, 0.0, 1.0, 0.0])
    assert (pseudo_from_canvas(again, LUAD, 0.2, 0.5, 200) == pseudo).mean() > 0.98
    # the offsets are the prob-area ones (the canvas's logits carry them)
    logits = reopened.read_mask(sid, MASK_CAM_LOGITS)[0].astype(np.float32)
    assert logits.shape[1:] == pseudo.shape
    # without the floor the slide holds both labelled classes: the floor did the gating
    again.presence = None
    again.cache = {}
    assert len(set(np.unique(pseudo_from_canvas(again, LUAD, 0.2, 0.5, 200))) - {LUAD.background_index}) > 1


def test_a_slide_is_measured_in_image_sized_windows_so_a_small_focus_stays():
    """On a whole slide the floor meets a class's best share in windows the size of the images it
    was chosen on: a tumour focus filling one window of a large slide stays, a class scattered
    thinly everywhere does not."""
    from napari_histo_wsss.core.review import SHARE_WINDOW, window_shares

    side, win = 1000, 100
    mask = np.ones((side, side), np.uint8)       # stroma
    mask[::7, ::7] = 2                           # normal sprinkled everywhere: 2 %
    mask[400:500, 600:700] = 0                   # a tumour focus: 1 % of the slide, one whole window
    inside = np.ones_like(mask, bool)
    inside[:, :100] = False                      # glass on the left
    shares = window_shares(mask, inside, LUAD, win)
    assert shares[0] == 1.0 and shares[1] > 0.95 and 0.01 < shares[2] < 0.05
    whole = np.bincount(mask[inside], minlength=3)[:3] / inside.sum()
    assert whole[0] < 0.02  # over the whole slide the focus would fall under any floor above 2 %
    # windows mostly glass do not count; a canvas smaller than a window is measured whole
    only_glass = np.zeros_like(inside)
    only_glass[:60, :60] = True
    np.testing.assert_allclose(window_shares(mask, only_glass, LUAD, win),
                               np.bincount(mask[only_glass], minlength=3)[:3] / only_glass.sum())
    small = mask[:50, :50]
    np.testing.assert_allclose(window_shares(small, np.ones_like(small, bool), LUAD, win),
                               np.bincount(small.ravel(), minlength=3)[:3] / small.size)
    # the canvas: windows of SHARE_WINDOW model pixels, at the canvas's resolution
    canvas = CamCanvas.empty(LUAD.num_classes, (side, side), 250, 4.0, rule="raw")
    canvas.work_downsample = 4.0 * win / SHARE_WINDOW  # so that a window is `win` canvas px
    logits = np.stack([(mask == k).astype(np.float32) for k in range(3)])
    for ty in range(4):
        for tx in range(4):
            sy, sx = canvas.tile_slices(ty, tx)
            canvas.put(ty, tx, np.zeros((3, 250, 250), np.float32), np.array([0.9, 0.9, 0.9], np.float32),
                       np.full((250, 250, 3), 150, np.uint8), logits=logits[:, sy, sx])
    canvas.tissue = inside
    canvas.presence = np.array([0.3, 0.0, 0.0, 0.0], np.float32)
    got, per_image = canvas.class_shares(LUAD)
    assert per_image is None
    np.testing.assert_allclose(got, shares)
    mask_out = pseudo_from_canvas(canvas, LUAD, 0.2, 0.5, None)
    assert (mask_out[400:500, 600:700] == 0).all()  # the focus is kept
    assert not (mask_out == 2).any()                # the sprinkled class is not
