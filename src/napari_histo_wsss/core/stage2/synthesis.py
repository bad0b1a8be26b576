"""HisynSeg (Fang et al.): synthetic training images with exact masks, built from single-label
patches, and the losses that let a segmenter learn from them.

* **Mosaic** (:func:`mosaic`): four crops of single-class patches meet at a random cut point;
  each crop gets random flips, a quarter turn and a mild shift-scale-rotate. The mask is the
  class of each quadrant.
* **Bezier** (:func:`bezier`): a random closed blob (cubic Bezier curves through random points
  around a centre) cut from a patch of class B is pasted on a patch of class A.
* The pools hold single-label patches that are not mostly white (:data:`MAX_WHITE_SHARE`).
* In both, glass (grey > 200, :func:`~.tissue.white_background_mask`) inside a source patch is
  background in the mask for class tables with ``white_background``, so the masks stay exact.
* **Real-vs-synthetic filter** (:class:`RealnessFilter`): a small CNN discriminator is trained
  for a few hundred steps to tell real patches from synthetic ones; the synthetic images it
  finds most realistic are kept (HisynSeg uses a ResNet-18; a 4-block CNN suffices to catch
  seams and unnatural compositions at a fraction of the cost).
* **Consistency loss** (:func:`consistency_loss`) on real, unlabelled-at-pixel-level patches:
  the segmentation output, pooled to the resolution of the segmenter's image-level CAM head, must
  agree with that CAM; with the head's multi-label loss (:func:`image_level_loss`) it ties the
  synthetic-trained segmenter to real tissue appearance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.data.datasets import WeakSample, to_tensor
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.slides.tissue import white_background_mask

__all__ = [
    "SYNTHESIS_KINDS",
    "MAX_WHITE_SHARE",
    "single_label_pools",
    "pool_keys",
    "group_pools",
    "mosaic",
    "bezier",
    "bezier_blob",
    "synthesize",
    "iter_synthesize",
    "RealnessFilter",
    "most_real",
    "consistency_loss",
    "image_level_loss",
]

SYNTHESIS_KINDS = ("mosaic", "bezier")


#: Single-label patches more than this share white (grey > 200: glass, fat, a gland's lumen) are
#: left out of the synthesis pools: what they would teach is "white = this class". On GlaS at
#: 128 px, half of the gland-only patches are mostly lumen (docs/benchmarks/stage2.md).
MAX_WHITE_SHARE = 0.5


#: :func:`pool_keys` of a single-label patch left out for being mostly white
WHITE = -1


def single_label_pools(samples: Sequence[WeakSample], classes: ClassTable,
                       max_white: float = MAX_WHITE_SHARE) -> dict[int, list[WeakSample]]:
    """Training patches with exactly one tissue class and at most ``max_white`` of white pixels
    (:func:`~.tissue.white_background_mask`), grouped by that class. At least two classes must
    have such patches, else synthesis cannot mix anything (DatasetError)."""
    return group_pools(samples, list(pool_keys(samples, max_white)), classes)


def pool_keys(samples: Sequence[WeakSample], max_white: float = MAX_WHITE_SHARE) -> Iterator[int | None]:
    """Per sample, one at a time: its class when it is a single-label patch of at most
    ``max_white`` white, :data:`WHITE` for a mostly white single-label patch, else None."""
    for s in samples:
        lab = np.asarray(s.labels)
        if lab.sum() != 1:
            yield None
        elif max_white < 1 and white_background_mask(s.image()).mean() > max_white:
            yield WHITE
        else:
            yield int(np.argmax(lab))


def group_pools(samples: Sequence[WeakSample], keys: Sequence[int | None],
                classes: ClassTable) -> dict[int, list[WeakSample]]:
    """The pools of :func:`single_label_pools` from the samples' :func:`pool_keys`."""
    pools: dict[int, list[WeakSample]] = {}
    for s, k in zip(samples, keys):
        if k is not None and k != WHITE:
            pools.setdefault(k, []).append(s)
    white = sum(k == WHITE for k in keys)
    if len(pools) < 2:
        have = ", ".join(classes.names[k] for k in pools) or "none"
        left_out = f" ({white} mostly white single-label patches left out)" if white else ""
        raise DatasetError(f"synthesis needs single-label patches of at least two classes; "
                           f"found them only for: {have}{left_out}")
    return pools


def _fit(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips, a quarter turn and a mild shift-scale-rotate (reflect-padded, so no black corners)."""
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    if rng.random() < 0.5:
        rgb = rgb[::-1]
    rgb = np.rot90(rgb, int(rng.integers(0, 4)))
    size = rgb.shape[0]
    angle = float(rng.uniform(-15, 15))
    scale = float(rng.uniform(0.9, 1.1))
    pad = size // 4
    big = Image.fromarray(np.pad(np.ascontiguousarray(rgb), ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    big = big.rotate(angle, resample=Image.BILINEAR)
    side = size / scale
    dx, dy = rng.uniform(-0.05, 0.05, 2) * size
    cx, cy = big.width / 2 + dx, big.height / 2 + dy
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return np.asarray(big.resize((size, size), Image.BILINEAR, box=box))


def _class_mask(rgb: np.ndarray, cls: int, classes: ClassTable) -> np.ndarray:
    mask = np.full(rgb.shape[:2], cls, dtype=np.uint8)
    if classes.white_background:
        mask[white_background_mask(rgb)] = classes.background_index
    return mask


def _pick(pools: dict[int, list[WeakSample]], cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    items = pools[cls]
    return _fit(items[int(rng.integers(0, len(items)))].image(), size)


def mosaic(pools: dict[int, list[WeakSample]], classes: ClassTable, size: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Mosaic image ``(size, size, 3)`` and its exact class-index mask. The four quadrants use
    at least two different classes."""
    keys = sorted(pools)
    cls = rng.choice(keys, 4).tolist()
    if len(set(cls)) == 1:
        cls[int(rng.integers(0, 4))] = int(rng.choice([k for k in keys if k != cls[0]]))
    cx, cy = (rng.uniform(0.25, 0.75, 2) * size).astype(int)
    img = np.empty((size, size, 3), dtype=np.uint8)
    mask = np.empty((size, size), dtype=np.uint8)
    boxes = [(0, 0, cx, cy), (cx, 0, size, cy), (0, cy, cx, size), (cx, cy, size, size)]
    for k, (x0, y0, x1, y1) in zip(cls, boxes):
        src = _augment(_pick(pools, k, rng, size), rng)
        # a random crop of the source of the quadrant's size
        ox, oy = int(rng.integers(0, size - (x1 - x0) + 1)), int(rng.integers(0, size - (y1 - y0) + 1))
        crop = src[oy:oy + y1 - y0, ox:ox + x1 - x0]
        img[y0:y1, x0:x1] = crop
        mask[y0:y1, x0:x1] = _class_mask(crop, k, classes)
    return img, mask


def bezier_blob(size: int, rng: np.random.Generator, n_points: int = 6, radius: tuple[float, float] = (0.2, 0.4),
                smoothness: float = 0.35) -> np.ndarray:
    """A bool ``(size, size)`` mask of one random closed blob: points at random radii around a
    random centre (evenly spread angles with jitter) joined by cubic Bezier curves whose tangents
    follow the neighbours; a rare self-crossing lobe is dropped (largest region kept, holes filled)."""
    from scipy import ndimage
    from skimage.draw import polygon as fill_polygon

    centre = rng.uniform(0.35, 0.65, 2) * size
    angles = 2 * np.pi * (np.arange(n_points) + rng.uniform(-0.3, 0.3, n_points)) / n_points
    radii = rng.uniform(radius[0], radius[1], n_points) * size
    pts = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    tangent = (nxt - prev) * smoothness / 2
    t = np.linspace(0, 1, 24, endpoint=False)[:, None]
    curve = []
    for i in range(n_points):
        p0, p3 = pts[i], pts[(i + 1) % n_points]
        p1, p2 = p0 + tangent[i], p3 - tangent[(i + 1) % n_points]
        curve.append((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3)
    curve = np.concatenate(curve)
    out = np.zeros((size, size), dtype=bool)
    rr, cc = fill_polygon(curve[:, 1], curve[:, 0], shape=(size, size))
    out[rr, cc] = True
    regions, n = ndimage.label(out)
    if n > 1:
        out = regions == 1 + int(np.argmax(ndimage.sum(out, regions, range(1, n + 1))))
    return ndimage.binary_fill_holes(out)


def bezier(pools: dict[int, list[WeakSample]], classes: ClassTable, size: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Bezier image: a blob of a class-B patch pasted on a class-A patch (A != B), with its
    exact mask."""
    keys = sorted(pools)
    a = int(rng.choice(keys))
    b = int(rng.choice([k for k in keys if k != a]))
    base = _augment(_pick(pools, a, rng, size), rng)
    patch = _augment(_pick(pools, b, rng, size), rng)
    blob = bezier_blob(size, rng)
    img = np.where(blob[..., None], patch, base)
    mask = np.where(blob, _class_mask(patch, b, classes), _class_mask(base, a, classes)).astype(np.uint8)
    return np.ascontiguousarray(img), mask


def iter_synthesize(pools: dict[int, list[WeakSample]], classes: ClassTable, n: int, size: int,
                    kinds: Sequence[str], seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` synthetic ``(image, mask)`` pairs one at a time, alternating the requested ``kinds``;
    deterministic for a seed (pair ``i`` depends only on ``seed`` and ``i``). The kinds are checked
    at the call, before any pair is made."""
    bad = [k for k in kinds if k not in SYNTHESIS_KINDS]
    if bad or not kinds:
        raise DatasetError(f"synthesis kinds must be among {', '.join(SYNTHESIS_KINDS)}, got {list(kinds)}")
    makers = {"mosaic": mosaic, "bezier": bezier}

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(n):
            yield makers[kinds[i % len(kinds)]](pools, classes, size, np.random.default_rng([int(seed), i]))

    return pairs()


def synthesize(pools: dict[int, list[WeakSample]], classes: ClassTable, n: int, size: int, kinds: Sequence[str],
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The list of :func:`iter_synthesize`'s ``n`` pairs."""
    return list(iter_synthesize(pools, classes, n, size, kinds, seed))


class _Discriminator(nn.Module):
    """Four strided conv blocks + global pooling -> one logit (real = positive)."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for k in range(4):
            cout = width * 2**k
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))[:, 0]


@dataclass
class RealnessFilter:
    """Real-vs-synthetic discriminator used to keep the most realistic synthetic images.

    ``fit`` trains it on real patches and synthetic images (balanced batches, Adam, random flips),
    ``scores`` gives the probability of "real" per image and ``keep`` the indices of the most
    realistic ``fraction`` of a synthetic set. ``fit_steps`` and ``score_batches`` do the same
    work one optimiser step / one batch of :attr:`SCORE_BATCH` images at a time, so that a caller
    can report progress and stop between them."""

    #: images scored per forward pass
    SCORE_BATCH = 64

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    size: int = 128
    seed: int = 0
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = _Discriminator().to(self.device)

    def _batch(self, images: Sequence[np.ndarray]) -> Tensor:
        return torch.stack([to_tensor(_fit(np.ascontiguousarray(im), self.size)) for im in images]).to(self.device)

    def fit(self, real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray]) -> list[float]:
        """Train; returns the loss per step."""
        return list(self.fit_steps(real, synthetic))

    def fit_steps(self, real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray]) -> Iterator[float]:
        """Train, yielding the loss after each of the :attr:`steps` steps. The inputs are checked
        at the call."""
        if not real or not synthetic:
            raise DatasetError("the realness filter needs real and synthetic images to learn from")
        return self._fit_steps(real, synthetic)

    def _fit_steps(self, real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray]) -> Iterator[float]:
        rng = np.random.default_rng(self.seed)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.model.train()
        half = max(1, self.batch_size // 2)
        for _ in range(self.steps):
            r = [real[i] for i in rng.integers(0, len(real), half)]
            s = [synthetic[i] for i in rng.integers(0, len(synthetic), half)]
            x = self._batch(r + s)
            if rng.random() < 0.5:
                x = torch.flip(x, dims=[3])
            y = torch.cat([torch.ones(len(r)), torch.zeros(len(s))]).to(self.device)
            loss = F.binary_cross_entropy_with_logits(self.model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            yield loss.item()

    def score_batches(self, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """Probability of being real, per image, in batches of :attr:`SCORE_BATCH` images."""
        self.model.eval()
        for i in range(0, len(images), self.SCORE_BATCH):
            with torch.no_grad():
                yield torch.sigmoid(self.model(self._batch(images[i:i + self.SCORE_BATCH]))).cpu().numpy()

    def scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probability of being real, per image."""
        out = list(self.score_batches(images))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def keep(self, synthetic: Sequence[np.ndarray], fraction: float) -> np.ndarray:
        """Indices (sorted) of the ``fraction`` most realistic synthetic images (at least one)."""
        return most_real(self.scores(synthetic), fraction)


def most_real(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (sorted) of the ``fraction`` highest realness ``scores`` (at least one)."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"the kept fraction of synthetic images must lie in (0, 1], got {fraction}")
    n = max(1, int(math.ceil(fraction * len(scores))))
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def consistency_loss(logits: Tensor, cam: Tensor) -> Tensor:
    """Mean squared difference between the segmentation's class distribution (softmax of
    ``logits`` (B, C, H, W), average-pooled to the CAM's size) and the CAM head's
    (softmax of ``cam`` (B, C, h, w)). Both sides receive gradients, as in HisynSeg."""
    c = cam.shape[1]
    p_seg = F.adaptive_avg_pool2d(torch.softmax(logits[:, :c].float(), dim=1), cam.shape[-2:])
    p_cam = torch.softmax(cam.float(), dim=1)
    return ((p_seg - p_cam) ** 2).sum(dim=1).mean()


def image_level_loss(aux_logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label soft-margin (sigmoid BCE) loss of the image-level head on multi-hot labels."""
    return F.binary_cross_entropy_with_logits(aux_logits.float(), labels.float())
