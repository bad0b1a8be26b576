"""Model checkpoints that rebuild themselves.

A checkpoint is one ``torch.save`` file written atomically (temp file + rename, via
``core.io.atomic``) holding ``{"meta", "state_dict", "extra"}``:

* ``meta``: JSON-like dict with ``kind`` (``"classifier"`` | ``"segmenter"``), ``arch`` (the
  constructor arguments: backbone, output stride, number of classes...), ``classes`` (the
  ``ClassTable.to_dict()`` the model was trained for), ``versions`` (package, torch, numpy,
  python), ``format_version`` and whatever the caller adds (run config, epoch, metrics);
* ``state_dict``: the weights;
* ``extra``: optional training state for resuming (optimizer, scheduler...), returned by
  :func:`load_checkpoint` and ignored by :func:`load_model`.

:func:`load_model` rebuilds the network from ``meta`` with random initialisation (no download,
no pretrained package needed) and loads the weights strictly. Files are read with
``weights_only=True``, so a checkpoint cannot run code; no message ever suggests loading one
with ``weights_only=False`` (:func:`torch_error_text` removes torch's advice to do so), and a
valid torch file that is not ours is called that, not "damaged".
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import pickle
import platform
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from napari_histo_wsss import __version__
from napari_histo_wsss.core.data.classes import ClassTable
from napari_histo_wsss.core.errors import HistoWSSSError, TrainingError
from napari_histo_wsss.core.io.atomic import write_with
from napari_histo_wsss.core.models.classifier import CAMClassifier
from napari_histo_wsss.core.models.segmenter import Segmenter

__all__ = ["FORMAT_VERSION", "MODEL_KINDS", "save_model", "load_model", "load_checkpoint", "check_classes",
           "framework_versions", "torch_error_text", "foreign_objects"]

FORMAT_VERSION = 1
MODEL_KINDS: dict[str, type[nn.Module]] = {"classifier": CAMClassifier, "segmenter": Segmenter}


def framework_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint, to explain differences when a model is reused."""
    return {"napari_histo_wsss": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_model(path: str | Path, model: nn.Module, meta: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``model`` with ``meta`` (see module doc) to ``path``.

    ``meta["classes"]`` may be a :class:`ClassTable` or its dict. ``kind`` and ``arch`` come from
    the model. Non-JSON values in ``meta`` (paths, numpy scalars) are stored as strings/numbers.
    """
    kind = getattr(model, "kind", None)
    if kind not in MODEL_KINDS or not isinstance(getattr(model, "arch", None), dict):
        raise HistoWSSSError(f"cannot save {type(model).__name__} to {path}: only CAMClassifier and Segmenter models can be saved")
    info = dict(meta or {})
    if isinstance(info.get("classes"), ClassTable):
        info["classes"] = info["classes"].to_dict()
    info.update(kind=kind, arch=dict(model.arch), format_version=FORMAT_VERSION, versions=framework_versions(),
                saved_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    info = json.loads(json.dumps(info, default=_json_default))
    payload = {"meta": info, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": dict(extra or {})}
    write_with(path, lambda tmp: _save_payload(payload, tmp))


def _save_payload(payload: dict, tmp: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write (disk full, quota, I/O error)
    is the ``OSError`` with its errno that :mod:`core.io.atomic` turns into one line. torch's writer
    swallows the error of a ``write`` and raises ``RuntimeError: ... unexpected pos`` instead, so
    the file records the error it raised and that error is raised again."""
    with open(tmp, "wb") as f:
        out = _RecordingFile(f)
        try:
            torch.save(payload, out)
        except RuntimeError as e:
            if out.error is not None:
                raise out.error from e
            if re.search(r"unexpected pos|PytorchStreamWriter", str(e)):
                raise OSError(errno.EIO, f"write failed ({torch_error_text(e)})") from e
            raise


class _RecordingFile:
    """A binary file that keeps the ``OSError`` its ``write`` raised."""

    def __init__(self, f: Any):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_error_text(error: BaseException) -> str:
    """torch's error text as one line: its first sentence, never its advice to load with
    ``weights_only=False`` (which lets a file run code) or to allowlist globals."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    m = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.S)
    if m:
        text = m.group(1)
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    kept = [s for s in sentences if not re.search(r"weights_only|safe_globals|allowlist|trust", s, re.I)]
    short = (kept[0] if kept else "").strip() or "unreadable"  # the rest is torch's boilerplate
    if len(short) > 300:
        short = short[:297] + "..."
    return f"{type(error).__name__}: {short}"


def foreign_objects(error: BaseException) -> str | None:
    """The Python object a torch file holds that a weights-only load refused (e.g.
    ``numpy.core.multiarray._reconstruct``, ``torch.nn.modules.linear.Linear``), or None when
    the error is not such a refusal (a damaged or truncated file)."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return m.group(1) if m else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_model` -> ``{"meta", "state_dict", "extra"}``;
    ``meta["path"]`` is set to the file read. Clear :class:`HistoWSSSError` for a missing,
    damaged, truncated, foreign or too new file."""
    path = Path(path)
    if not path.is_file():
        raise HistoWSSSError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles and foreign files raise many types
        foreign = foreign_objects(e)
        if foreign is not None:
            raise HistoWSSSError(f"{path} is not a napari-histo-wsss checkpoint: it holds Python objects ({foreign}) "
                                 "that our checkpoints never contain, so it was saved by another program") from e
        raise HistoWSSSError(f"checkpoint {path} is damaged or truncated and cannot be read ({torch_error_text(e)})") from e
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) and isinstance(ckpt.get("state_dict"), dict)):
        what = "a bare state_dict" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else "no 'meta' and 'state_dict'"
        raise HistoWSSSError(f"{path} is not a napari-histo-wsss checkpoint ({what}; it was saved by another program)")
    version = ckpt["meta"].get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise HistoWSSSError(f"checkpoint {path} has format version {version}, newer than this napari-histo-wsss "
                             f"({__version__}, format {FORMAT_VERSION}) can read; update the plugin")
    ckpt["meta"]["path"] = str(path)
    ckpt.setdefault("extra", {})
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path`` and load its weights -> ``(model in eval mode on
    map_location, meta)``. Use :func:`check_classes` to compare ``meta`` with the expected classes."""
    ckpt = load_checkpoint(path, map_location)
    meta = ckpt["meta"]
    kind = meta.get("kind")
    if kind not in MODEL_KINDS:
        raise HistoWSSSError(f"checkpoint {path} holds an unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    arch = meta.get("arch")
    if not isinstance(arch, dict):
        raise HistoWSSSError(f"checkpoint {path} does not record the model architecture ('arch')")
    try:
        model = MODEL_KINDS[kind](**arch, weights="none")
    except (TypeError, HistoWSSSError) as e:
        raise HistoWSSSError(f"checkpoint {path}: cannot rebuild the {kind} from {arch}: {e}") from e
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise HistoWSSSError(f"checkpoint {path}: the weights do not fit the recorded {kind} architecture {arch}: "
                             f"{str(e).splitlines()[0]}") from e
    return model.to(map_location).eval(), meta


def check_classes(meta: Mapping[str, Any], classes: ClassTable | Mapping[str, Any], what: str = "the data") -> None:
    """Raise :class:`TrainingError` when the checkpoint's class table (``meta["classes"]``) and
    ``classes`` differ in names or order, naming both tables. Colours may differ."""
    source = meta.get("path", "the checkpoint")
    if "classes" not in meta:
        raise TrainingError(f"checkpoint {source} does not record its class table, so it cannot be checked against {what}")
    saved = ClassTable.from_dict(meta["classes"])
    expected = classes if isinstance(classes, ClassTable) else ClassTable.from_dict(dict(classes))
    if saved.names != expected.names:
        raise TrainingError(f"checkpoint {source} was trained for classes [{', '.join(saved.names)}] but {what} "
                            f"has classes [{', '.join(expected.names)}]; use a model trained for this class table")
