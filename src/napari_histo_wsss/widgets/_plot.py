"""A small live line plot drawn with QPainter (no matplotlib or pyqtgraph needed).

Used for the training loss (per step) and the per-epoch metrics. Series are added point by point;
each series is scaled to the plot's shared y range (or, with ``right_axis=True``, to 0..1 on a
right-hand axis, for scores such as mIoU). Repaints are cheap (a few hundred line segments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

_MAX_POINTS = 4000  # older points are thinned 2:1 beyond this


@dataclass
class Series:
    name: str
    color: QColor
    right_axis: bool = False
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)


class LivePlot(QWidget):
    """Line plot of named series over a shared x axis (e.g. fractional epoch)."""

    def __init__(self, x_label: str = "epoch", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.x_label = x_label
        self.series: dict[str, Series] = {}
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(300, 170)

    def add_series(self, name: str, color: str, right_axis: bool = False) -> None:
        self.series[name] = Series(name, QColor(color), right_axis)

    def clear(self) -> None:
        for s in self.series.values():
            s.xs.clear()
            s.ys.clear()
        self.update()

    def append(self, name: str, x: float, y: float | None) -> None:
        """Add a point to series ``name`` (ignored when y is None or not finite)."""
        if y is None or y != y or y in (float("inf"), float("-inf")):
            return
        s = self.series[name]
        s.xs.append(float(x))
        s.ys.append(float(y))
        if len(s.xs) > _MAX_POINTS:
            s.xs[:] = s.xs[::2]
            s.ys[:] = s.ys[::2]
        self.update()

    def point_count(self, name: str) -> int:
        return len(self.series[name].xs)

    # -- painting ------------------------------------------------------------------------------
    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        fg = pal.color(pal.ColorRole.WindowText)
        grid_col = QColor(fg)
        grid_col.setAlpha(50)
        fm = p.fontMetrics()
        left, right, top, bottom = fm.horizontalAdvance("0.000") + 8, fm.horizontalAdvance("1.0") + 10, 6, fm.height() * 2 + 6
        plot = QRectF(left, top, max(self.width() - left - right, 10), max(self.height() - top - bottom, 10))

        left_series = [s for s in self.series.values() if s.xs and not s.right_axis]
        right_series = [s for s in self.series.values() if s.xs and s.right_axis]
        all_x = [x for s in self.series.values() for x in s.xs]
        x0, x1 = (min(all_x), max(all_x)) if all_x else (0.0, 1.0)
        if x1 - x0 < 1e-9:
            x1 = x0 + 1.0
        ys = [y for s in left_series for y in s.ys]
        y0, y1 = (min(0.0, min(ys)), max(ys)) if ys else (0.0, 1.0)
        if y1 - y0 < 1e-9:
            y1 = y0 + 1.0

        # frame, grid lines and tick labels
        p.setPen(QPen(grid_col, 1))
        for i in range(5):
            yy = plot.top() + plot.height() * i / 4
            p.drawLine(QPointF(plot.left(), yy), QPointF(plot.right(), yy))
        p.setPen(QPen(fg, 1))
        p.drawRect(plot)
        for i in range(5):
            yy = plot.top() + plot.height() * i / 4
            val = y1 - (y1 - y0) * i / 4
            p.drawText(QRectF(0, yy - fm.height() / 2, left - 4, fm.height()), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, f"{val:.3g}")
            if right_series:
                p.drawText(QRectF(plot.right() + 3, yy - fm.height() / 2, right, fm.height()), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, f"{1 - i / 4:.2g}")
        p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width() / 2, fm.height()), Qt.AlignmentFlag.AlignLeft, f"{x0:.3g}")
        p.drawText(QRectF(plot.left() + plot.width() / 2, plot.bottom() + 2, plot.width() / 2, fm.height()), Qt.AlignmentFlag.AlignRight, f"{x1:.3g} {self.x_label}")

        def to_px(x: float, y: float, lo: float, hi: float) -> QPointF:
            return QPointF(plot.left() + (x - x0) / (x1 - x0) * plot.width(), plot.bottom() - (y - lo) / (hi - lo) * plot.height())

        for s in left_series + right_series:
            lo, hi = (0.0, 1.0) if s.right_axis else (y0, y1)
            pen = QPen(s.color, 1.6)
            p.setPen(pen)
            if len(s.xs) == 1:
                p.drawEllipse(to_px(s.xs[0], s.ys[0], lo, hi), 2.5, 2.5)
                continue
            path = QPainterPath(to_px(s.xs[0], s.ys[0], lo, hi))
            for x, y in zip(s.xs[1:], s.ys[1:]):
                path.lineTo(to_px(x, y, lo, hi))
            p.drawPath(path)
            if s.right_axis:  # metrics are per epoch: mark the points
                for x, y in zip(s.xs, s.ys):
                    p.drawEllipse(to_px(x, y, lo, hi), 2.0, 2.0)

        # legend
        lx = plot.left()
        ly = plot.bottom() + fm.height() + 4
        for s in self.series.values():
            p.setPen(QPen(s.color, 3))
            p.drawLine(QPointF(lx, ly + fm.height() / 2), QPointF(lx + 14, ly + fm.height() / 2))
            p.setPen(QPen(fg, 1))
            label = s.name + (" (right)" if s.right_axis else "")
            p.drawText(QPointF(lx + 18, ly + fm.ascent()), label)
            lx += 18 + fm.horizontalAdvance(label) + 12
        p.end()
