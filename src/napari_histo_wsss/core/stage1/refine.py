"""Pseudo-mask refinement with a fully connected (dense) CRF.

CAM logits come from a stride-16 map upsampled to the image: their class borders are blobs that
ignore the tissue's edges. A dense CRF (Krähenbühl & Koltun, NeurIPS 2011) re-labels each pixel
from the softmax of its class scores plus two pairwise terms: a smoothness kernel (nearby pixels
agree) and an appearance kernel (nearby pixels of similar colour agree), so borders move to the
stain edges between epithelium and stroma. The mean-field inference runs in
:mod:`pydensecrf` (the ``pydensecrf2`` build on PyPI: ``pip install "napari-histo-wsss[crf]"``,
which compiles a small C++ extension).

Measured in ``bench/stage1_quality.py`` (``prob-raw-crf`` rows, docs/benchmarks/stage1.md). The
default kernels (:class:`CRFParams`) were chosen with ``--crf-grid`` on the validation images
alone, as the highest mean gain over the default runs of both shared sets (WSSS4LUAD tissue types
and GlaS glands): wide appearance kernels help WSSS4LUAD's validation images a little more but
cost GlaS up to 0.03 mIoU. Only the classes the image-level decision allowed take part, so the
CRF cannot bring back a class the gating removed.

Without pydensecrf, :func:`crf_available` is False and :func:`~.cams.generate_pseudo_masks` says
so once and writes unrefined masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from napari_histo_wsss.core.errors import HistoWSSSError

__all__ = ["CRFParams", "REFINEMENTS", "crf_available", "dense_crf_labels", "CRF_MISSING"]

#: ``refine`` choices of pseudo-mask settings: none (argmax of the scores) or a dense CRF.
REFINEMENTS = ("none", "crf")

CRF_MISSING = ("dense CRF refinement needs pydensecrf (pip install 'napari-histo-wsss[crf]', which compiles a "
               "C++ extension)")


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF kernels, in pixels of the image the scores cover and in 0-255 RGB units.

    ``bilateral_*``: the appearance kernel (pixels within about ``bilateral_sxy`` px whose
    colours differ by less than about ``bilateral_srgb`` pull towards one class, with weight
    ``bilateral_compat``); ``gaussian_*``: the smoothness kernel; ``iterations`` of mean field;
    ``temperature`` divides the scores before the softmax (raw CAM logits are log-odds already).
    """

    bilateral_sxy: float = 20.0
    bilateral_srgb: float = 10.0
    bilateral_compat: float = 5.0
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    iterations: int = 5
    temperature: float = 1.0

    def scaled(self, factor: float) -> CRFParams:
        """The same kernels on an image ``factor`` times finer (``factor`` < 1: coarser), e.g. a
        review canvas coarser than the model's input: the spatial widths follow the tissue,
        never below one pixel."""
        f = float(factor)
        return replace(self, bilateral_sxy=max(1.0, self.bilateral_sxy * f), gaussian_sxy=max(1.0, self.gaussian_sxy * f))


def crf_available() -> bool:
    """Whether the dense CRF extension (:mod:`pydensecrf`) imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing or broken build both mean "not available"
        return False
    return True


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / max(float(temperature), 1e-6)
    z = z - z.max(axis=0, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=0, keepdims=True)
    return p


def _crf_tile(scores: np.ndarray, rgb: np.ndarray, p: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    c, h, w = scores.shape
    prob = _softmax(scores, p.temperature)
    unary = -np.log(np.clip(prob, 1e-6, 1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    # pydensecrf needs a writable, C-ordered uint8 copy of the RGB image
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb,
                           rgbim=np.array(rgb[..., :3], dtype=np.uint8, order="C", copy=True), compat=p.bilateral_compat)
    q = np.asarray(d.inference(int(p.iterations)), dtype=np.float32).reshape(c, h, w)
    return q.argmax(axis=0)


def dense_crf_labels(scores: np.ndarray, rgb: np.ndarray, params: CRFParams | None = None,
                     allowed: np.ndarray | None = None, tile: int = 2048, overlap: int = 256,
                     should_stop: Callable[[], bool] | None = None, where: np.ndarray | None = None) -> np.ndarray | None:
    """Class index per pixel, ``(H, W)`` uint8, after dense-CRF inference on ``scores``
    (``(C, H, W)`` class log-scores, e.g. raw CAM logits plus calibrated offsets) over the RGB
    image ``rgb`` (``(H, W, 3)`` uint8, same size). ``allowed`` (bool ``(C,)``): the classes that
    may be chosen; the others are left out of the CRF. Images with a side above ``tile`` px are
    done in overlapping tiles (each keeps its centre), so memory stays bounded on slide regions;
    ``should_stop`` is asked before each tile, and None is returned when it says stop.

    ``where`` (bool ``(H, W)``): the pixels whose class matters (e.g. tissue on a slide canvas).
    A tile whose ``where`` pixels all have the same best score class keeps that argmax without a
    CRF - exact for the CRF's energy (every unary term is smallest there and a Potts pairwise
    term is zero), and what keeps a slide canvas, mostly far from any class border, fast; the
    other pixels of such a tile keep their argmax too.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise HistoWSSSError(f"dense CRF: class scores must be (C, H, W), got shape {scores.shape}")
    c, h, w = scores.shape
    if rgb.shape[:2] != (h, w):
        raise HistoWSSSError(f"dense CRF: image of {rgb.shape[1]}x{rgb.shape[0]} px does not match scores of {w}x{h} px")
    if not crf_available():
        raise HistoWSSSError(CRF_MISSING)
    p = params or CRFParams()
    keep = np.ones(c, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if keep.shape != (c,):
        raise HistoWSSSError(f"dense CRF: {keep.size} allowed flags for {c} classes")
    if not keep.any():
        keep = np.ones(c, dtype=bool)
    idx = np.flatnonzero(keep)
    if idx.size == 1:
        return np.full((h, w), idx[0], dtype=np.uint8)
    sub = scores[idx]
    if should_stop is not None and should_stop():
        return None
    plain = None
    if where is not None:
        if where.shape != (h, w):
            raise HistoWSSSError(f"dense CRF: a pixel mask of {where.shape[1]}x{where.shape[0]} px for scores of {w}x{h} px")
        plain = np.argmax(sub, axis=0).astype(np.uint8)

    def uniform(sy: slice, sx: slice) -> bool:
        if plain is None:
            return False
        vals = plain[sy, sx][where[sy, sx]]
        return vals.size == 0 or bool((vals == vals[0]).all())

    if max(h, w) <= tile:
        if uniform(slice(None), slice(None)):
            return idx[plain].astype(np.uint8)
        return idx[_crf_tile(sub, rgb, p)].astype(np.uint8)
    out = np.zeros((h, w), dtype=np.uint8)
    step = tile - 2 * overlap
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            if should_stop is not None and should_stop():
                return None
            ya, xa = max(0, y0 - overlap), max(0, x0 - overlap)
            yb, xb = min(h, y0 + step + overlap), min(w, x0 + step + overlap)
            if uniform(slice(ya, yb), slice(xa, xb)):
                lab = plain[ya:yb, xa:xb]
            else:
                lab = _crf_tile(sub[:, ya:yb, xa:xb], rgb[ya:yb, xa:xb], p)
            ye, xe = min(h, y0 + step), min(w, x0 + step)
            out[y0:ye, x0:xe] = idx[lab[y0 - ya:ye - ya, x0 - xa:xe - xa]]
    return out
