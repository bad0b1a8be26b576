"""Which patches to label next: uncertainty, diversity and disagreement, one batch at a time.

Every candidate (an unlabelled patch) gets three scores in [0, 1]:

* **uncertainty**: the live head's doubt, the largest binary entropy over the classes it can
  learn (a patch it calls 50/50 tumour scores 1);
* **diversity**: how far the patch lies from every labelled or already suggested patch in feature
  space (distance to the nearest one, over the largest such distance among the candidates), so a
  batch covers the slide instead of ten copies of one doubtful region;
* **disagreement**: the largest difference between the live head's and a trained classifier's
  class probabilities, when a stage-one run's predictions are given.

A batch is the most typical patch (k-means medoid) of each of ``n`` clusters of the best-scoring
candidates (by the sum of the three), so it is informative and spread over different tissue. With
no labels yet (cold start) the clusters are made over every patch, which covers the slide's tissue
types with a handful of labels, each a typical example rather than an odd corner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

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

__all__ = ["Suggestion", "suggest", "embed", "SuggestedPatch", "project_suggestions", "SUGGESTIONS_NAME"]


@dataclass
class Suggestion:
    """One suggested patch: its index among the candidates and why it was chosen."""

    index: int
    score: float
    uncertainty: float
    diversity: float
    disagreement: float

    @property
    def reason(self) -> str:
        parts = {"uncertain": self.uncertainty, "new tissue": self.diversity, "models disagree": self.disagreement}
        return max(parts, key=parts.get)


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
) -> list[Suggestion]:
    """The next ``n`` patches to label, best first.

    ``coords``: ``(N, D)`` from :func:`embed` for every patch (labelled ones included);
    ``labelled``: ``(N,)`` bool; ``probs``: ``(N, K)`` live-head probabilities (None = cold start);
    ``trainable``: ``(K,)`` classes the head could learn (others carry no uncertainty);
    ``other_probs``: ``(N, K)`` a trained classifier's probabilities, for disagreement.

    The batch: the ``pool_factor * n`` candidates with the highest uncertainty + disagreement +
    diversity (all candidates at a cold start) are clustered into ``n`` groups (k-means), and
    each group's most typical patch (its medoid) is suggested, so that a batch is both informative
    and spread over different tissue."""
    coords = np.asarray(coords, np.float32)
    labelled = np.asarray(labelled, bool)
    cand = np.flatnonzero(~labelled)
    if n <= 0 or len(cand) == 0:
        return []
    n = min(n, len(cand))
    unc = np.zeros(len(coords), np.float32)
    if probs is not None:
        h = _entropy(np.asarray(probs, np.float32))
        if trainable is not None:
            h = h[:, np.asarray(trainable, bool)] if np.any(trainable) else np.zeros((len(h), 0), np.float32)
        unc = h.max(axis=1) if h.shape[1] else unc
    dis = np.zeros(len(coords), np.float32)
    if probs is not None and other_probs is not None:
        dis = np.abs(np.asarray(probs, np.float32) - np.asarray(other_probs, np.float32)).max(axis=1)
    anchors = np.flatnonzero(labelled)
    if len(anchors):
        nearest = np.min(np.linalg.norm(coords[:, None, :] - coords[None, anchors, :], axis=2), axis=1)
        far = float(nearest[cand].max())
        div = nearest / far if far > 0 else np.zeros(len(coords), np.float32)
    else:
        div = np.ones(len(coords), np.float32)
    total = unc + div + dis
    if probs is None and not len(anchors):
        pool = cand
    else:
        pool = cand[np.argsort(-total[cand], kind="stable")[: max(n, pool_factor * n)]]
    chosen = [int(pool[i]) for i in _kmeans_medoids(coords[pool], n)]
    chosen.sort(key=lambda i: -total[i])
    return [Suggestion(i, float(total[i]), float(unc[i]), float(div[i]), float(dis[i])) for i in chosen]


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
    diversity: float
    predicted: str


@dataclass
class SuggestEvent(ProgressEvent):
    """A progress event of :func:`project_suggestions`; the ``done`` one carries the list and the
    head's warnings about the label set."""

    rows: list | None = None
    warnings: list | None = None


def project_suggestions(project: Any, n: int = 20, slide_ids: list[str] | None = None,
                        spec: FeatureSpec | None = None, device: Any = "cpu",
                        should_stop: Callable[[], bool] = lambda: False, save: bool = True) -> Iterator[SuggestEvent]:
    """Rank a project's unlabelled patches for labelling (see the module docstring).

    Whatever is missing is computed on the way: each slide's tissue mask and patch grid (the
    project's settings) and its feature cache (kept in the project, resumed if interrupted). The
    live head is fitted on the project's patch labels; with none yet, the ranking is a diverse
    cold-start batch. ``save`` writes the list to ``<project>/suggestions.csv``."""
    spec = spec or FeatureSpec()
    if n < 1:
        raise HistoWSSSError(f"the number of suggestions must be at least 1, got {n}")
    slide_ids = list(slide_ids or project.slides)
    if not slide_ids:
        raise HistoWSSSError(f"{project.root}: the project has no slides; add one first")
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
        per_slide.append((sid, grid, result))
    if not per_slide:
        raise HistoWSSSError(f"{project.root}: no patch grid holds tissue; lower 'Min. tissue' or check the slides")
    dense = {sid: feats.dense() for sid, _, feats in per_slide}
    mean, std = standardiser(np.concatenate([dense[sid][feats.tissue] for sid, _, feats in per_slide]))
    pooled, where, labels, labelled = [], [], [], []
    table = project.patch_labels()
    known = {(s, int(x), int(y), int(z)): lab for s, x, y, z, lab in
             zip(table.slide_id, table.x, table.y, table.size0, table.labels)}
    k = project.classes.num_classes
    for sid, grid, feats in per_slide:
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
        warnings = ["no patch is labelled yet: these suggestions cover the slides' tissue for a diverse first batch"]
    picks = suggest(embed(pooled, mean, std), labelled, n, probs=probs,
                    trainable=head.trainable if head is not None else None)
    rows = []
    for r, p in enumerate(picks, start=1):
        sid, x, y, size0 = where[p.index]
        if probs is not None:
            pred = ", ".join(f"{names[c]} {probs[p.index, c]:.2f}" for c in np.argsort(-probs[p.index])[:2]
                             if np.isfinite(head.bias[c]))
        else:
            pred = ""
        rows.append(SuggestedPatch(r, sid, x, y, size0, round(p.score, 4), "first batch" if head is None else p.reason,
                                   round(p.uncertainty, 4), round(p.diversity, 4), pred))
    if save and not project.read_only:
        from napari_histo_wsss.core.io.atomic import write_text

        header = "rank,slide_id,x,y,size0,score,reason,uncertainty,diversity,predicted\n"
        body = "".join(f'{r.rank},{r.slide_id},{r.x},{r.y},{r.size0},{r.score},{r.reason},{r.uncertainty},'
                       f'{r.diversity},"{r.predicted}"\n' for r in rows)
        write_text(project.root / SUGGESTIONS_NAME, header + body)
    yield SuggestEvent("done", message=f"{len(rows)} suggestions from {int((~labelled).sum())} unlabelled patches "
                                       f"({int(labelled.sum())} labelled)", rows=rows, warnings=warnings)
