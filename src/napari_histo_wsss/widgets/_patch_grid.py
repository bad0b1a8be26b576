"""The patch grid of a slide as ONE napari layer: labels, selection, mouse and keys.

Why one image and not 10,000 shapes: a Shapes layer redraws every polygon on every change and
becomes unusable beyond a few thousand patches. Here the grid is an RGBA image with ``k x k``
pixels per patch (``k`` up to 32, fewer for very large grids), placed over the slide with
``scale = grid step / k``. Each patch cell shows a thin outline (unlabelled), vertical stripes of
its classes' colours (multi-label patches show every class) or a yellow frame (selected). An edit
rewrites only the cells of the patches it touched, with cell tiles looked up per distinct
(labels, selected) combination, so a click costs the same on a 100-patch and a 100,000-patch grid
apart from one texture upload.

Interaction (while the grid layer is the active layer and "select" is on):
    click: select one patch; Shift+click: add/remove it; drag: select a rectangle (Shift: add);
    1..9: toggle class k on the selection; 0: clear its labels; Ctrl+Z: undo; Escape: deselect;
    hold Space: pan the view with the mouse.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from napari_histo_wsss.core.data.classes import ClassTable
    from napari_histo_wsss.core.slides.grid import PatchGrid
    from napari_histo_wsss.widgets._state import Session

log = logging.getLogger(__name__)

GRID_LAYER = "patch grid"

_OUTLINE = np.array([235, 235, 235, 120], dtype=np.uint8)   # unlabelled patch frame
_SELECT = np.array([255, 221, 0, 255], dtype=np.uint8)      # selected patch frame
_FILL_ALPHA = 115
_EDGE_ALPHA = 235
_MAX_UNDO = 200


class PatchGridOverlay:
    """Draws and edits the multi-hot labels of a :class:`~napari_histo_wsss.core.slides.grid.PatchGrid`.

    ``labels`` is the (N, C) uint8 array the overlay edits in place; every edit calls
    ``on_edit(indices)`` (the caller saves those rows to the project) and ``on_change()`` (legend,
    counts). ``on_message(text)`` receives hints such as "select patches first".
    """

    def __init__(
        self,
        session: Session,
        grid: PatchGrid,
        classes: ClassTable,
        labels: np.ndarray,
        on_edit: Callable[[np.ndarray], None],
        on_change: Callable[[], None],
        on_message: Callable[[str], None],
    ) -> None:
        n = len(grid)
        if labels.shape != (n, classes.num_classes):
            raise ValueError(f"labels must be ({n}, {classes.num_classes}), got {labels.shape}")
        self.session = session
        self.grid = grid
        self.classes = classes
        self.labels = labels
        self.selected = np.zeros(n, dtype=bool)
        self._on_edit = on_edit
        self._on_change = on_change
        self._on_message = on_message
        self._undo: list[tuple[np.ndarray, np.ndarray]] = []
        self._tiles: dict[int, np.ndarray] = {}
        self._select_mode = True
        self._panning = False
        self.layer: Any = None
        self._geometry()
        self.image = np.zeros((self.n_rows * self.k, self.n_cols * self.k, 4), dtype=np.uint8)
        self._render(np.arange(n))

    # -- geometry ----------------------------------------------------------------------------------
    def _geometry(self) -> None:
        """Lay patches on a regular cell raster: cell = grid step (the stride, usually size0)."""
        g = self.grid
        x = np.asarray(g.x, dtype=np.int64)
        y = np.asarray(g.y, dtype=np.int64)
        size0 = int(g.size0)
        if len(x):
            ox, oy = int(x.min()), int(y.min())
            step = int(np.gcd.reduce(np.concatenate([x - ox, y - oy, [size0]])))
            if step < max(1, size0 // 8):  # irregular positions: cells of one patch size, rounded
                step = size0
        else:
            ox = oy = 0
            step = size0
        self.origin = (ox, oy)
        self.step = step
        self.cols = np.rint((x - ox) / step).astype(np.int64)
        self.rows = np.rint((y - oy) / step).astype(np.int64)
        self.n_cols = int(self.cols.max()) + 1 if len(x) else 1
        self.n_rows = int(self.rows.max()) + 1 if len(x) else 1
        self.k = cell_pixels(self.n_rows * self.n_cols)

    # -- rendering ---------------------------------------------------------------------------------
    def _tile(self, code: int) -> np.ndarray:
        """The k x k RGBA cell of a patch with label bits ``code >> 1`` and selected ``code & 1``."""
        tile = self._tiles.get(code)
        if tile is not None:
            return tile
        k = self.k
        bits, sel = code >> 1, code & 1
        present = [i for i in range(self.classes.num_classes) if bits >> i & 1]
        tile = np.zeros((k, k, 4), dtype=np.uint8)
        colors = self.classes.colors
        if present:
            edges = np.linspace(0, k, len(present) + 1).round().astype(int)
            for j, ci in enumerate(present):
                tile[:, edges[j]:edges[j + 1], :3] = colors[ci]
                tile[:, edges[j]:edges[j + 1], 3] = _FILL_ALPHA
            edge = np.append((colors[present[0]] * 0.55).astype(np.uint8), _EDGE_ALPHA)
        else:
            edge = _OUTLINE
        e = max(1, k // 16)
        tile[:e, :], tile[-e:, :], tile[:, :e], tile[:, -e:] = edge, edge, edge, edge
        if sel:
            w = max(1, k // 12)
            tile[:w, :], tile[-w:, :], tile[:, :w], tile[:, -w:] = _SELECT, _SELECT, _SELECT, _SELECT
        self._tiles[code] = tile
        return tile

    def _codes(self, idx: np.ndarray) -> np.ndarray:
        weights = (1 << np.arange(self.classes.num_classes, dtype=np.int64))
        bits = self.labels[idx].astype(np.int64) @ weights
        return bits * 2 + self.selected[idx].astype(np.int64)

    def _render(self, idx: np.ndarray) -> None:
        """Rewrite the cells of patches ``idx`` in the image (no layer refresh)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        codes = self._codes(idx)
        uniq, inv = np.unique(codes, return_inverse=True)
        tiles = np.stack([self._tile(int(c)) for c in uniq])
        k = self.k
        cells = self.image.reshape(self.n_rows, k, self.n_cols, k, 4)
        cells[self.rows[idx], :, self.cols[idx], :, :] = tiles[inv.ravel()]

    def _redraw(self, idx: np.ndarray) -> None:
        self._render(idx)
        if self.layer is not None:
            self.layer.refresh()

    # -- layer -------------------------------------------------------------------------------------
    def show(self) -> Any:
        """Add (or re-add) the grid layer over the slide and bind mouse and keys to it."""
        viewer = self.session.viewer
        old = self.session.layer(GRID_LAYER)
        if old is not None:
            viewer.layers.remove(old)
        tf = self.session.overlay_transform(self.step / self.k, origin=self.origin)
        layer = viewer.add_image(
            self.image, rgb=True, name=GRID_LAYER, blending="translucent", opacity=1.0,
            contrast_limits=(0, 255), **tf,
        )
        layer.metadata["histo_wsss"] = "patch-grid"
        layer.mouse_drag_callbacks.append(self._on_drag)
        for key in range(1, 10):
            layer.bind_key(str(key), self._key_toggle(key - 1), overwrite=True)
        layer.bind_key("0", lambda _l: self.clear_labels(), overwrite=True)
        layer.bind_key("Control-Z", lambda _l: self.undo(), overwrite=True)
        layer.bind_key("Escape", lambda _l: self.select(np.array([], dtype=np.int64)), overwrite=True)
        layer.bind_key("Space", self._hold_to_pan, overwrite=True)
        self.layer = layer
        self.select_mode = self._select_mode
        viewer.layers.selection.active = layer
        return layer

    def forget_layer(self) -> None:
        """The layer was deleted by the user: keep the labels, stop touching the layer."""
        self.layer = None

    @property
    def select_mode(self) -> bool:
        """When on, dragging on the grid selects patches instead of panning the view."""
        return self._select_mode

    @select_mode.setter
    def select_mode(self, on: bool) -> None:
        self._select_mode = bool(on)
        if self.layer is not None:
            self.layer.mouse_pan = not self._select_mode

    def _hold_to_pan(self, layer: Any) -> Iterator[None]:
        self._panning = True
        layer.mouse_pan = True
        yield
        self._panning = False
        layer.mouse_pan = not self._select_mode

    def _key_toggle(self, class_index: int) -> Callable[[Any], None]:
        def toggle(_layer: Any) -> None:
            self.toggle_class(class_index)

        return toggle

    # -- selection ---------------------------------------------------------------------------------
    def patch_at(self, position: Any) -> int:
        """Index of the patch under a world position, or -1."""
        x0, y0 = self.session.world_to_level0(position)
        return int(self.grid.index_at(x0, y0))

    def patches_in(self, p0: Any, p1: Any) -> np.ndarray:
        """Indices of patches meeting the rectangle between two world positions."""
        xa, ya = self.session.world_to_level0(p0)
        xb, yb = self.session.world_to_level0(p1)
        return np.asarray(self.grid.in_box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)), dtype=np.int64)

    def select(self, idx: np.ndarray, how: str = "replace") -> None:
        """Change the selection: ``how`` = "replace", "add" or "toggle"."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        new = self.selected.copy()
        if how == "replace":
            new[:] = False
            new[idx] = True
        elif how == "add":
            new[idx] = True
        elif how == "toggle":
            new[idx] = ~new[idx]
        else:
            raise ValueError(f"unknown selection mode {how!r}")
        changed = np.flatnonzero(new != self.selected)
        self.selected = new
        if changed.size:
            self._redraw(changed)
        self._on_change()

    def _on_drag(self, layer: Any, event: Any) -> Iterator[None]:
        """Mouse: click selects one patch, drag selects a rectangle; Shift adds to the selection."""
        if not self._select_mode or self._panning or getattr(event, "button", 1) != 1:
            return
        shift = "Shift" in {getattr(m, "name", str(m)) for m in event.modifiers}
        start = np.asarray(event.position, dtype=float)
        base = self.selected.copy()
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            box = self.patches_in(start, event.position)
            self._preview(base, box, shift)
            yield
        if dragged:
            box = self.patches_in(start, event.position)
            self._preview(base, box, shift)
            self._on_change()
            return
        i = self.patch_at(start)
        if i < 0:
            if not shift:
                self.select(np.array([], dtype=np.int64))
            return
        self.select(np.array([i]), "toggle" if shift else "replace")

    def _preview(self, base: np.ndarray, box: np.ndarray, add: bool) -> None:
        new = base.copy() if add else np.zeros_like(base)
        new[box] = True
        changed = np.flatnonzero(new != self.selected)
        self.selected = new
        if changed.size:
            self._redraw(changed)

    # -- labelling ---------------------------------------------------------------------------------
    def selection(self) -> np.ndarray:
        return np.flatnonzero(self.selected)

    def toggle_class(self, class_index: int) -> None:
        """Toggle a class on the selected patches: set it on all unless all already have it."""
        if class_index >= self.classes.num_classes:
            self._on_message(f"there is no class {class_index + 1}: this project has {self.classes.num_classes} classes")
            return
        idx = self.selection()
        if idx.size == 0:
            self._on_message("select patches first: click or drag on the patch grid")
            return
        new = self.labels[idx].copy()
        value = 0 if new[:, class_index].all() else 1
        new[:, class_index] = value
        self.set_labels(idx, new)

    def clear_labels(self) -> None:
        """Remove every label from the selected patches (key 0)."""
        idx = self.selection()
        if idx.size == 0:
            self._on_message("select patches first: click or drag on the patch grid")
            return
        self.set_labels(idx, np.zeros((idx.size, self.classes.num_classes), dtype=np.uint8))

    def set_labels(self, idx: np.ndarray, new: np.ndarray, record: bool = True) -> None:
        """Write labels of patches ``idx`` (undoable), redraw them and report the edit."""
        idx = np.asarray(idx, dtype=np.int64)
        new = np.asarray(new, dtype=np.uint8).reshape(idx.size, self.classes.num_classes)
        differs = (self.labels[idx] != new).any(axis=1)
        idx, new = idx[differs], new[differs]
        if idx.size == 0:
            return
        if record:
            self._undo.append((idx, self.labels[idx].copy()))
            del self._undo[:-_MAX_UNDO]
        self.labels[idx] = new
        self._redraw(idx)
        self._on_edit(idx)
        self._on_change()

    def undo(self) -> None:
        """Undo the last label edit (Ctrl+Z)."""
        if not self._undo:
            self._on_message("nothing to undo")
            return
        idx, old = self._undo.pop()
        self.set_labels(idx, old, record=False)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def counts(self) -> tuple[np.ndarray, int]:
        """(patches per class, patches with at least one label)."""
        return self.labels.sum(axis=0, dtype=np.int64), int(self.labels.any(axis=1).sum())

    def cell_extent(self) -> float:
        """Side of one cell in level-0 pixels (for messages and tests)."""
        return float(self.step)


def grid_labels_from_table(grid: PatchGrid, table: Any, num_classes: int) -> tuple[np.ndarray, int]:
    """(N, C) labels of the grid's patches from a project label table, and how many rows of the
    table belong to no patch of this grid (e.g. labelled with another patch size)."""
    labels = np.zeros((len(grid), num_classes), dtype=np.uint8)
    if table is None or len(getattr(table, "x", ())) == 0:
        return labels, 0
    where = {pid: i for i, pid in enumerate(grid.ids)}
    tx = np.asarray(table.x, dtype=np.int64)
    ty = np.asarray(table.y, dtype=np.int64)
    ts = np.broadcast_to(np.asarray(table.size0, dtype=np.int64), tx.shape)
    tl = np.asarray(table.labels, dtype=np.uint8)
    missing = 0
    for r in range(tx.size):
        i = where.get(f"{tx[r]}_{ty[r]}_{ts[r]}")
        if i is None:
            missing += 1
        else:
            labels[i] = tl[r]
    return labels, missing


def cell_pixels(n_cells: int) -> int:
    """Pixels per side of a patch cell for a raster of ``n_cells`` cells: up to 32 (thin frames
    on small grids), fewer for huge grids so that the grid image stays under about 16 M pixels
    (64 MB RGBA)."""
    return max(2, min(32, int(math.sqrt(16_000_000 / max(n_cells, 1)))))
