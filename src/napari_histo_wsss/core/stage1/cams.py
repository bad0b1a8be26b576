"""Class activation maps -> pseudo-masks, for images of any size.

:func:`cams_for_image` runs a trained :class:`~.models.CAMClassifier` over an RGB image (whole when
it fits, else in overlapping tiles blended with cosine weights) and returns per-class maps in
[0, 1] at image resolution plus image-level class probabilities. :func:`pseudo_mask` turns the maps
into a class-index mask: per-class normalisation, gating by the image's labels (labelled patches)
or by the predicted probabilities (unlabelled images), a background rule for weak activations and
the white-glass background of lung presets, then argmax. :func:`generate_pseudo_masks` does a
folder of images and writes palette PNGs (class colours) and optional float CAM arrays.

Image-level probabilities. The classifier is trained on patches of ``window`` pixels with global
average pooling; on a larger image the mean over the whole map would dilute a small region. Since
the head is linear and bias-free, the logit of any window equals the mean of the head's logit map
over it, so the probability of class ``c`` is ``sigmoid(max over patch-sized windows of the
window-mean logit)`` - "present somewhere in the image at the scale the model was trained on".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import list_images, parse_label_name, read_rgb, to_tensor
from napari_histo_wsss.core.errors import DatasetError, HistoWSSSError
from napari_histo_wsss.core.io.atomic import write_with
from napari_histo_wsss.core.models.classifier import CAM_MODES, normalize_cams
from napari_histo_wsss.core.progress import ProgressEvent
from napari_histo_wsss.core.settings import Settings, setting
from napari_histo_wsss.core.slides.grid import axis_starts, cosine_window
from napari_histo_wsss.core.slides.tissue import white_background_mask
from napari_histo_wsss.core.stage1.refine import CRF_MISSING, REFINEMENTS, CRFParams, crf_available, dense_crf_labels

__all__ = [
    "WHOLE_IMAGE_MAX",
    "cams_for_image",
    "pseudo_mask",
    "allowed_classes",
    "class_scores",
    "threshold_scores",
    "save_pseudo_mask",
    "save_cams",
    "PseudoMaskSettings",
    "presence_gate",
    "generate_pseudo_masks",
    "logit_maps",
    "raw_argmax_mask",
    "calibrate_offsets",
    "class_shares",
    "GATINGS",
    "AREA_FLOORS",
]

#: How unlabelled images are gated: ``"prob"`` (classes whose image probability reaches a
#: threshold, then argmax of per-class normalised CAMs), ``"prob-raw"`` (the same classes, then
#: argmax of the raw CAM logits plus per-class offsets calibrated on validation images),
#: ``"prob-area"`` (``prob-raw`` without the probable classes that cover less than an area floor
#: of the image's tissue in the ungated raw argmax; floor and offsets calibrated on validation
#: images, :func:`class_shares`) or ``"raw"`` (argmax of the offset raw logits over all classes;
#: no image-level decision).
GATINGS = ("prob", "prob-raw", "prob-area", "raw")

#: Area floors tried when validation calibrates ``prob-area`` (a share of the image's tissue).
AREA_FLOORS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)

# Images whose sides are both at most this many pixels are processed in one pass (exact CAMs);
# larger ones are tiled. 1024 px keeps the autograd graph of multi-layer CAMs within ~2 GB.
WHOLE_IMAGE_MAX = 1024
_EPS = 1e-6


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _window_logits(logit_map: torch.Tensor, image_hw: tuple[int, int], window: int | None) -> torch.Tensor:
    """(C,) max over ``window``-px windows (half-window stride) of the mean of a (C, h, w) logit
    map; the global mean when ``window`` is None or not smaller than the map."""
    c, h, w = logit_map.shape
    if window is None:
        return logit_map.mean(dim=(1, 2))
    stride_px = image_hw[0] / h
    k = max(1, int(round(window / stride_px)))
    if k >= h and k >= w:
        return logit_map.mean(dim=(1, 2))
    kh, kw = min(k, h), min(k, w)
    pooled = F.avg_pool2d(logit_map[None], kernel_size=(kh, kw), stride=(max(1, kh // 2), max(1, kw // 2)))
    return pooled.flatten(2).amax(dim=2)[0]


def _tile_maps(model, x: torch.Tensor, mode: str, scales: Sequence[float], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (C, H, W) for one image tensor (1, 3, H, W) - not normalised across tiles: each
    class's map is scaled by its raw last-stage CAM peak, so tiles keep their relative strength -
    plus the (C, h, w) logit map of the unscaled, unflipped pass."""
    h, w = x.shape[-2:]
    out = model.forward_features(x)
    logit_map = out["cam"][0].float()
    peak = F.relu(logit_map).flatten(1).amax(dim=1)  # (C,) raw strength of each class here
    acc = torch.zeros((logit_map.shape[0], h, w), dtype=torch.float32, device=x.device)
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = torch.flip(xs, dims=[3]) if flipped else xs
            if mode == "last" and s == 1.0 and not flipped:
                m = normalize_cams(F.interpolate(F.relu(out["cam"].float()), size=(h, w), mode="bilinear", align_corners=False))
            else:
                m = model.cams(xi, mode=mode).float()
                if flipped:
                    m = torch.flip(m, dims=[3])
                if m.shape[-2:] != (h, w):
                    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            acc += m[0]
            n += 1
    maps = normalize_cams((acc / n)[None])[0] * peak[:, None, None]
    return maps, logit_map


def _blend_weights(h: int, w: int, overlap: int, device: torch.device) -> torch.Tensor:
    """(h, w) blending weights of one tile: the package's cosine window (:func:`~.grid.cosine_window`)
    along each axis; a side shorter than two overlaps (an image thinner than a tile) gets a
    shorter ramp, harmless since it is the only tile across that axis."""
    wy = cosine_window(h, min(overlap, h // 2))
    wx = cosine_window(w, min(overlap, w // 2))
    return torch.from_numpy(np.outer(wy, wx)).to(device)


def _prepare(model: torch.nn.Module, rgb: np.ndarray, scales: Sequence[float], device, who: str
             ) -> tuple[torch.device, torch.Tensor]:
    """Checks of an image and its test-time scales; the device, the model moved there in eval
    mode, and the image as a (1, 3, H, W) tensor on it."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise HistoWSSSError(f"{who} expects a uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    if not scales or any(s <= 0 for s in scales):
        raise HistoWSSSError(f"test-time scales must be positive, got {list(scales)}")
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev).eval()
    return dev, to_tensor(rgb)[None].to(dev)


def _blend_tiles(x: torch.Tensor, tile: int, overlap: int, fn: Callable) -> tuple[torch.Tensor, list]:
    """``fn(tile tensor) -> (maps (C, h, w), extra)`` over overlapping tiles of ``x`` (1, 3, H, W),
    the maps blended with the cosine window into (C, H, W); also the list of the tiles' extras."""
    h, w = x.shape[-2:]
    acc = weight = None
    extras = []
    for y0 in axis_starts(h, tile, tile - overlap):
        for x0 in axis_starts(w, tile, tile - overlap):
            m, extra = fn(x[:, :, y0:y0 + tile, x0:x0 + tile])
            extras.append(extra)
            if acc is None:
                acc = torch.zeros((m.shape[0], h, w), device=x.device)
                weight = torch.zeros((h, w), device=x.device)
            fw = _blend_weights(m.shape[1], m.shape[2], overlap, x.device)
            acc[:, y0:y0 + m.shape[1], x0:x0 + m.shape[2]] += m * fw
            weight[y0:y0 + m.shape[1], x0:x0 + m.shape[2]] += fw
    # every pixel is covered; cosine weights at the image edges are tiny but never 0
    return acc / weight.clamp_min(torch.finfo(weight.dtype).tiny), extras


def cams_for_image(
    model: torch.nn.Module,
    rgb: np.ndarray,
    device: torch.device | str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    mode: str = "multi",
    window: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    normalize: bool = True,
    return_logits: bool = False,
) -> tuple[np.ndarray, ...]:
    """Class activation maps and image-level probabilities of one RGB image.

    Args:
        model: a :class:`~.models.CAMClassifier` (put in eval mode here).
        rgb: uint8 ``(H, W, 3)`` image of any size.
        device: where to run; default the model's device (the model is moved there).
        tile: tile side for images larger than :data:`WHOLE_IMAGE_MAX` (default 512); pass a
            value to force tiling at that size. Tiles overlap by ``overlap`` px (default a
            quarter tile, at most half) and are blended with the cosine window of
            :func:`~.grid.cosine_window`, the same as whole-slide prediction.
        mode: ``"last"`` (classic CAM) or ``"multi"`` (last-stage CAM fused with LayerCAM maps of
            two earlier stages, see :meth:`CAMClassifier.cams`).
        window: patch size the classifier was trained on, for the image-level probabilities
            (see the module docstring); None = whole-image mean.
        scales, flip: test-time augmentation - maps are averaged over the rescaled (and
            horizontally flipped) inputs.
        normalize: False keeps each class's raw strength (maps scaled by the last-stage CAM
            peak, not by the image's own maximum), so that the maps of several tiles of one
            slide can be normalised together (:mod:`.review`: one normalisation per slide).
        return_logits: also return the raw CAM logits of the plain (unscaled, unflipped) pass,
            upsampled to the image and blended like the maps - what :func:`logit_maps` gives
            without test-time augmentation, from the same forward pass.

    Returns:
        ``(cams, probs)``: float32 ``(C, H, W)`` in [0, 1], each class max-normalised over the
        whole image (a class whose map is zero everywhere stays zero), and float32 ``(C,)``;
        with ``return_logits``, ``(cams, probs, logits)``, the logits float32 ``(C, H, W)``.
    """
    if mode not in CAM_MODES:
        raise HistoWSSSError(f"unknown CAM mode {mode!r}; choose one of {', '.join(CAM_MODES)}")
    dev, x = _prepare(model, rgb, scales, device, "cams_for_image")
    h, w = rgb.shape[:2]
    def with_raw(m: torch.Tensor, logit_map: torch.Tensor) -> torch.Tensor:
        # the raw logits ride as extra channels, so tiles blend them exactly like the maps
        if not return_logits:
            return m
        up = F.interpolate(logit_map[None], size=tuple(m.shape[-2:]), mode="bilinear", align_corners=False)[0]
        return torch.cat([m, up])

    if tile is None and max(h, w) <= WHOLE_IMAGE_MAX:
        with torch.no_grad():
            maps, logit_map = _tile_maps(model, x, mode, scales, flip)
            maps = with_raw(maps, logit_map)
        logits = _window_logits(logit_map, (h, w), window)
    else:
        tile = int(tile or 512)
        ov = int(overlap if overlap is not None else tile // 4)
        if tile < 32 or not 0 <= ov <= tile // 2:
            raise HistoWSSSError(f"tile must be >= 32 px and overlap within [0, tile/2], got tile={tile}, overlap={ov}")
        def per_tile(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            m, lm = _tile_maps(model, xt, mode, scales, flip)
            return with_raw(m, lm), _window_logits(lm, tuple(xt.shape[-2:]), window)

        with torch.no_grad():
            maps, window_logits = _blend_tiles(x, tile, ov, per_tile)
        logits = torch.stack(window_logits).amax(dim=0)
    raw = None
    if return_logits:
        c = maps.shape[0] // 2
        maps, raw = maps[:c], maps[c:]
    cams = normalize_cams(maps[None])[0] if normalize else maps
    out = (cams.cpu().numpy().astype(np.float32), torch.sigmoid(logits).cpu().numpy().astype(np.float32))
    return out + (raw.cpu().numpy().astype(np.float32),) if return_logits else out


def pseudo_mask(
    cams: np.ndarray,
    classes: ClassTable,
    rgb: np.ndarray | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    probs: np.ndarray | None = None,
    prob_threshold: float = 0.5,
    bg_threshold: float = 0.0,
    bg_alpha: float | None = None,
    norm: str = "class",
    white_background: bool | None = None,
) -> np.ndarray:
    """Class-index mask ``(H, W)`` uint8 from CAMs ``(C, H, W)``.

    Steps: normalise (``norm="class"``: each class by its own maximum, so a weakly activated but
    present class still competes; ``"global"``: all classes by the overall maximum, as MLPS does,
    keeping relative strengths; ``"none"``); gate (classes with ``labels`` 0 are switched off
    when labels are known, else classes whose ``probs`` are below ``prob_threshold`` - the most
    probable class is always kept so an unlabelled tissue image never comes out empty); argmax
    over the gated classes; background (index ``classes.background_index``) where the best gated
    score is below ``bg_threshold``, where TPRO's background score ``(1 - max score)**bg_alpha``
    wins (when ``bg_alpha`` is set), where no class is allowed, and - when ``white_background``
    (default: the class table's setting; on for lung presets, off for breast) and ``rgb`` are
    given - on white glass (:func:`~.tissue.white_background_mask`).
    """
    allowed = allowed_classes(classes, labels=labels, probs=probs, prob_threshold=prob_threshold)
    argmax, best = class_scores(cams, classes, allowed, norm=norm)
    white = None
    if (classes.white_background if white_background is None else white_background) and rgb is not None:
        if rgb.shape[:2] != argmax.shape:
            raise HistoWSSSError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px does not match CAMs of {argmax.shape[1]}x{argmax.shape[0]} px")
        white = white_background_mask(rgb)
    return threshold_scores(argmax, best, classes, bg_threshold=bg_threshold, bg_alpha=bg_alpha, white=white)


def allowed_classes(
    classes: ClassTable,
    labels: np.ndarray | Sequence[int] | None = None,
    probs: np.ndarray | None = None,
    prob_threshold: float = 0.5,
    shares: np.ndarray | None = None,
    min_area: float = 0.0,
) -> np.ndarray:
    """Gating of :func:`pseudo_mask`: bool ``(C,)``, the image's labels when known, else the
    classes whose probability reaches ``prob_threshold`` (the most probable always kept), else all.
    With ``shares`` (each class's share of the image's tissue in the ungated raw argmax,
    :func:`class_shares`; the ``prob-area`` gating) a probable class is also dropped when its share
    is below ``min_area`` (with ``min_area`` 0: when it holds no pixel); when that drops every
    class, the class with the largest share is kept."""
    if labels is not None:
        return classes.check_labels(labels, where="pseudo-mask gating").astype(bool)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float32)
        if probs.shape != (classes.num_classes,):
            raise HistoWSSSError(f"{probs.shape[0] if probs.ndim else 0} probabilities for {classes.num_classes} classes")
        allowed = probs >= prob_threshold
        allowed[int(np.argmax(probs))] = True
        if shares is not None:
            shares = np.asarray(shares, dtype=np.float64)
            if shares.shape != (classes.num_classes,):
                raise HistoWSSSError(f"{shares.size} class shares for {classes.num_classes} classes")
            if shares.sum() > 0:  # no tissue at all: nothing to measure, the probabilities decide
                allowed &= shares >= min_area if min_area > 0 else shares > 0
                if not allowed.any():
                    allowed[int(np.argmax(shares))] = True
        return allowed
    return np.ones(classes.num_classes, dtype=bool)


def class_shares(mask: np.ndarray, classes: ClassTable) -> np.ndarray:
    """(C,) each class's share of the tissue (non-background) pixels of a class-index mask,
    e.g. the ungated :func:`raw_argmax_mask` of an image; zeros when it holds no tissue."""
    tissue = np.asarray(mask)[np.asarray(mask) != classes.background_index]
    c = classes.num_classes
    if tissue.size == 0:
        return np.zeros(c)
    return np.bincount(tissue.ravel(), minlength=c)[:c] / tissue.size


def class_scores(cams: np.ndarray, classes: ClassTable, allowed: np.ndarray, norm: str = "class") -> tuple[np.ndarray, np.ndarray]:
    """The threshold-independent part of :func:`pseudo_mask`: normalise the CAMs and take, over
    the ``allowed`` classes, the winning class ``(H, W)`` uint8 and its score ``(H, W)`` float32
    (-1 where no class is allowed). Interactive thresholds cache this and only re-run
    :func:`threshold_scores`, a single comparison per pixel."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != classes.num_classes:
        raise HistoWSSSError(f"CAMs of shape {cams.shape} do not match the {classes.num_classes} classes of the table")
    if norm == "class":
        peak = cams.reshape(cams.shape[0], -1).max(axis=1)
        scale = 1.0 / np.maximum(peak, _EPS)
    elif norm == "global":
        scale = np.full(cams.shape[0], 1.0 / max(float(cams.max()), _EPS), dtype=np.float32)
    elif norm == "none":
        scale = np.ones(cams.shape[0], dtype=np.float32)
    else:
        raise HistoWSSSError(f"unknown CAM normalisation {norm!r}; choose class, global or none")
    idx = np.flatnonzero(np.asarray(allowed, dtype=bool))
    if idx.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8), np.full(cams.shape[1:], -1.0, dtype=np.float32)
    # only the allowed classes are scaled and compared (gated-off ones never win)
    scores = cams[idx] * scale[idx, None, None].astype(np.float32)
    pick = np.argmax(scores, axis=0)
    best = np.take_along_axis(scores, pick[None], axis=0)[0]
    return idx.astype(np.uint8)[pick], best


def threshold_scores(
    argmax: np.ndarray,
    best: np.ndarray,
    classes: ClassTable,
    bg_threshold: float = 0.0,
    bg_alpha: float | None = None,
    white: np.ndarray | None = None,
) -> np.ndarray:
    """Class-index mask from :func:`class_scores`: background (``classes.background_index``)
    where the score is below ``bg_threshold`` or no class is allowed, where TPRO's background
    score ``(1 - best)**bg_alpha`` wins (when set), and on ``white`` glass (bool mask)."""
    background = best < max(bg_threshold, 0.0)  # < 0: no class allowed here
    if bg_alpha is not None:
        background |= np.power(np.clip(1.0 - best, 0.0, 1.0), bg_alpha) > best
    if white is not None:
        background |= white
    return np.where(background, np.uint8(classes.background_index), argmax).astype(np.uint8, copy=False)


def save_pseudo_mask(path: str | Path, mask: np.ndarray, classes: ClassTable) -> None:
    """Atomically write a class-index mask as a palette PNG coloured with the class table (index
    ``C`` = background colour), readable back as indices with ``np.array(Image.open(path))``."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(classes.palette())
    write_with(path, lambda tmp: im.save(tmp, format="PNG"))


def save_cams(path: str | Path, cams: np.ndarray) -> None:
    """Atomically write float CAMs ``(C, H, W)``: ``.npy`` (float16) or ``.npz`` (compressed,
    key ``cams``) chosen by the suffix."""
    path = Path(path)
    arr = np.asarray(cams, dtype=np.float16)
    if path.suffix == ".npz":
        write_with(path, lambda tmp: np.savez_compressed(tmp, cams=arr), suffix=".npz")
    elif path.suffix == ".npy":
        write_with(path, lambda tmp: np.save(tmp, arr), suffix=".npy")
    else:
        raise HistoWSSSError(f"{path}: CAM arrays are saved as .npy or .npz")


def logit_maps(
    model: torch.nn.Module,
    rgb: np.ndarray,
    device: torch.device | str | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tile: int = 512,
) -> np.ndarray:
    """Raw (un-normalised, signed) CAM logits ``(C, H, W)`` float32 of an RGB image at image
    resolution: the head applied at every location, upsampled bilinearly, averaged over the
    test-time ``scales`` and horizontal ``flip``. The head is linear and bias-free, so the maps
    of every class share one scale (the image logit is their mean): comparing them pixel by
    pixel needs no normalisation. Images larger than :data:`WHOLE_IMAGE_MAX` are done in
    ``tile``-px tiles overlapping by a quarter, blended with the cosine window."""
    dev, x = _prepare(model, rgb, scales, device, "logit_maps")
    h, w = rgb.shape[:2]

    def one(xt: torch.Tensor) -> torch.Tensor:
        th, tw = xt.shape[-2:]
        acc, n = None, 0
        for s in scales:
            xs = xt if s == 1.0 else F.interpolate(xt, scale_factor=s, mode="bilinear", align_corners=False,
                                                    recompute_scale_factor=False)
            for flipped in ((False, True) if flip else (False,)):
                xi = torch.flip(xs, dims=[3]) if flipped else xs
                m = model.forward_features(xi)["cam"].float()
                if flipped:
                    m = torch.flip(m, dims=[3])
                m = F.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)[0]
                acc = m if acc is None else acc + m
                n += 1
        return acc / n

    with torch.no_grad():
        if max(h, w) <= WHOLE_IMAGE_MAX:
            out = one(x)
        else:
            out, _ = _blend_tiles(x, tile, tile // 4, lambda xt: (one(xt), None))
    return out.cpu().numpy().astype(np.float32)


def raw_argmax_mask(
    logits: np.ndarray,
    classes: ClassTable,
    offsets: np.ndarray | Sequence[float] | None = None,
    rgb: np.ndarray | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    white_background: bool | None = None,
    refine: str = "none",
    crf: CRFParams | None = None,
) -> np.ndarray:
    """Class-index mask from raw CAM logits (:func:`logit_maps`): each pixel takes the class of
    the largest ``logit + offset`` (OEEM-style raw argmax), so an image's classes follow from its
    pixels, not from an image-level threshold; ``labels`` (when known) restrict the choice to the
    labelled classes. ``refine="crf"``: instead of the argmax, a dense CRF over ``rgb`` on the
    softmax of ``logit + offset`` among those classes (:func:`~.refine.dense_crf_labels`, kernels
    ``crf``). Background on white glass as in :func:`pseudo_mask`."""
    logits = np.asarray(logits, dtype=np.float32)
    c = classes.num_classes
    if logits.ndim != 3 or logits.shape[0] != c:
        raise HistoWSSSError(f"CAM logits of shape {logits.shape} do not match the {c} classes of the table")
    off = np.zeros(c, dtype=np.float32) if offsets is None else np.asarray(offsets, dtype=np.float32)
    if off.shape != (c,):
        raise HistoWSSSError(f"{off.size} CAM offsets for {c} classes")
    if refine not in REFINEMENTS:
        raise HistoWSSSError(f"unknown pseudo-mask refinement {refine!r}; choose one of {', '.join(REFINEMENTS)}")
    scores = logits + off[:, None, None]
    allowed = None
    if labels is not None:
        allowed = classes.check_labels(labels, where="pseudo-mask gating").astype(bool)
        if allowed.any():
            scores = np.where(allowed[:, None, None], scores, -np.inf)
    if refine == "crf":
        if rgb is None:
            raise HistoWSSSError("dense CRF refinement needs the image (rgb)")
        mask = dense_crf_labels(logits + off[:, None, None], rgb, crf, allowed=allowed)
    else:
        mask = np.argmax(scores, axis=0).astype(np.uint8)
    if (classes.white_background if white_background is None else white_background) and rgb is not None:
        if rgb.shape[:2] != mask.shape:
            raise HistoWSSSError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px does not match CAMs of {mask.shape[1]}x{mask.shape[0]} px")
        mask[white_background_mask(rgb)] = classes.background_index
    return mask


def calibrate_offsets(
    items: Sequence[tuple[np.ndarray, np.ndarray]],
    classes: ClassTable,
    grid: Sequence[float] = tuple(np.round(np.arange(-4.0, 4.01, 0.5), 2)),
    rounds: int = 2,
    subsample: int = 4,
) -> tuple[np.ndarray, float | None]:
    """Per-class offsets for :func:`raw_argmax_mask` that maximise the mIoU (MLPS convention,
    background ignored) on validation images: ``items`` are ``(logits (C, H, W), ground truth
    (H, W))`` pairs, or ``(logits, ground truth, allowed (C,) bool)`` when each image's classes
    are gated first (by predicted probabilities). Coordinate ascent over ``grid`` (``rounds``
    passes; the first class stays at 0, only differences matter), every ``subsample``-th pixel.
    Returns ``(offsets, mIoU)``; ties keep the offset nearest 0."""
    from napari_histo_wsss.core.metrics import ConfusionMatrix

    c, bg = classes.num_classes, classes.background_index
    xs, ys = [], []
    for item in items:
        logits, gt = item[0], item[1]
        lg = np.asarray(logits, dtype=np.float32)[:, ::subsample, ::subsample].reshape(c, -1)
        if len(item) > 2 and item[2] is not None and np.asarray(item[2], dtype=bool).any():
            lg = np.where(np.asarray(item[2], dtype=bool)[:, None], lg, -np.inf)
        g = np.asarray(gt)[::subsample, ::subsample].reshape(-1)
        keep = g != bg
        xs.append(lg[:, keep])
        ys.append(g[keep].astype(np.int64))
    if not xs or sum(y.size for y in ys) == 0:
        return np.zeros(c, dtype=np.float32), None
    x, y = np.concatenate(xs, axis=1), np.concatenate(ys)
    names = classes.names + ["background"]

    def miou(off: np.ndarray) -> float:
        cm = ConfusionMatrix(c + 1, bg)
        cm.update(np.argmax(x + off[:, None], axis=0), y)
        v = cm.scores(names)["miou"]
        return -1.0 if v is None else float(v)

    off = np.zeros(c, dtype=np.float32)
    best = miou(off)
    for _ in range(rounds):
        for k in range(1, c):
            for v in sorted(grid, key=abs):
                trial = off.copy()
                trial[k] = v
                score = miou(trial)
                if score > best + 1e-9:
                    best, off = score, trial
    return off, best


@dataclass
class PseudoMaskSettings(Settings):
    """How :func:`generate_pseudo_masks` computes CAMs and masks (see :func:`cams_for_image` and
    :func:`pseudo_mask` for each field). ``histo-wsss pseudo-masks`` generates its options from
    the fields declared ``cli``; ``mode``, ``window`` and ``prob_threshold`` default there to the
    run's own (its cam_mode, patch size and calibrated threshold), so the command sets them itself."""

    what = "pseudo-mask setting"

    mode: str = setting("multi", choices=CAM_MODES, cli=False, help="CAM type")
    window: int | None = setting(None, range=(1, None), cli=False, help="sliding-window side (None: whole image)")
    tile: int | None = setting(None, range=(1, None), none="auto",
                               help="force tiling at this size (default: whole image up to 1024 px)")
    scales: tuple[float, ...] = setting((1.0,), range=(0, None), open="lo", min_items=1, cli=False,
                                        help="image scales whose CAMs are averaged")
    flip: bool = setting(False, help="average CAMs with the horizontally flipped image")
    prob_threshold: float = setting(0.5, range=(0, 1), cli=False,
                                    help="probability that switches a class on when gating by predictions")
    bg_threshold: float = setting(0.0, range=(0, 1), help="normalised CAM score below which a pixel is background")
    bg_alpha: float | None = setting(None, range=(0, None), open="lo", cli=False,
                                     help="exponent of TPRO's background score (1 - max score)**bg_alpha")
    norm: str = setting("class", choices=("class", "global", "none"), cli=False, help="CAM normalisation")
    gating: str = setting("prob-area", choices=GATINGS,
                          help="images without labels: prob (classes above the probability threshold, normalised "
                               "CAMs), prob-raw (those classes, raw CAM logits + the offsets validation calibrated), "
                               "prob-area (prob-raw without the classes under the area floor validation chose) "
                               "or raw (raw logits + offsets over all classes)")
    min_area: float | None = setting(None, range=(0, 1), none="run's",
                                     help="prob-area: share of an image's tissue below which a probable class is "
                                          "dropped (default: the floor the run's validation chose; none: prob-raw)")
    area_offsets: tuple[float, ...] | None = setting(None, min_items=1, none="run's", cli=False,
                                                     help="prob-area: offsets of the ungated raw argmax whose class "
                                                          "shares meet the floor (None: zeros)")
    refine: str = setting("crf", choices=REFINEMENTS,
                          help="raw gatings: refine the mask with a dense CRF over the image (crf; needs pydensecrf, "
                               "else the masks stay unrefined and a message says so) or not (none)")
    offsets: tuple[float, ...] | None = setting(None, min_items=1, none="run's", cli=False,
                                                help="per-class offsets of raw gating (None: zeros)")
    white_background: bool | None = setting(None, cli=False,
                                            help="background on white glass (None: the class table's setting)")


def presence_gate(logits: np.ndarray, probs: np.ndarray, classes: ClassTable, s: PseudoMaskSettings,
                  rgb: np.ndarray | None = None) -> np.ndarray | None:
    """The classes an unlabelled image is given under ``s.gating`` (uint8 (C,)), from its raw CAM
    logits and class probabilities: ``prob-raw`` by the probability threshold, ``prob-area`` also by
    the area floor (shares of the ungated raw argmax plus ``s.area_offsets``); None for ``raw``
    (every class). The one presence rule of ``pseudo-masks``, also what gates stage two in
    ``bench/stage2_quality.py``."""
    if s.gating not in ("prob-raw", "prob-area"):
        return None
    shares = None
    if s.gating == "prob-area" and s.min_area is not None:
        shares = class_shares(raw_argmax_mask(logits, classes, s.area_offsets, rgb=rgb,
                                              white_background=s.white_background), classes)
    return allowed_classes(classes, probs=probs, prob_threshold=s.prob_threshold, shares=shares,
                           min_area=s.min_area if shares is not None else 0.0).astype(np.uint8)


def generate_pseudo_masks(
    model: torch.nn.Module,
    classes: ClassTable,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: PseudoMaskSettings | None = None,
    cams_dir: str | Path | None = None,
    cams_format: str = "npy",
    labels: str | Callable[[Path], np.ndarray | None] | None = None,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> Iterator[ProgressEvent]:
    """Pseudo-masks for every image of ``images_dir``: ``out_dir/<same file stem>.png`` (palette
    PNG) and, with ``cams_dir``, ``<stem>.npy``/``.npz`` float CAMs. Yields a ``ProgressEvent``
    (``core.progress``) per image, then ``done`` (or ``cancelled`` when ``should_stop()`` says so).

    ``labels``: None (gate by predicted probability), ``"names"`` (the image-level label in each
    file name, e.g. ``...-[1, 0, 1].png``; a name without one is an error), a folder of masks
    (labels = classes present in the mask of the same stem) or a callable ``path -> labels``.

    ``out_dir`` (and a ``cams_dir`` outside it) appear whole or not at all: they are written in
    hidden folders beside them that replace them at the end (:func:`~.atomic.replace_dir`), so a
    cancel or an error leaves no half-filled folder and older ones untouched. An existing,
    non-empty one needs ``overwrite`` (it is then replaced as a whole); none may be, hold or lie in
    ``images_dir`` or the ``labels`` mask folder.
    """
    import contextlib

    from napari_histo_wsss.core.data.datasets import read_index_mask
    from napari_histo_wsss.core.errors import Cancelled
    from napari_histo_wsss.core.io.atomic import check_output, replace_dir

    s = settings or PseudoMaskSettings()
    images = list_images(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images found")
    if isinstance(labels, (str, Path)) and str(labels) != "names":
        mask_dir = Path(labels)
        masks = list_images(mask_dir)

        def label_of(p: Path) -> np.ndarray:
            if p.stem not in masks:
                raise DatasetError(f"{p}: no mask of the same name in {mask_dir} to take the image labels from")
            counts = np.bincount(read_index_mask(masks[p.stem], classes).ravel(), minlength=classes.background_index + 1)
            return (counts[: classes.num_classes] > 0).astype(np.uint8)
    elif labels == "names":
        def label_of(p: Path) -> np.ndarray:
            found = parse_label_name(p)[1]
            return classes.check_labels(found, where=str(p))
    else:
        label_of = labels if callable(labels) else (lambda p: None)
    if cams_format not in ("npy", "npz"):
        raise HistoWSSSError(f"CAM format must be npy or npz, got {cams_format!r}")
    label_dir = Path(labels) if isinstance(labels, (str, Path)) and str(labels) != "names" else None
    inputs = [images_dir, label_dir]
    out_dir = check_output(out_dir, inputs=inputs, overwrite=overwrite, what="output folder", folder=True)
    cams_inside = None  # a CAM folder inside out_dir is written within out_dir's hidden folder
    if cams_dir is not None:
        cams_dir = Path(cams_dir)
        if cams_dir.resolve().is_relative_to(out_dir.resolve()):
            cams_inside = cams_dir.resolve().relative_to(out_dir.resolve())
        else:
            check_output(cams_dir, inputs=[*inputs, out_dir], overwrite=overwrite, what="CAM folder", folder=True)
    kept = f"the previous {out_dir} is kept" if out_dir.exists() else f"nothing written to {out_dir}"
    n = len(images)
    done = 0
    refine = s.refine
    if refine == "crf" and s.gating != "prob" and not crf_available():
        refine = "none"
        yield ProgressEvent("log", message=f"{CRF_MISSING}; writing unrefined pseudo-masks (--refine none)")
    try:
        with contextlib.ExitStack() as stack:
            tmp_out = stack.enter_context(replace_dir(out_dir))
            tmp_cams = None
            if cams_inside is not None:
                tmp_cams = tmp_out / cams_inside
                tmp_cams.mkdir(parents=True, exist_ok=True)
            elif cams_dir is not None:
                tmp_cams = stack.enter_context(replace_dir(cams_dir))
            for i, (stem, path) in enumerate(images.items(), start=1):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped after {done} of {n} images; {kept}")
                rgb = read_rgb(path)
                cams, probs = cams_for_image(model, rgb, device=device, tile=s.tile, mode=s.mode, window=s.window,
                                             scales=s.scales, flip=s.flip)
                known = label_of(path)
                if known is None and s.gating != "prob":
                    logits = logit_maps(model, rgb, device=device, scales=s.scales, flip=s.flip, tile=s.tile or 512)
                    gate = presence_gate(logits, probs, classes, s, rgb)
                    mask = raw_argmax_mask(logits, classes, s.offsets, rgb=rgb, labels=gate,
                                           white_background=s.white_background, refine=refine)
                else:
                    mask = pseudo_mask(cams, classes, rgb=rgb, labels=known, probs=probs,
                                       prob_threshold=s.prob_threshold, bg_threshold=s.bg_threshold,
                                       bg_alpha=s.bg_alpha, norm=s.norm, white_background=s.white_background)
                save_pseudo_mask(tmp_out / f"{stem}.png", mask, classes)
                if tmp_cams is not None:
                    save_cams(tmp_cams / f"{stem}.{cams_format}", cams)
                done = i
                yield ProgressEvent("step", step=i, steps=n, metrics={"probs": probs.round(4).tolist()}, message=path.name)
    except Cancelled as e:
        yield ProgressEvent("cancelled", step=done, steps=n, message=str(e))
        return
    yield ProgressEvent("done", step=n, steps=n, message=f"{n} pseudo-masks written to {out_dir}")
