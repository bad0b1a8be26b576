"""Which patches to label next: a quarter targeted at what the live head doubts, the rest a random sample.

A batch of ``n`` suggestions has two parts:

* **targeted** (``n - round(EXPLORE n)`` patches, a quarter): every unlabelled patch scores its **uncertainty** (the
  live head's doubt, the largest binary entropy over the classes it can learn; a patch it calls
  50/50 tumour scores 1) plus its **disagreement** (the largest difference between the live head's
  and the project's trained stage-one classifier's class probabilities, over the classes the head
  can learn; :func:`trained_patch_probs`, when the project has a run),
  times its **typicality** (how densely other patches surround it in feature space: 1 / (1 + its
  mean distance to its 20 nearest patches over the median of that distance), so an odd corner,
  a fold or a blur does not outrank common tissue the head gets wrong). The ``pool_factor * k``
  best are clustered (k-means) and each cluster's most typical patch (its medoid) is suggested,
  so the batch is spread over different doubtful tissue rather than ten copies of one region.
* **random** (``round(EXPLORE n)`` patches, three quarters): a seeded random sample of the other unlabelled patches. It keeps
  the labelled set a fair sample of the slide's tissue mix; a head fitted only on doubtful patches
  learns a skewed class balance (its biases), and that shows in the pixel argmax.

With no labels yet (cold start) the whole batch is a random sample of the tissue patches.

Why this and not the earlier rule (k-means medoids of all patches at a cold start, then
uncertainty plus distance from the labelled patches): on the simulated-annotator benchmark's
development splits (``bench/bench_live_labelling.py --seeds 100 ... 108``; 9 splits each of the
shared WSSS4LUAD and GlaS images, not the reported ones) the earlier rule was below random order at
almost every budget on both sets, typical-patch cold starts included; uncertainty alone helped on
WSSS4LUAD and lost on GlaS; a random share of 0.75 had the best mean over budgets on the two sets
together (0, 0.25, 0.5, 0.75 and 1 compared), though within the spread of two random draws: the
targeted part is not a measured gain over random order, it shows the pathologist where the head is
unsure. On the 30 reported splits of each set it is level with random order at every budget (within
0.022 split for split). ``docs/benchmarks/live_labelling.md`` has the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.stage1.features import (
    FeatureExtractor,
    FeatureSpec,
    build_slide_features,
    slide_features_path,
)
from napari_histo_wsss.core.stage1.live import LiveHead, standardiser

__all__ = ["Suggestion", "suggest", "embed", "typicality", "SuggestedPatch", "project_suggestions",
           "SUGGESTIONS_NAME", "EXPLORE", "trained_patch_probs", "TrainedProbs", "classify_patches"]

#: Share of each batch drawn at random (the rest is targeted); chosen on the development splits.
EXPLORE = 0.75


@dataclass
class Suggestion:
    """One suggested patch: its index among the candidates and why it was chosen."""

    index: int
    score: float
    uncertainty: float
    typicality: float
    disagreement: float
    random: bool = False

    @property
    def reason(self) -> str:
        if self.random:
            return "random sample"
        return "models disagree" if self.disagreement > self.uncertainty else "uncertain"


def embed(pooled: np.ndarray, mean: np.ndarray, std: np.ndarray, dims: int = 32, seed: int = 0) -> np.ndarray:
    """``(N, dims)`` coordinates for distances: standardised features projected on their first
    principal axes (distances in 1,280 raw dimensions are dominated by noise)."""
    x = (np.asarray(pooled, np.float32) - mean) / std
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) <= 1:
        return x[:, :dims]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    d = min(dims, len(s))
    return (u[:, :d] * s[:d]).astype(np.float32)


def typicality(coords: np.ndarray, k: int = 20, reference: int = 2000, seed: int = 0,
               chunk: int = 2048) -> np.ndarray:
    """``(N,)`` in (0, 1]: 1 / (1 + d / median(d)), ``d`` a patch's mean distance to its ``k``
    nearest other patches (among at most ``reference`` patches picked at random, so a slide of
    100,000 patches costs seconds, not an N x N matrix). Dense, common tissue scores near 1/2 or
    above; isolated patches (folds, pen marks, blur) near 0."""
    coords = np.asarray(coords, np.float32)
    n = len(coords)
    if n <= 2:
        return np.ones(n, np.float32)
    ref = np.arange(n) if n <= reference else np.sort(np.random.default_rng(seed).choice(n, reference, replace=False))
    r = coords[ref]
    rn = (r * r).sum(1)
    kk = min(k, len(ref) - 1)
    d = np.empty(n, np.float32)
    for a in range(0, n, chunk):
        c = coords[a:a + chunk]
        d2 = np.maximum((c * c).sum(1)[:, None] + rn[None] - 2.0 * c @ r.T, 0.0)
        part = np.partition(d2, kk, axis=1)[:, : kk + 1]  # the patch itself (distance 0) when it is a reference
        part = np.sort(part, axis=1)
        own = np.isin(np.arange(a, a + len(c)), ref)
        near = np.where(own[:, None], part[:, 1: kk + 1], part[:, :kk])
        d[a:a + len(c)] = np.sqrt(near).mean(1)
    med = float(np.median(d))
    return (1.0 / (1.0 + d / med)).astype(np.float32) if med > 0 else np.ones(n, np.float32)


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _kmeans_medoids(coords: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> list[int]:
    """Indices (into ``coords``) of the medoids of ``k`` k-means clusters (k-means++ start),
    largest cluster first: ``k`` typical and mutually distant points."""
    n = len(coords)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    centres = [coords[int(np.argmin(np.linalg.norm(coords - coords.mean(0), axis=1)))]]
    d2 = np.sum((coords - centres[0]) ** 2, axis=1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(coords[int(rng.choice(n, p=p))])
        d2 = np.minimum(d2, np.sum((coords - centres[-1]) ** 2, axis=1))
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmin(((coords[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = np.stack([coords[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    assign = np.argmin(((coords[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    out = []
    for j in sorted(range(k), key=lambda j: -int(np.sum(assign == j))):
        members = np.flatnonzero(assign == j)
        if len(members):
            out.append(int(members[np.argmin(np.linalg.norm(coords[members] - c[j], axis=1))]))
    return out


def suggest(
    coords: np.ndarray,
    labelled: np.ndarray,
    n: int,
    probs: np.ndarray | None = None,
    trainable: np.ndarray | None = None,
    other_probs: np.ndarray | None = None,
    pool_factor: int = 5,
    explore: float = EXPLORE,
    seed: int = 0,
    typical: np.ndarray | None = None,
) -> list[Suggestion]:
    """The next ``n`` patches to label: the targeted ones first (best first), then the random ones.

    ``coords``: ``(N, D)`` from :func:`embed` for every patch (labelled ones included);
    ``labelled``: ``(N,)`` bool; ``probs``: ``(N, K)`` live-head probabilities (None = cold start);
    ``trainable``: ``(K,)`` classes the head could learn (others carry no uncertainty);
    ``other_probs``: ``(N, K)`` a trained classifier's probabilities, for disagreement;
    ``explore``: share of the batch drawn at random (0: all targeted; a cold start is all random);
    ``seed``: the random part's seed (mixed with the number of labelled patches, so the same
    labels give the same batch, in the GUI and the CLI alike); ``typical``: precomputed
    :func:`typicality` of ``coords`` (computed when None)."""
    coords = np.asarray(coords, np.float32)
    labelled = np.asarray(labelled, bool)
    cand = np.flatnonzero(~labelled)
    if n <= 0 or len(cand) == 0:
        return []
    n = min(n, len(cand))
    rng = np.random.default_rng([int(seed), int(labelled.sum())])
    zeros = np.zeros(len(coords), np.float32)
    unc, dis = zeros, zeros
    if probs is not None:
        h = _entropy(np.asarray(probs, np.float32))
        keep = np.ones(h.shape[1], bool) if trainable is None else np.asarray(trainable, bool)
        unc = h[:, keep].max(axis=1) if keep.any() else zeros
        if other_probs is not None and keep.any():  # only where the live head has an opinion
            diff = np.abs(np.asarray(probs, np.float32) - np.asarray(other_probs, np.float32))
            dis = diff[:, keep].max(axis=1)
    doubt = unc + dis
    informed = bool(np.any(doubt[cand] > 0))
    typ = typicality(coords) if typical is None else np.asarray(typical, np.float32)
    score = doubt * typ
    n_random = n if not informed else int(round(n * min(max(explore, 0.0), 1.0)))
    n_target = n - n_random
    chosen: list[Suggestion] = []
    if n_target:
        pool = cand[np.argsort(-score[cand], kind="stable")[: max(n_target, pool_factor * n_target)]]
        picks = [int(pool[i]) for i in _kmeans_medoids(coords[pool], n_target)]
        picks.sort(key=lambda i: -score[i])
        chosen += [Suggestion(i, float(score[i]), float(unc[i]), float(typ[i]), float(dis[i])) for i in picks]
    if n_random:
        rest = np.setdiff1d(cand, [s.index for s in chosen])
        for i in rng.choice(rest, min(n_random, len(rest)), replace=False).tolist():
            chosen.append(Suggestion(int(i), float(score[i]), float(unc[i]), float(typ[i]), float(dis[i]), random=True))
    return chosen


# ---------------------------------------------------------------------------------------------
# the trained classifier's view of every grid patch, for disagreement
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainedProbs(ProgressEvent):
    """An event of :func:`trained_patch_probs`; the ``done`` one carries ``probs`` ``(N, K)``."""

    probs: np.ndarray | None = None


def _trained_cache_path(project: Any, slide_id: str, run: Path, which: str) -> Path:
    return project.features_dir(slide_id) / f"trained-{run.name}-{which}.npz"


def classify_patches(model: Any, patches: Iterable[np.ndarray], device: Any = "cpu",
                     batch: int = 32) -> Iterator[np.ndarray]:
    """A stage-one classifier's class probabilities (sigmoid) for RGB patches (``(H, W, 3)`` uint8,
    as training reads them), ``batch`` patches at a time: yields one ``(b, K)`` float32 array per
    batch. ``patches`` is read lazily, one batch per step, so a caller that stops between batches
    reads no further patch. The model is put in eval mode."""
    import itertools

    import torch

    from napari_histo_wsss.core.data.datasets import to_tensor

    model.eval()
    it = iter(patches)
    while chunk := list(itertools.islice(it, batch)):
        with torch.no_grad():  # per batch: grad mode is not left off in the caller's thread between batches
            probs = torch.sigmoid(model(torch.stack([to_tensor(p) for p in chunk]).to(device))).float().cpu().numpy()
        yield probs


def trained_patch_probs(project: Any, slide_id: str, grid: Any, run_dir: Any, which: str = "best",
                        device: Any = "cpu", batch: int = 32, model: Any = None,
                        should_stop: Callable[[], bool] = lambda: False) -> Iterator[TrainedProbs]:
    """The class probabilities a trained stage-one classifier gives every patch of a slide's grid.

    Each patch is read as training reads a labelled one (its level-0 box resampled to the
    project's patch size) and classified by the run's ``which`` checkpoint. The result is kept in
    the project's feature folder, tied to the checkpoint (size and modification time), the grid
    and the patch size, and reused while they hold; a project on a read-only disk recomputes.
    Yields ``step`` events, then ``done`` (``probs``) or ``cancelled``. ``model``: an already
    loaded classifier of that run (skips loading it)."""
    from napari_histo_wsss.core.runs import checkpoint_file
    from napari_histo_wsss.core.slides.grid import read_patch
    from napari_histo_wsss.core.stage1.train import load_run

    run = Path(run_dir)
    ckpt = checkpoint_file(run, which)
    patch = int(project.settings["patch_size"])
    xs, ys = np.asarray(grid.x, np.int64), np.asarray(grid.y, np.int64)
    try:
        st = ckpt.stat()
        stamp = np.array([st.st_size, st.st_mtime_ns, int(grid.size0), patch], np.int64)
    except OSError:
        stamp = None
    cache = None if project.read_only else _trained_cache_path(project, slide_id, run, which)
    if cache is not None and stamp is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                if (np.array_equal(z["stamp"], stamp) and np.array_equal(z["x"], xs) and np.array_equal(z["y"], ys)):
                    yield TrainedProbs("done", step=len(xs), steps=len(xs), probs=z["probs"].astype(np.float32),
                                       message=f"slide {slide_id}: {run.name}'s predictions reused")
                    return
        except (OSError, ValueError, KeyError):
            pass  # damaged or from an older layout: recomputed below and rewritten
    if model is None:
        model = load_run(run, which=which, map_location=device)[0]
    n = len(xs)
    out = np.zeros((n, project.classes.num_classes), np.float32)
    with project.open_slide(slide_id) as slide:
        probs = classify_patches(model, (read_patch(slide, int(xs[i]), int(ys[i]), grid.size0, patch)
                                         for i in range(n)), device, batch)
        for start in range(0, n, batch):
            if should_stop():
                yield TrainedProbs("cancelled", step=start, steps=n, message=f"slide {slide_id}: stopped")
                return
            stop = min(n, start + batch)
            out[start:stop] = next(probs)
            yield TrainedProbs("step", step=stop, steps=n,
                               message=f"slide {slide_id}: {run.name} on patch {stop} of {n}")
    if cache is not None and stamp is not None:
        from napari_histo_wsss.core.io.atomic import write_with

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_with(cache, lambda f: np.savez(f, stamp=stamp, x=xs, y=ys, probs=out))
    yield TrainedProbs("done", step=n, steps=n, probs=out, message=f"slide {slide_id}: {run.name} on {n} patches")


# ---------------------------------------------------------------------------------------------
# a project's suggestions: feature caches on the way, the live head on its labels, a ranked batch
# ---------------------------------------------------------------------------------------------
SUGGESTIONS_NAME = "suggestions.csv"


@dataclass
class SuggestedPatch:
    """A row of the suggestion list: where the patch is, why, and what the live head thinks."""

    rank: int
    slide_id: str
    x: int
    y: int
    size0: int
    score: float
    reason: str
    uncertainty: float
    typicality: float
    predicted: str
    disagreement: float = 0.0
    trained: str = ""  # what the stage-one run predicts (empty without a run)


@dataclass
class SuggestEvent(ProgressEvent):
    """A progress event of :func:`project_suggestions`; the ``done`` one carries the list and the
    head's warnings about the label set."""

    rows: list | None = None
    warnings: list | None = None


def project_run(project: Any, run: Any = None) -> tuple[Path | None, str | None]:
    """The stage-one run whose predictions suggestions compare with the live head: ``run`` (a
    folder or a name under the project's ``runs/``), or by default the project's newest
    classifier run; ``run=False`` for none. Returns ``(run folder or None, a note for the user or None)``;
    a project without a run, or a run trained on other classes, gives None and says why."""
    from napari_histo_wsss.core.errors import TrainingError
    from napari_histo_wsss.core.review import resolve_run
    from napari_histo_wsss.core.stage1.train import run_classes

    if run is False:
        return None, None
    try:
        path = resolve_run(project, run)
    except TrainingError:
        if run is not None:
            raise
        return None, "no trained classifier in the project yet: suggestions rank by the live head alone (no disagreement)"
    try:
        names = run_classes(path).names
    except TrainingError as e:
        if run is not None:
            raise
        return None, f"{e}; no disagreement is computed"
    if list(names) != list(project.classes.names):
        msg = (f"{path}: the run was trained on classes {', '.join(names)}, the project has "
               f"{', '.join(project.classes.names)}; no disagreement is computed")
        if run is not None:
            raise HistoWSSSError(msg)
        return None, msg
    return path, None


def project_suggestions(project: Any, n: int = 20, slide_ids: list[str] | None = None,
                        spec: FeatureSpec | None = None, device: Any = "cpu",
                        should_stop: Callable[[], bool] = lambda: False, save: bool = True,
                        run: Any = False, which: str = "best") -> Iterator[SuggestEvent]:
    """Rank a project's unlabelled patches for labelling (see the module docstring).

    Whatever is missing is computed on the way: each slide's tissue mask and patch grid (the
    project's settings), its feature cache (kept in the project, resumed if interrupted) and,
    when asked to compare with a stage-one run (``run``: a run folder or name, or None for the
    project's newest; the default ``False`` compares with none, because the disagreement term did
    not help in the simulated annotator, docs/benchmarks/live_labelling.md), that classifier's
    probabilities for every patch (:func:`trained_patch_probs`, cached), so that patches where it
    and the live head disagree rank higher. The live head is fitted on the
    project's patch labels; with none yet, the batch is a random sample of the tissue patches.
    ``save`` writes the list to ``<project>/suggestions.csv``."""
    spec = spec or FeatureSpec()
    if n < 1:
        raise HistoWSSSError(f"the number of suggestions must be at least 1, got {n}")
    slide_ids = list(slide_ids or project.slides)
    if not slide_ids:
        raise HistoWSSSError(f"{project.root}: the project has no slides; add one first")
    run_dir, run_note = project_run(project, run)
    trained_model = None
    extractor = None
    per_slide = []
    for si, sid in enumerate(slide_ids, start=1):
        grid = project.grid(sid)
        if len(grid) == 0:
            continue
        store = None if project.read_only else slide_features_path(project, sid, spec, grid.downsample)
        result = None
        with project.open_slide(sid) as slide:
            if extractor is None:
                extractor = FeatureExtractor(spec, device)
            for ev in build_slide_features(slide, project.tissue(sid), grid.downsample, spec, store=store,
                                           device=device, should_stop=should_stop, extractor=extractor):
                if ev.kind == "cancelled":
                    yield SuggestEvent("cancelled", message=f"slide {sid}: {ev.message}")
                    return
                if ev.kind == "done":
                    result = ev.result
                else:
                    yield SuggestEvent("step", epoch=si, epochs=len(slide_ids), step=ev.step, steps=ev.steps,
                                       eta_s=ev.eta_s, message=f"slide {sid}: {ev.message}")
        other = None
        if run_dir is not None:
            if trained_model is None:
                from napari_histo_wsss.core.stage1.train import load_run

                trained_model = load_run(run_dir, which=which, map_location=device)[0]
            for ev in trained_patch_probs(project, sid, grid, run_dir, which, device=device, model=trained_model,
                                          should_stop=should_stop):
                if ev.kind == "cancelled":
                    yield SuggestEvent("cancelled", message=ev.message)
                    return
                if ev.kind == "done":
                    other = ev.probs
                else:
                    yield SuggestEvent("step", epoch=si, epochs=len(slide_ids), step=ev.step, steps=ev.steps,
                                       message=ev.message)
        per_slide.append((sid, grid, result, other))
    if not per_slide:
        raise HistoWSSSError(f"{project.root}: no patch grid holds tissue; lower 'Min. tissue' or check the slides")
    dense = {sid: feats.dense() for sid, _, feats, _ in per_slide}
    mean, std = standardiser(np.concatenate([dense[sid][feats.tissue] for sid, _, feats, _ in per_slide]))
    pooled, where, labels, labelled = [], [], [], []
    table = project.patch_labels()
    known = {(s, int(x), int(y), int(z)): lab for s, x, y, z, lab in
             zip(table.slide_id, table.x, table.y, table.size0, table.labels)}
    k = project.classes.num_classes
    for sid, grid, feats, _ in per_slide:
        pooled.append(feats.patch_features(grid.x, grid.y, grid.size0, dense=dense[sid]))
        for x, y in zip(grid.x.tolist(), grid.y.tolist()):
            lab = known.get((sid, x, y, grid.size0))
            where.append((sid, x, y, grid.size0))
            labelled.append(lab is not None)
            labels.append(lab if lab is not None else np.zeros(k, np.uint8))
    pooled = np.concatenate(pooled)
    labelled, labels = np.array(labelled), np.stack(labels)
    head, probs, warnings = None, None, []
    names = project.classes.names
    if labelled.any():
        head = LiveHead(k, mean, std).fit(pooled[labelled], labels[labelled])
        probs = head.probabilities(pooled)
        warnings = head.warnings(names)
    else:
        warnings = ["no patch is labelled yet: these suggestions are a random sample of the slides' tissue patches, a fair first batch"]
    other = np.concatenate([o for *_, o in per_slide]) if run_dir is not None else None
    if run_note:
        warnings.append(run_note)
    picks = suggest(embed(pooled, mean, std), labelled, n, probs=probs,
                    trainable=head.trainable if head is not None else None, other_probs=other)
    rows = []
    for r, p in enumerate(picks, start=1):
        sid, x, y, size0 = where[p.index]
        if probs is not None:
            pred = ", ".join(f"{names[c]} {probs[p.index, c]:.2f}" for c in np.argsort(-probs[p.index])[:2]
                             if np.isfinite(head.bias[c]))
        else:
            pred = ""
        trained = "" if other is None else ", ".join(f"{names[c]} {other[p.index, c]:.2f}"
                                                     for c in np.argsort(-other[p.index])[:2])
        rows.append(SuggestedPatch(r, sid, x, y, size0, round(p.score, 4), "first batch" if head is None else p.reason,
                                   round(p.uncertainty, 4), round(p.typicality, 4), pred,
                                   round(p.disagreement, 4), trained))
    if save and not project.read_only:
        from napari_histo_wsss.core.io.atomic import write_text

        header = "rank,slide_id,x,y,size0,score,reason,uncertainty,typicality,predicted,disagreement,trained\n"
        body = "".join(f'{r.rank},{r.slide_id},{r.x},{r.y},{r.size0},{r.score},{r.reason},{r.uncertainty},'
                       f'{r.typicality},"{r.predicted}",{r.disagreement},"{r.trained}"\n' for r in rows)
        write_text(project.root / SUGGESTIONS_NAME, header + body)
    yield SuggestEvent("done", message=f"{len(rows)} suggestions from {int((~labelled).sum())} unlabelled patches "
                                       f"({int(labelled.sum())} labelled)", rows=rows, warnings=warnings)
