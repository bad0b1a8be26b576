"""One progress-event class for every long job, imported at module level, and the review step's
project mask names defined in one place (checked on the source, so a copy cannot creep back)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import napari_histo_wsss
from napari_histo_wsss.core import progress, review
from napari_histo_wsss.core.errors import Cancelled
from napari_histo_wsss.core.progress import ProgressEvent, run_to_end
from napari_histo_wsss.core.stage1 import train

SRC = Path(napari_histo_wsss.__file__).parent


def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SRC.rglob("*.py"))}


def test_progress_event_lives_in_core_progress():
    assert train.ProgressEvent is ProgressEvent and train.EVENT_KINDS is progress.EVENT_KINDS  # old imports work
    for cls in (review.CamTile, review.PseudoTile):
        ev = cls(ty=1, tx=2, step=3, steps=4)
        assert isinstance(ev, ProgressEvent) and ev.kind == "step" and (ev.ty, ev.tx, ev.step) == (1, 2, 3)
    assert run_to_end(iter([ProgressEvent("step"), ProgressEvent("done", message="ok")])).message == "ok"
    with pytest.raises(Cancelled, match="stopped"):
        run_to_end(iter([ProgressEvent("cancelled", message="stopped")]))


def test_no_function_level_progress_imports_and_no_duck_typed_events():
    """ProgressEvent used to sit in core/stage1/train.py: cams/infer/train_seg imported it inside
    functions (an import cycle), and widgets declared look-alike dataclasses."""
    inner, ducks = [], []
    for path, tree in _modules().items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and any(a.name == "ProgressEvent" for a in node.names):
                    inner.append(f"{path.relative_to(SRC)}:{node.lineno}")
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in cls.bases}
            if {"kind", "step", "steps"} <= fields and cls.name != "ProgressEvent" and "ProgressEvent" not in bases:
                ducks.append(f"{path.relative_to(SRC)}::{cls.name}")
    assert inner == [] and ducks == []


def test_review_mask_names_are_written_in_one_place():
    """Stage two and the Review panel name the project masks through core.review's constants."""
    names = {review.MASK_CAM, review.MASK_CAM_PROBS, review.MASK_CAM_LOGITS, review.MASK_PSEUDO, review.MASK_CORRECTED,
             review.MASK_CORRECTED_FLAG, review.MASK_REVIEWED}
    assert set(review.COMPUTED_MASKS) | set(review.PATHOLOGIST_MASKS) == names
    offenders = []
    for path, tree in _modules().items():
        if path == SRC / "core" / "review.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "read_mask", "write_mask") and len(node.args) >= 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and arg.value in names:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {arg.value!r}")
            if isinstance(node, ast.Constant) and node.value in ("corrected_flag", "cam_probs"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert offenders == []
