"""The live head: a linear multi-label classifier on cached frozen features, refitted on every label.

Its weights are CAM weights. A patch's score for class ``k`` is ``w_k . mean(f) + b_k`` over the
patch's feature cells (``core/stage1/features.py``); applying the same ``w_k . f + b_k`` to every
cell gives the CAM of the whole slide in the same logit units, so CAMs of different classes are
directly comparable (no per-class renormalisation, which would force every class to peak at 1)
and a pixel's class is the argmax of raw logits. Fitting is an L2-regularised logistic regression
on standardised features (L-BFGS to convergence, warm-started from the previous fit), which
takes tens of milliseconds for hundreds of labels, so the CAM and pseudo-mask layers can follow
every click. Each class's positives are weighted by its negatives-to-positives ratio (clipped to 0.2-5), so a class few
patches show (normal lung) is not drowned by the common ones: on the simulated annotator's
development splits this raised the held-out mIoU at every budget on WSSS4LUAD (+0.012 mean over
budgets) and was level on GlaS (+0.004).

A class that no labelled patch shows cannot be learned: its logits are -inf (never predicted).
A class that every labelled patch shows gets no weights and a constant logit: the head cannot
say where it is not, which :meth:`LiveHead.warnings` spells out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LiveHead", "standardiser", "cam_logits", "pseudo_from_logits", "warm_up", "UNCERTAIN"]

#: Label value of tissue that no class claims with enough confidence (review layers).
UNCERTAIN = 255


def standardiser(features: np.ndarray, tissue: np.ndarray | None = None, max_cells: int = 200_000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of feature cells (``(..., C)``; only the tissue
    cells where a mask is given), from at most ``max_cells`` cells picked at random."""
    f = np.asarray(features, dtype=np.float32)
    cells = f[tissue] if tissue is not None else f.reshape(-1, f.shape[-1])
    if len(cells) > max_cells:
        cells = cells[np.random.default_rng(seed).choice(len(cells), max_cells, replace=False)]
    if len(cells) == 0:
        return np.zeros(f.shape[-1], np.float32), np.ones(f.shape[-1], np.float32)
    mean = cells.mean(axis=0)
    std = cells.std(axis=0)
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


@dataclass
class LiveHead:
    """Multi-label logistic regression. ``l2``: weight penalty relative to the mean loss (larger =
    smoother, needed with few labels); ``mean``/``std``: the feature standardisation (fixed per
    cache, so refits stay comparable)."""

    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    l2: float = 1.0
    max_iter: int = 500
    balanced: bool = True
    weight: np.ndarray | None = field(default=None, repr=False)   # (K, C)
    bias: np.ndarray | None = field(default=None, repr=False)     # (K,)
    trainable: np.ndarray | None = field(default=None, repr=False)  # (K,) bool: positives and negatives seen
    n_labels: int = 0

    def fit(self, x: np.ndarray, y: np.ndarray) -> LiveHead:
        """Fit on pooled patch features ``x`` ``(N, C)`` and multi-hot labels ``y`` ``(N, K)``."""
        x = (np.asarray(x, np.float32) - self.mean) / self.std
        y = np.asarray(y, np.float32).reshape(len(x), self.num_classes)
        n, c = x.shape
        pos = y.sum(axis=0)
        self.trainable = (pos > 0) & (pos < n)
        self.n_labels = int(n)
        w0 = self.weight if self.weight is not None and self.weight.shape == (self.num_classes, c) else np.zeros((self.num_classes, c), np.float32)
        prior = np.clip((pos + 0.5) / (n + 1.0), 1e-3, 1 - 1e-3)
        b0 = self.bias if self.bias is not None else np.log(prior / (1 - prior)).astype(np.float32)
        weight = np.zeros((self.num_classes, c), np.float32)
        bias = np.where(pos > 0, np.log(prior / (1 - prior)), -np.inf).astype(np.float32)
        k = np.flatnonzero(self.trainable)
        if len(k):
            pw = np.ones(len(k))
            if self.balanced:  # positives weighted by negatives / positives of their class
                pw = np.clip((n - pos[k]) / pos[k], 0.2, 5.0)
            w, b = _fit_logistic(x, y[:, k], pw, self.l2, w0[k], np.where(np.isfinite(b0[k]), b0[k], 0.0),
                                 self.max_iter)
            weight[k], bias[k] = w, b
        self.weight, self.bias = weight, bias
        return self

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(..., K)`` logits of features ``(..., C)`` (pooled patches or single cells)."""
        if not self.fitted:
            raise RuntimeError("the live head has not been fitted yet")
        z = ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.weight.T
        return z + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-self.logits(x)))

    def warnings(self, class_names: list[str]) -> list[str]:
        """What the current labels cannot teach, in words a pathologist can act on."""
        if not self.fitted:
            return []
        out = []
        for k, name in enumerate(class_names[: self.num_classes]):
            if not np.isfinite(self.bias[k]):
                out.append(f"no labelled patch shows {name}: it cannot be found yet; label a few patches of {name}")
            elif not self.trainable[k]:
                out.append(f"every labelled patch shows {name}: the model cannot learn where it is absent; "
                           f"label patches without {name}")
        return out


def _fit_logistic(x: np.ndarray, y: np.ndarray, pos_weight: np.ndarray, l2: float, w0: np.ndarray,
                  b0: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(K, C)`` and biases ``(K,)`` minimising the mean binary cross-entropy of
    ``x @ w.T + b`` against ``y`` (positives weighted by ``pos_weight``) plus
    ``l2 / 2 * |w|^2 / C``, from ``(w0, b0)``.

    The problem is strictly convex, so it is solved to convergence (SciPy's L-BFGS-B, float64,
    projected gradient below 1e-6): the answer does not depend on the start or the optimiser's
    path beyond that tolerance. The loss
    and its gradient are torch matrix products (they release the GIL and follow torch's thread
    setting); no torch optimiser is made, because the first one in a process imports
    ``torch._dynamo`` (a second of module loading that holds the GIL and stalls the GUI)."""
    import torch
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    n, c = x.shape
    k = y.shape[1]
    xt = torch.from_numpy(np.asarray(x, np.float64))
    yt = torch.from_numpy(np.asarray(y, np.float64))
    pw = torch.from_numpy(np.asarray(pos_weight, np.float64))
    scale = 1.0 / (n * k)

    def loss_grad(p: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.from_numpy(p)
        w, b = t[: k * c].view(k, c), t[k * c:]
        z = xt @ w.T + b
        s = torch.sigmoid(z)
        loss = (pw * yt * torch.nn.functional.softplus(-z) + (1 - yt) * torch.nn.functional.softplus(z)).sum() * scale
        g = (-pw * yt * (1 - s) + (1 - yt) * s) * scale
        gw = g.T @ xt + (l2 / c) * w
        loss = float(loss) + 0.5 * l2 * float((w * w).sum()) / c
        return loss, torch.cat([gw.reshape(-1), g.sum(0)]).numpy()

    p0 = np.concatenate([np.asarray(w0, np.float64).ravel(), np.asarray(b0, np.float64)])
    # the optimiser's own vector algebra on one BLAS thread: OpenBLAS's threads and torch's pool
    # fight over two cores otherwise (a 100 ms fit took 800 ms)
    with threadpool_limits(limits=1, user_api="blas"):
        r = minimize(loss_grad, p0, jac=True, method="L-BFGS-B",
                     options={"maxiter": int(max_iter), "gtol": 1e-6, "ftol": 1e-12})
    return r.x[: k * c].reshape(k, c).astype(np.float32), r.x[k * c:].astype(np.float32)


def cam_logits(head: LiveHead, dense: np.ndarray, tissue: np.ndarray | None = None) -> np.ndarray:
    """``(K, h, w)`` float32 class logits of every feature cell (``-inf`` off tissue)."""
    z = head.logits(dense).astype(np.float32)
    z = np.moveaxis(z, -1, 0)
    if tissue is not None:
        z[:, ~tissue] = -np.inf
    return z


def pseudo_from_logits(logits: np.ndarray, floor: float | None = None) -> np.ndarray:
    """``(h, w)`` uint8 labels 1..K from ``(K, h, w)`` logits: the class with the largest raw
    logit; cells with no finite logit are 0 (background); with ``floor`` (a probability), cells
    whose best class is below it are :data:`UNCERTAIN`."""
    finite = np.isfinite(logits)
    safe = np.where(finite, logits, -1e30)
    best = safe.argmax(axis=0)
    out = (best + 1).astype(np.uint8)
    out[~finite.any(axis=0)] = 0
    if floor is not None:
        top = safe.max(axis=0)
        low = (top < np.log(floor / (1 - floor))) & (out > 0)
        out[low] = UNCERTAIN
    return out


def warm_up() -> None:
    """Fit a tiny head once: the first fit of a process imports SciPy's optimiser and starts
    torch's thread pool, which a background job can absorb before the first interactive refit."""
    x = np.eye(4, dtype=np.float32)
    LiveHead(2, np.zeros(4, np.float32), np.ones(4, np.float32), max_iter=2).fit(x, np.array([[1, 0], [0, 1], [1, 0], [0, 1]]))
