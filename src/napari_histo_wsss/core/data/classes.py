"""Tissue class tables: names, colours, indices, and the presets of the public WSSS datasets.

Convention used everywhere in the project: tissue classes are indexed ``0..C-1`` in the order of
the table; the background/exclude class (white glass, unlabelled) has index ``C`` (the table's
``background_index``) and is ignored by losses and metrics. Label vectors are multi-hot over the
``C`` tissue classes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from napari_histo_wsss.core.errors import ClassTableError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ClassDef:
    name: str
    color: RGB
    abbrev: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "color": list(self.color), "abbrev": self.abbrev}

    @classmethod
    def from_dict(cls, d: dict) -> ClassDef:
        color = tuple(int(c) for c in d["color"])
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ClassTableError(f"class {d.get('name')!r}: colour must be three integers 0-255, got {d['color']!r}")
        return cls(name=str(d["name"]), color=color, abbrev=str(d.get("abbrev", "")))


@dataclass(frozen=True)
class ClassTable:
    """Tissue classes (index = position) plus an optional background/exclude class.

    ``white_background``: whether white (grey > 200) pixels are forced to background when making
    pseudo-masks (on for lung presets, off for breast where white is often fat).
    """

    classes: tuple[ClassDef, ...]
    background: ClassDef | None = ClassDef("background", (255, 255, 255), "BG")
    white_background: bool = True
    preset: str = "custom"

    def __post_init__(self):
        if len(self.classes) < 1:
            raise ClassTableError("a class table needs at least one tissue class")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ClassTableError(f"class names must be unique, got {names}")

    # -- sizes and indices -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of tissue classes (excluding background)."""
        return len(self.classes)

    @property
    def background_index(self) -> int:
        """Index used for background/exclude pixels in masks (== num_classes)."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> np.ndarray:
        """(C, 3) uint8 tissue class colours."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def index_of(self, name_or_abbrev: str) -> int:
        key = name_or_abbrev.strip().lower()
        for i, c in enumerate(self.classes):
            if key in (c.name.lower(), c.abbrev.lower()):
                return i
        raise ClassTableError(f"unknown class {name_or_abbrev!r}; known classes: {', '.join(self.names)}")

    def palette(self) -> list[int]:
        """A 768-entry PIL palette: tissue colours, then background colour, then black."""
        cols = [c.color for c in self.classes]
        cols.append(self.background.color if self.background is not None else (255, 255, 255))
        flat = [v for c in cols for v in c]
        return flat + [0] * (768 - len(flat))

    def label_colormap(self) -> dict[int | None, tuple[float, float, float, float]]:
        """napari Labels colour dict: value -> RGBA in 0..1 (class index + 1 is NOT used: napari
        Labels value 0 is transparent, so layers store ``class_index + 1`` and 0 = unlabelled)."""
        out: dict[int | None, tuple[float, float, float, float]] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        for i, c in enumerate(self.classes):
            out[i + 1] = (c.color[0] / 255, c.color[1] / 255, c.color[2] / 255, 1.0)
        if self.background is not None:
            b = self.background.color
            out[self.background_index + 1] = (b[0] / 255, b[1] / 255, b[2] / 255, 1.0)
        return out

    def check_labels(self, labels: Sequence[int] | np.ndarray, where: str = "") -> np.ndarray:
        """Validate a multi-hot vector against the table; return it as uint8."""
        arr = np.asarray(labels)
        if arr.ndim != 1 or arr.shape[0] != self.num_classes:
            raise ClassTableError(
                f"{where + ': ' if where else ''}label vector has {arr.shape[-1] if arr.ndim else 0} entries, "
                f"the class table has {self.num_classes} ({', '.join(self.names)})"
            )
        if not np.isin(arr, (0, 1)).all():
            raise ClassTableError(f"{where + ': ' if where else ''}labels must be 0/1, got {arr.tolist()}")
        return arr.astype(np.uint8)

    def check_mask(self, mask: np.ndarray, where: str = "") -> None:
        """Raise if a class-index mask holds a value outside 0..background_index."""
        if mask.size and int(mask.max()) > self.background_index:
            bad = np.unique(mask[mask > self.background_index])[:10].tolist()
            raise ClassTableError(
                f"{where + ': ' if where else ''}mask holds class index(es) {bad} outside the class table "
                f"(0..{self.background_index - 1} tissue, {self.background_index} background)"
            )

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "classes": [c.to_dict() for c in self.classes],
            "background": self.background.to_dict() if self.background is not None else None,
            "white_background": self.white_background,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        try:
            return cls(
                classes=tuple(ClassDef.from_dict(c) for c in d["classes"]),
                background=ClassDef.from_dict(d["background"]) if d.get("background") else None,
                white_background=bool(d.get("white_background", True)),
                preset=str(d.get("preset", "custom")),
            )
        except (KeyError, TypeError) as e:
            raise ClassTableError(f"malformed class table: missing or bad field {e}") from e

    @classmethod
    def custom(cls, names: Iterable[str], colors: Iterable[RGB] | None = None, white_background: bool = True) -> ClassTable:
        names = list(names)
        colors = list(colors) if colors is not None else [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))]
        if len(colors) != len(names):
            raise ClassTableError(f"{len(names)} class names but {len(colors)} colours")
        return cls(tuple(ClassDef(n, tuple(c)) for n, c in zip(names, colors)), white_background=white_background)


DEFAULT_COLORS: list[RGB] = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
]

_WHITE = ClassDef("background", (255, 255, 255), "BG")

PRESETS: dict[str, ClassTable] = {
    # LUAD-HistoSeg (Han et al. 2022, MLPS): lung, 10x, 224 px.
    "luad-histoseg": ClassTable(
        classes=(
            ClassDef("tumor epithelium", (205, 51, 51), "TE"),
            ClassDef("necrosis", (0, 255, 0), "NEC"),
            ClassDef("lymphocyte", (65, 105, 225), "LYM"),
            ClassDef("tumor-associated stroma", (255, 165, 0), "TAS"),
        ),
        background=_WHITE, white_background=True, preset="luad-histoseg",
    ),
    # BCSS-WSSS: breast; white is often fat, so no forced white background.
    "bcss-wsss": ClassTable(
        classes=(
            ClassDef("tumor", (255, 0, 0), "TUM"),
            ClassDef("stroma", (0, 255, 0), "STR"),
            ClassDef("lymphocytic infiltrate", (0, 0, 255), "LYM"),
            ClassDef("necrosis", (153, 0, 255), "NEC"),
        ),
        background=_WHITE, white_background=False, preset="bcss-wsss",
    ),
    # WSSS4LUAD challenge: lung, 3 tissue classes.
    "wsss4luad": ClassTable(
        classes=(
            ClassDef("tumor", (0, 64, 128), "TUM"),
            ClassDef("stroma", (64, 128, 0), "STR"),
            ClassDef("normal", (243, 152, 0), "NOR"),
        ),
        background=_WHITE, white_background=True, preset="wsss4luad",
    ),
    # GlaS as a 2-class gland / other-tissue problem (HistoSegNet's G.O vs Other). Its ground
    # truth labels every pixel (a gland's pale lumen is gland), so white is not forced to background.
    "glas": ClassTable(
        classes=(
            ClassDef("gland", (200, 40, 120), "G"),
            ClassDef("other tissue", (80, 160, 220), "O"),
        ),
        background=_WHITE, white_background=False, preset="glas",
    ),
}


def get_preset(name: str) -> ClassTable:
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ClassTableError(f"unknown class preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
