"""Datasets: the public WSSS layouts, masked folders, make-patches output and project folders,
read lazily as torch datasets; and ``make_patches``, which turns fully annotated images into a
weakly labelled patch set so that methods can be compared on data that has ground truth.

Supported layouts (autodetected by :func:`load_dataset`):

``luad-histoseg``
    ``training/*-[a b c d].png`` (labels in the name, space separated) plus ``val/`` and
    ``test/`` with ``img/`` + ``mask/`` palette PNG pairs.
``bcss-wsss``
    ``training/*[abcd].png`` (digits, no separator) plus ``val/`` and ``test/`` pairs.
``wsss4luad``
    ``1.training/`` (or ``training/``, ``train/``, ``train_examples/``) ``*-[a, b, c].png``
    plus ``2.validation/``/``val/`` and ``3.testing/``/``test/`` pairs.
``patches``
    the output of :func:`make_patches` (``train/`` in WSSS4LUAD naming, ``patches.csv``,
    ``classes.json``, ``val/`` and ``test/`` pairs).
``masked-folder``
    ``img/`` + ``mask/`` pairs (all go to ``val``), or ``val/`` and/or ``test/`` split folders
    of pairs; no weak training samples (build them with :func:`make_patches`).
``project``
    a project folder (``project.json``): the labelled patches, read lazily from the slides at
    the project's patch size and magnification.

Masks are class-index images (palette/greyscale PNGs read with ``np.array(Image.open(p))``,
never converted to RGB); RGB masks painted in the class colours are mapped back through the
class table. Index ``C`` (``ClassTable.background_index``) is background/exclude.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from napari_histo_wsss.core.data.classes import ClassTable, get_preset
from napari_histo_wsss.core.errors import ClassTableError, DatasetError
from napari_histo_wsss.core.io.atomic import check_output, fsync_dir, fsync_tree
from napari_histo_wsss.core.models.backbones import (  # the models' input normalisation (re-exported)
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from napari_histo_wsss.core.slides.grid import axis_starts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TRAIN_DIRS = ("training", "train", "1.training", "train_examples")
VAL_DIRS = ("val", "validation", "2.validation")
TEST_DIRS = ("test", "testing", "3.testing")
LAYOUTS = ("luad-histoseg", "bcss-wsss", "wsss4luad", "patches", "masked-folder", "project")

# Label group at the end of a file stem, e.g. "...-[1, 0, 1]"; the three separator styles of the
# public datasets map to their class presets.
_LABEL_GROUP = re.compile(r"\[([^\[\]]*)\]$")
_STYLES: tuple[tuple[str, re.Pattern, str], ...] = (
    ("wsss4luad", re.compile(r"^\s*[01](\s*,\s*[01])+\s*$"), ","),
    ("luad-histoseg", re.compile(r"^\s*[01](\s+[01])+\s*$"), " "),
    ("bcss-wsss", re.compile(r"^[01]+$"), ""),
)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# small readers shared by datasets, make_patches and metrics
# ---------------------------------------------------------------------------------------------
def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> float32 ``(3, H, W)`` normalised with the ImageNet mean/std."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"to_tensor expects a uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # e.g. a read-only view of a cached tile: torch wants its own buffer
        rgb = rgb.copy()
    t = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    return (t - _MEAN) / _STD


def list_images(folder: str | Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by stem (sorted), skipping dot-files (temporaries).
    Two files with the same stem (``a.png`` and ``a.jpg``) are ambiguous: DatasetError."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list folder: {e.strerror or e}") from e
    for p in entries:
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in out:
            raise DatasetError(f"{p}: two images share the name {p.stem!r} (also {out[p.stem].name})")
        out[p.stem] = p
    return out


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)``; DatasetError naming the file on failure.

    Float and 16/32-bit greyscale images are refused rather than converted: Pillow would clip
    them to 0..255, silently turning a [0, 1] image (or one holding NaN/Inf) into a black patch."""
    try:
        with Image.open(path) as im:
            if im.mode in ("F", "I") or im.mode.startswith("I;"):
                raise DatasetError(f"{path}: {im.mode} (float or 16/32-bit) image; expected an 8-bit RGB H&E image")
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image: {e}") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image: {e}") from e


def read_index_mask(path: str | Path, classes: ClassTable | None = None) -> np.ndarray:
    """Read a class-index mask as uint8 ``(H, W)``.

    Palette (``P``), greyscale and 16-bit masks: the pixel values are the indices (the palette is
    only how viewers colour them). RGB(A) masks: each colour is looked up in the class table
    (tissue colours, then the background colour); an unknown colour is an error. With ``classes``,
    an index above ``classes.background_index`` is an error naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("LA", "PA"):  # index image with an alpha channel: the alpha is not a class
                arr = np.asarray(im.getchannel(0))
            else:
                arr = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "CMYK", "YCbCr") else im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read mask: {e}") from e
    if arr.ndim == 3:
        if arr.shape[2] != 3:
            raise DatasetError(f"{path}: mask has {arr.shape[2]} channels; expected an index image or RGB")
        if classes is None:
            raise DatasetError(f"{path}: RGB mask needs a class table to map colours to classes")
        arr = _rgb_to_index(arr, classes, path)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"{path}: mask values {int(arr.min())}..{int(arr.max())} are not class indices")
        arr = arr.astype(np.uint8)
    if classes is not None:
        try:
            classes.check_mask(arr, where=str(path))
        except ClassTableError as e:
            raise DatasetError(str(e)) from e
    return arr


def _rgb_to_index(rgb: np.ndarray, classes: ClassTable, path: str | Path) -> np.ndarray:
    cols = [c.color for c in classes.classes]
    cols.append(classes.background.color if classes.background is not None else (255, 255, 255))
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in cols], dtype=np.int64)
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], packed).clip(0, len(keys) - 1)
    found = keys[order][pos] == packed
    if not found.all():
        bad = packed[~found][0]
        raise DatasetError(
            f"{path}: RGB mask colour {(int(bad >> 16), int(bad >> 8 & 255), int(bad & 255))} is not a class colour "
            f"of the table ({', '.join(classes.names)})"
        )
    return order[pos].astype(np.uint8)


def resolve_classes(spec: ClassTable | dict | str | Path) -> ClassTable:
    """A class table from a table, its dict, a preset name (``wsss4luad``...) or a JSON file
    holding ``ClassTable.to_dict()`` (e.g. the ``classes.json`` written by make-patches)."""
    if isinstance(spec, ClassTable):
        return spec
    if isinstance(spec, dict):
        return ClassTable.from_dict(spec)
    path = Path(spec)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            return ClassTable.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except OSError as e:
            raise DatasetError(f"{path}: cannot read class table: {e.strerror or e}") from e
        except (ValueError, ClassTableError) as e:
            raise DatasetError(f"{path}: not a valid class table: {e}") from e
    return get_preset(str(spec))


# ---------------------------------------------------------------------------------------------
# labels in file names
# ---------------------------------------------------------------------------------------------
def parse_label_name(path: str | Path) -> tuple[str, np.ndarray]:
    """Parse the image-level label at the end of a file name.

    Returns ``(style, labels)`` where style names the dataset whose convention it follows:
    ``wsss4luad`` (``-[1, 0, 1]``), ``luad-histoseg`` (``-[1 0 0 1]``) or ``bcss-wsss``
    (``[1010]``). Anything else (no group, other characters, empty) raises DatasetError naming
    the file.
    """
    stem = Path(path).stem
    m = _LABEL_GROUP.search(stem)
    if m is None:
        raise DatasetError(f"{path}: file name has no image-level label '[...]' at its end")
    body = m.group(1)
    for style, pattern, sep in _STYLES:
        if pattern.match(body):
            parts = body.split(sep) if sep == "," else (body.split() if sep == " " else list(body))
            return style, np.array([int(p) for p in parts], dtype=np.uint8)
    raise DatasetError(
        f"{path}: malformed label [{body}] in the file name; expected 0/1 entries as in "
        "'[1, 0, 1]' (WSSS4LUAD), '[1 0 0 1]' (LUAD-HistoSeg) or '[1010]' (BCSS-WSSS)"
    )


def format_label_name(stem: str, labels: Sequence[int] | np.ndarray, suffix: str = ".png") -> str:
    """WSSS4LUAD-style file name ``<stem>-[1, 0, 1].png`` for a multi-hot label vector."""
    return f"{stem}-[{', '.join(str(int(v)) for v in labels)}]{suffix}"


# ---------------------------------------------------------------------------------------------
# samples and the dataset description
# ---------------------------------------------------------------------------------------------
@dataclass
class WeakSample:
    """An image with an image-level multi-hot label. The pixels come from ``path`` or, for
    patches of a slide, from ``reader`` (a picklable callable, so DataLoader workers can use it)."""

    name: str
    labels: np.ndarray
    path: Path | None = None
    reader: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    #: for a patch a pathologist corrected: its class-index mask (pixels not confirmed, and
    #: background, hold the background index), which stage one can learn pixels from
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    def image(self) -> np.ndarray:
        if self.reader is not None:
            return self.reader()
        if self.path is None:
            raise DatasetError(f"sample {self.name!r} has neither a file nor a reader")
        return read_rgb(self.path)


@dataclass
class MaskedSample:
    """An image with a class-index mask of the same size (``classes`` validates the indices)."""

    name: str
    image_path: Path
    mask_path: Path
    classes: ClassTable | None = field(default=None, repr=False, compare=False)

    def image(self) -> np.ndarray:
        return read_rgb(self.image_path)

    def mask(self) -> np.ndarray:
        """uint8 ``(H, W)`` class indices; DatasetError on a size mismatch or a bad index."""
        mask = read_index_mask(self.mask_path, self.classes)
        w, h = image_size(self.image_path)
        if mask.shape != (h, w):
            raise DatasetError(
                f"{self.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                f"{self.image_path.name} is {w}x{h} px"
            )
        return mask

    @cached_property
    def labels(self) -> np.ndarray:
        """(C,) uint8 multi-hot: a tissue class is present if any mask pixel has it."""
        if self.classes is None:
            raise DatasetError(f"{self.mask_path}: image-level labels need a class table")
        counts = np.bincount(self.mask().ravel(), minlength=self.classes.background_index + 1)
        return (counts[: self.classes.num_classes] > 0).astype(np.uint8)


@dataclass
class DatasetSpec:
    """What :func:`load_dataset` found: layout, class table and the three splits."""

    root: Path
    layout: str
    classes: ClassTable
    train: list[WeakSample]
    val: list[MaskedSample]
    test: list[MaskedSample]

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"{self.root} ({self.layout}, classes {', '.join(self.classes.names)}): "
            f"{len(self.train)} weakly labelled train, {len(self.val)} val and {len(self.test)} test images with masks"
        )


# ---------------------------------------------------------------------------------------------
# layout detection and loading
# ---------------------------------------------------------------------------------------------
def _project_root(root: Path) -> Path | None:
    if root.is_file() and root.name == "project.json":
        return root.parent
    if (root / "project.json").is_file():
        return root
    return None


def _weak_dir(root: Path) -> Path | None:
    """The folder holding weakly labelled images (labels in names), if any."""
    for name in TRAIN_DIRS:
        d = root / name
        if d.is_dir() and not (d / "img").is_dir() and list_images(d):
            return d
    if root.is_dir() and any("[" in stem for stem in list_images(root)):
        return root
    return None


def _split_dirs(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        d = root / name
        if (d / "img").is_dir() and (d / "mask").is_dir():
            return d
    return None


def detect_layout(path: str | Path) -> str:
    """Name of the layout of a dataset folder (one of :data:`LAYOUTS`); DatasetError if none."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found")
    if _project_root(root) is not None:
        return "project"
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (nor a project.json)")
    if (root / "patches.csv").is_file() and (root / "classes.json").is_file() and (root / "train").is_dir():
        return "patches"
    weak = _weak_dir(root)
    if weak is not None:
        first = next(iter(list_images(weak).values()))
        return parse_label_name(first)[0]
    if ((root / "img").is_dir() and (root / "mask").is_dir()) or _split_dirs(root, VAL_DIRS + TEST_DIRS):
        return "masked-folder"
    raise DatasetError(
        f"{root}: no recognised dataset layout; expected a training folder ({', '.join(TRAIN_DIRS)}) of images "
        "named '...-[1, 0, 1].png', img/ + mask/ folders, val/ or test/ with img/ + mask/, make-patches output "
        "(patches.csv, classes.json) or a project folder (project.json)"
    )


def _masked_samples(img_dir: Path, mask_dir: Path, classes: ClassTable) -> list[MaskedSample]:
    images, masks = list_images(img_dir), list_images(mask_dir)
    for stem, p in images.items():
        if stem not in masks:
            raise DatasetError(f"{p}: image has no mask of the same name in {mask_dir}")
    for stem, p in masks.items():
        if stem not in images:
            raise DatasetError(f"{p}: mask has no image of the same name in {img_dir}")
    out = []
    for stem, ip in images.items():
        mp = masks[stem]
        (w, h), (mw, mh) = image_size(ip), image_size(mp)
        if (w, h) != (mw, mh):
            raise DatasetError(f"{mp}: mask is {mw}x{mh} px but its image {ip.name} is {w}x{h} px")
        out.append(MaskedSample(stem, ip, mp, classes))
    return out


def _weak_samples(folder: Path, classes: ClassTable) -> list[WeakSample]:
    out = []
    for stem, p in list_images(folder).items():
        labels = parse_label_name(p)[1]
        if labels.shape[0] != classes.num_classes:
            raise DatasetError(
                f"{p}: label {labels.tolist()} has {labels.shape[0]} entries but the class table has "
                f"{classes.num_classes} ({', '.join(classes.names)})"
            )
        out.append(WeakSample(stem, labels, p))
    return out


def load_dataset(path: str | Path, classes: ClassTable | dict | str | Path | None = None) -> DatasetSpec:
    """Detect the layout of ``path`` and list its samples (no pixels are read).

    The class table is, in order of precedence: ``classes`` (table, preset name or JSON file),
    a ``classes.json`` in the dataset folder, the preset of the detected public layout, or the
    project's table. Label vectors whose length differs from the table's are an error naming the
    file, as are unpaired or differently sized images and masks.
    """
    root = Path(path)
    layout = detect_layout(root)
    table = resolve_classes(classes) if classes is not None else None
    if layout == "project":
        return _load_project(_project_root(root), table)
    if table is None and (root / "classes.json").is_file():
        table = resolve_classes(root / "classes.json")
    if table is None:
        if layout == "masked-folder":
            raise DatasetError(f"{root}: a folder of img/ + mask/ pairs needs a class table (a preset name or classes.json)")
        table = get_preset(layout)  # the public layouts are named after their presets

    train: list[WeakSample] = []
    if layout == "patches":
        train = _weak_samples(root / "train", table)
    elif layout != "masked-folder":
        train = _weak_samples(_weak_dir(root), table)
    val_dir, test_dir = _split_dirs(root, VAL_DIRS), _split_dirs(root, TEST_DIRS)
    val = _masked_samples(val_dir / "img", val_dir / "mask", table) if val_dir else []
    test = _masked_samples(test_dir / "img", test_dir / "mask", table) if test_dir else []
    if layout == "masked-folder" and (root / "img").is_dir() and (root / "mask").is_dir():
        val = _masked_samples(root / "img", root / "mask", table) + val
    return DatasetSpec(root, layout, table, train, val, test)


@dataclass(frozen=True)
class SlidePatchReader:
    """Reads one labelled patch from a slide: the level-0 box ``(x, y, size0, size0)`` resampled
    to ``patch_size`` pixels (the project's working resolution). Picklable; each process keeps
    its own small cache of open slides."""

    slide_path: str
    x: int
    y: int
    size0: int
    patch_size: int

    def __call__(self) -> np.ndarray:
        from napari_histo_wsss.core.slides.grid import read_patch

        return read_patch(_cached_slide(self.slide_path), self.x, self.y, self.size0, self.patch_size)


@lru_cache(maxsize=8)
def _cached_slide(path: str):
    from napari_histo_wsss.core.slides.slide import open_slide

    return open_slide(path)


def _load_project(root: Path, table: ClassTable | None) -> DatasetSpec:
    from napari_histo_wsss.core.data.project import Project

    project = Project.open(root)
    if table is not None and table.names != project.classes.names:
        raise DatasetError(
            f"{root / 'project.json'}: the project's classes ({', '.join(project.classes.names)}) differ from "
            f"the requested table ({', '.join(table.names)})"
        )
    labels = project.patch_labels()
    patch_size = int(project.settings["patch_size"])
    rows: dict[tuple[str, int, int, int], np.ndarray] = {}
    for i in range(len(labels)):
        rows[(str(labels.slide_id[i]), int(labels.x[i]), int(labels.y[i]), int(labels.size0[i]))] = labels.labels[i].copy()
    masks: dict[tuple[str, int, int, int], np.ndarray] = {}
    for sid in project.slides:  # exact labels where the pathologist corrected or reviewed the pseudo-mask
        for (x, y, s0), (lab, mask) in reviewed_patches(project, sid).items():
            rows[(sid, x, y, s0)] = lab
            masks[(sid, x, y, s0)] = _resize(mask, patch_size, Image.NEAREST)
    paths: dict[str, str] = {}
    train = []
    for key, lab in rows.items():
        sid, x, y, s0 = key
        if sid not in paths:
            paths[sid] = str(project.slide_path(sid))
        reader = SlidePatchReader(paths[sid], x, y, s0, patch_size)
        train.append(WeakSample(f"{sid}_{x}_{y}_{s0}", lab, None, reader, mask=masks.get(key)))
    return DatasetSpec(root, "project", project.classes, train, [], [])


#: A grid patch takes its labels from the corrected mask when at least this share of it was
#: corrected or marked reviewed by the pathologist ...
REVIEWED_PATCH_SHARE = 0.9
#: ... and then has every class covering at least this share of it.
REVIEWED_CLASS_SHARE = 0.02


def reviewed_patch_labels(project: Any, slide_id: str) -> dict[tuple[int, int, int], np.ndarray]:
    """Exact image-level labels of the slide's grid patches that the pathologist settled in the
    Review step: a patch at least :data:`REVIEWED_PATCH_SHARE` covered by corrected or reviewed
    pixels gets the classes of the corrected mask there (each covering at least
    :data:`REVIEWED_CLASS_SHARE` of the patch). These replace the patch's own label: they come from
    pixels a pathologist checked. ``{(x, y, size0): labels}``; empty without corrections."""
    return {key: lab for key, (lab, _) in reviewed_patches(project, slide_id).items()}


def reviewed_patches(project: Any, slide_id: str) -> dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]:
    """:func:`reviewed_patch_labels` with each patch's corrected mask at the review canvas's
    resolution: ``{(x, y, size0): (labels, mask)}``, the mask a uint8 class-index crop in which
    pixels neither corrected nor marked reviewed hold the background index (not learned from)."""
    from napari_histo_wsss.core.review import MASK_CORRECTED, MASK_CORRECTED_FLAG, MASK_REVIEWED

    corrected = project.read_mask(slide_id, MASK_CORRECTED)
    if corrected is None:
        return {}
    corr, ds = corrected
    confirmed = np.zeros(corr.shape, dtype=bool)
    for name in (MASK_CORRECTED_FLAG, MASK_REVIEWED):
        m = project.read_mask(slide_id, name)
        if m is not None and m[0].shape == corr.shape:
            confirmed |= m[0].astype(bool)
    if not confirmed.any():
        return {}
    k = project.classes.num_classes
    grid = project.grid(slide_id)
    out: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
    n = max(1, int(round(grid.size0 / ds)))
    for x, y in zip(grid.x.tolist(), grid.y.tolist()):
        r0, c0 = int(round(y / ds)), int(round(x / ds))
        conf = confirmed[r0:r0 + n, c0:c0 + n]
        if conf.size == 0 or conf.sum() < REVIEWED_PATCH_SHARE * n * n:
            continue
        part = corr[r0:r0 + n, c0:c0 + n]
        share = np.bincount(part.ravel(), minlength=k + 1)[:k] / float(n * n)
        lab = (share >= REVIEWED_CLASS_SHARE).astype(np.uint8)
        if lab.any():
            mask = np.full((n, n), k, dtype=np.uint8)  # a patch at the slide's edge: the rest stays background
            ph, pw = part.shape
            mask[:ph, :pw] = np.where(conf, np.minimum(part, k), k)
            out[(int(x), int(y), int(grid.size0))] = (lab, mask)
    return out


# ---------------------------------------------------------------------------------------------
# torch datasets
# ---------------------------------------------------------------------------------------------
def _resize(arr: np.ndarray, size: int | None, resample: int) -> np.ndarray:
    if size is None or arr.shape[:2] == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), resample))


def _random_geometry() -> tuple[bool, bool, int]:
    """Horizontal flip, vertical flip, number of 90-degree turns (torch RNG, so DataLoader
    worker seeding and ``torch.manual_seed`` make it reproducible)."""
    r = torch.randint(0, 4, (3,)).tolist()
    return r[0] % 2 == 1, r[1] % 2 == 1, r[2]


def _apply_geometry(arr: np.ndarray, geom: tuple[bool, bool, int]) -> np.ndarray:
    flip_h, flip_v, k = geom
    if flip_h:
        arr = arr[:, ::-1]
    if flip_v:
        arr = arr[::-1]
    if k:
        arr = np.rot90(arr, k)
    return np.ascontiguousarray(arr)


def _colour_jitter(rgb: np.ndarray, strength: float = 0.1) -> np.ndarray:
    """Mild brightness, contrast and saturation jitter (factors in 1 +- strength), H&E-safe."""
    b, c, s = (1.0 + (torch.rand(3) * 2 - 1) * strength).tolist()
    x = rgb.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = (x - grey) * s + grey
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB), rows in optical density per RGB
# channel, as in scikit-image's ``rgb2hed``; their inverse splits an image's optical density into
# the three stains.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def stain_jitter(rgb: np.ndarray, sigma: float, generator: torch.Generator | None = None) -> np.ndarray:
    """H&E stain augmentation (Tellez et al., 2018): the image's optical density is split into
    haematoxylin, eosin and DAB, each stain's amount is scaled by ``1 + U(-sigma, sigma)`` and
    shifted by ``U(-sigma, sigma)``, and the image is put back together. ``sigma`` 0 returns the
    image unchanged (up to rounding). The draws come from torch's RNG (``generator`` or the global
    one, as the loader workers seed it)."""
    if sigma <= 0:
        return rgb
    r = (torch.rand(6, generator=generator).numpy().astype(np.float64) * 2 - 1) * float(sigma)
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    hed = od @ _HED_FROM_RGB
    hed = hed * (1.0 + r[:3]) + r[3:]
    out = 256.0 * np.exp(-(hed @ _RGB_FROM_HED)) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class WeakLabelDataset(torch.utils.data.Dataset):
    """``(image (3, H, W) float normalised, labels (C,) float)`` from weak samples, read lazily.
    ``size`` resizes to ``size`` x ``size`` (needed to batch images of different sizes);
    ``augment`` adds random flips, 90-degree rotations and mild colour jitter, and with ``stain`` > 0
    an H&E stain jitter of that strength (:func:`stain_jitter`). ``masks``: each
    item also has a class-index mask ``(H, W)`` long with the same geometry, the sample's
    corrected :attr:`WeakSample.mask` or, without one, ``background`` everywhere (nothing to learn)."""

    def __init__(self, samples: Sequence[WeakSample], size: int | None = None, augment: bool = False,
                 masks: bool = False, background: int = 0, stain: float = 0.0):
        self.samples = list(samples)
        self.size = size
        self.augment, self.stain = augment, float(stain)
        self.masks, self.background = masks, int(background)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        s = self.samples[i]
        img = _resize(s.image(), self.size, Image.BILINEAR)
        mask = None
        if self.masks:
            mask = (np.full(img.shape[:2], self.background, dtype=np.uint8) if s.mask is None
                    else np.asarray(s.mask, dtype=np.uint8))
            if mask.shape != img.shape[:2]:  # to the (resized) image's size
                mask = np.asarray(Image.fromarray(mask).resize((img.shape[1], img.shape[0]), Image.NEAREST))
        if self.augment:
            geom = _random_geometry()
            img = _colour_jitter(stain_jitter(_apply_geometry(img, geom), self.stain))
            if mask is not None:
                mask = _apply_geometry(mask, geom)
        labels = torch.from_numpy(s.labels.astype(np.float32))
        if mask is None:
            return to_tensor(img), labels
        return to_tensor(img), labels, torch.from_numpy(mask.astype(np.int64))


class MaskedDataset(torch.utils.data.Dataset):
    """``(image (3, H, W) float normalised, mask (H, W) long)`` from masked samples, read lazily;
    the same geometric augmentation is applied to image and mask, colour jitter to the image."""

    def __init__(self, samples: Sequence[MaskedSample], size: int | None = None, augment: bool = False):
        self.samples = list(samples)
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        img = _resize(s.image(), self.size, Image.BILINEAR)
        mask = _resize(s.mask(), self.size, Image.NEAREST)
        if self.augment:
            geom = _random_geometry()
            img = _colour_jitter(_apply_geometry(img, geom))
            mask = _apply_geometry(mask, geom)
        return to_tensor(img), torch.from_numpy(mask.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# make_patches: fully annotated images -> weakly labelled patch set
# ---------------------------------------------------------------------------------------------
def _split_count(fraction: float, n: int) -> int:
    if fraction <= 0:
        return 0
    return max(1, int(round(fraction * n)))


def _combo_name(labels: np.ndarray, names: Sequence[str]) -> str:
    return "+".join(n for n, v in zip(names, labels) if v) or "(none)"


def make_patches(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    classes: ClassTable | dict | str | Path,
    patch_size: int = 224,
    stride: int | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_class_fraction: float = 0.0,
    min_tissue: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Build a weakly labelled patch set from images with class-index masks.

    Images and masks are paired by file stem. Images are split **by image** (seeded shuffle) into
    train/val/test, so that no held-out image contributes a training patch; at least one image is
    held out for a non-zero fraction and at least one is kept for training. Held-out images and
    their masks are copied unchanged to ``out_dir/{val,test}/{img,mask}``.

    Training images are cut into ``patch_size`` patches every ``stride`` px (default: no overlap),
    plus a patch flush with the right/bottom edge, so that the patches cover the whole image. An
    image smaller than ``patch_size`` along an axis is padded (bottom/right) with white pixels that
    the mask marks background, rather than skipped: the WSSS4LUAD images are as small as 202 px.
    A patch's label has class ``c`` when ``c`` covers more than 0 and at least ``min_class_fraction``
    of the patch (0 = any pixel, the rule of the WSSS4LUAD labels); patches whose tissue
    (non-background) share is below ``min_tissue`` or that end with no class are dropped.

    Writes ``train/<stem>_<x>_<y>-[1, 0, 1].png`` (WSSS4LUAD naming, ``x, y`` = top-left in the
    image), ``patches.csv`` (file, source image, position, per-class and background fractions,
    labels), ``classes.json`` and ``make_patches.json`` (settings and statistics).

    ``out_dir`` must be empty or absent. The set is built in a hidden staging folder next to it,
    fsynced and renamed into place at the end (the same temp-then-rename rule as
    :mod:`core.io.atomic`, applied to the whole folder): a failed or killed build leaves no
    ``out_dir`` that could be mistaken for a patch set, only a dot-folder that loaders skip and
    the next build does not mind. Returns the statistics plus the settings.
    """
    table = resolve_classes(classes)
    images_dir, masks_dir, out = Path(images_dir), Path(masks_dir), Path(out_dir)
    stride = patch_size if stride is None else int(stride)
    if patch_size < 8 or stride < 1:
        raise DatasetError(f"patch size must be >= 8 and stride >= 1 (got {patch_size}, {stride})")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(f"val and test fractions must be >= 0 and sum to < 1 (got {val_fraction}, {test_fraction})")
    if not 0 <= min_class_fraction <= 1 or not 0 <= min_tissue <= 1:
        raise DatasetError("min_class_fraction and min_tissue must lie in 0..1")
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(f"{d}: folder not found")
    # never in, around or onto the inputs (the emptiness rule below would not catch out inside them)
    check_output(out, inputs=[images_dir, masks_dir], overwrite=True, what="output folder", folder=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output folder exists and is not empty; choose a new folder or delete it")

    images, masks = list_images(images_dir), list_images(masks_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images found")
    for stem, p in images.items():
        if stem not in masks:
            raise DatasetError(f"{p}: image has no mask of the same name in {masks_dir}")
    for stem, p in masks.items():
        if stem not in images:
            raise DatasetError(f"{p}: mask has no image of the same name in {images_dir}")

    stems = sorted(images)
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    n_test, n_val = _split_count(test_fraction, len(stems)), _split_count(val_fraction, len(stems))
    if n_test + n_val >= len(stems):
        raise DatasetError(
            f"{images_dir}: {len(stems)} image(s) cannot give {n_test} test and {n_val} val image(s) and keep one for training"
        )
    split = {"test": sorted(order[:n_test]), "val": sorted(order[n_test : n_test + n_val]), "train": sorted(order[n_test + n_val :])}

    settings = {
        "images_dir": str(images_dir.resolve()), "masks_dir": str(masks_dir.resolve()),
        "patch_size": patch_size, "stride": stride, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "seed": seed, "min_class_fraction": min_class_fraction,
        "min_tissue": min_tissue,
    }
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        stats = _write_patch_set(images, masks, split, staging, table, patch_size, stride,
                                 min_class_fraction, min_tissue, progress)
        (staging / "classes.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n", encoding="utf-8")
        (staging / "make_patches.json").write_text(
            json.dumps({"settings": settings, "statistics": stats}, indent=2) + "\n", encoding="utf-8")
        fsync_tree(staging)
        if out.exists():
            out.rmdir()  # checked empty above; a rename cannot replace a folder on every OS
        os.rename(staging, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise DatasetError(f"{out}: cannot write patches: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; else a failed build
    return {**stats, "settings": settings}


def _write_patch_set(
    images: dict[str, Path],
    masks: dict[str, Path],
    split: dict[str, list[str]],
    out: Path,
    table: ClassTable,
    patch_size: int,
    stride: int,
    min_class_fraction: float,
    min_tissue: float,
    progress: Callable[[int, int], None] | None,
) -> dict:
    """Write the held-out copies, the training patches and ``patches.csv`` of :func:`make_patches`
    into ``out`` (its hidden staging folder) and return the statistics."""
    names = table.names
    bg = table.background_index
    area = patch_size * patch_size
    rows: list[list] = []
    combos: Counter[str] = Counter()
    class_counts = np.zeros(table.num_classes, dtype=np.int64)
    dropped = {"background": 0, "no_label": 0}
    n_padded = 0
    total = sum(len(v) for v in split.values())
    done = 0
    for part in ("val", "test"):
        for stem in split[part]:
            MaskedSample(stem, images[stem], masks[stem], table).mask()  # size and indices checked before the copy
            for src, sub in ((images[stem], "img"), (masks[stem], "mask")):
                (out / part / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / part / sub / src.name)
            done += 1
            if progress is not None:
                progress(done, total)
    (out / "train").mkdir()
    for stem in split["train"]:
        sample = MaskedSample(stem, images[stem], masks[stem], table)
        mask = sample.mask()
        rgb = sample.image()
        h, w = mask.shape
        ph, pw = max(0, patch_size - h), max(0, patch_size - w)
        if ph or pw:
            n_padded += 1
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255)
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=bg)
        for y in axis_starts(mask.shape[0], patch_size, stride):
            for x in axis_starts(mask.shape[1], patch_size, stride):
                frac = np.bincount(mask[y : y + patch_size, x : x + patch_size].ravel(), minlength=bg + 1) / area
                if 1.0 - frac[bg] < min_tissue:
                    dropped["background"] += 1
                    continue
                tissue = frac[: table.num_classes]
                labels = ((tissue > 0) & (tissue >= min_class_fraction)).astype(np.uint8)
                if not labels.any():
                    dropped["no_label"] += 1
                    continue
                fname = format_label_name(f"{stem}_{x}_{y}", labels)
                Image.fromarray(np.ascontiguousarray(rgb[y : y + patch_size, x : x + patch_size])).save(
                    out / "train" / fname, format="PNG")
                rows.append([f"train/{fname}", images[stem].name, x, y, patch_size]
                            + [round(float(f), 6) for f in frac] + labels.tolist())
                combos[_combo_name(labels, names)] += 1
                class_counts += labels
        done += 1
        if progress is not None:
            progress(done, total)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "source", "x", "y", "size"] + [f"frac_{n}" for n in names] + ["frac_background"]
                    + [f"label_{n}" for n in names])
    writer.writerows(rows)
    (out / "patches.csv").write_text(buf.getvalue(), encoding="utf-8")
    return {
        "n_images": {k: len(v) for k, v in split.items()},
        "images": split,
        "n_patches": len(rows),
        "dropped": dropped,
        "n_padded_images": n_padded,
        "label_combinations": dict(combos.most_common()),
        "class_counts": {n: int(c) for n, c in zip(names, class_counts)},
    }
