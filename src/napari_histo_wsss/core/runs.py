"""Training run folders: what a run records about its data, and the checks both training loops
(stage one, :mod:`.train`, and stage two, :mod:`.train_seg`) make before a run starts, resumes
or saves, so that nothing is lost or silently mixed:

* :func:`require_run` - resuming a folder that holds no run is an error (a mistyped folder
  would otherwise start a fresh run);
* :func:`dataset_fingerprint` / :func:`check_same_dataset` / :func:`record_dataset` - a run
  records a fingerprint of its patch list in ``dataset.json``; a resume on other patches,
  labels or validation images is refused (its ``metrics.jsonl`` would mix two datasets);
* :func:`check_run_place` - a run folder is never its dataset or its stage-one run, nor inside or
  around them (its files would replace theirs, or land among the data);
* :func:`ensure_run_folders` - the run and checkpoint folders are created and checked writable
  before any training, not after the first epoch;
* :func:`saving` - a failed write of an epoch's files (disk full, permissions) is one line that
  names the file and the checkpoint the run can be resumed from (atomic writes keep it whole);
* :func:`worker_error` - an error raised in a DataLoader worker comes back as one line;
* :func:`read_metrics` - the rows of a run's ``metrics.jsonl``;
* :func:`checkpoint_file` - which checkpoint ``best``/``last``/a path means in a run folder (one
  resolver for every loader of a trained model).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from napari_histo_wsss.core.errors import DatasetError, HistoWSSSError, TrainingError
from napari_histo_wsss.core.io.atomic import check_apart, ensure_dir, write_json

__all__ = ["DATASET_RECORD", "require_run", "dataset_fingerprint", "check_same_dataset", "record_dataset",
           "check_run_place", "ensure_run_folders", "describe_position", "saving", "worker_error", "read_metrics", "checkpoint_file"]

#: The file of a run folder that records its training dataset (folder, layout, fingerprint).
DATASET_RECORD = "dataset.json"


def require_run(run: Path, last_path: Path, what: str = "run") -> None:
    """Raise :class:`TrainingError` unless ``run`` holds a run to resume (a ``config.json`` or a
    checkpoint ``last_path``): a mistyped folder must not silently start a fresh run."""
    if last_path.is_file() or (run / "config.json").is_file():
        return
    if not run.exists():
        reason = "the folder does not exist"
    elif not run.is_dir():
        reason = "it is a file, not a run folder"
    else:
        reason = "the folder holds no config.json and no checkpoints/last.pt"
    raise TrainingError(f"{run}: no {what} to resume there ({reason}); check the folder name, or start a new "
                        f"{what} without resuming")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]


def dataset_fingerprint(spec: Any) -> dict[str, Any]:
    """A fingerprint of a dataset's patch list: the training samples' names (sorted) with their
    labels, and the validation images' names, hashed. Names (not folders) are hashed, so the same
    dataset moved elsewhere keeps its fingerprint."""
    train = sorted((str(s.name), [round(float(v), 6) for v in np.asarray(s.labels).ravel()]) for s in spec.train)
    val = sorted(str(s.name) for s in spec.val)
    return {"train": len(train), "val": len(val), "train_names": _sha([n for n, _ in train]),
            "train_labels": _sha(train), "val_names": _sha(val)}


def check_same_dataset(run: Path, spec: Any, fingerprint: dict[str, Any]) -> str | None:
    """Before a resume: raise :class:`TrainingError` naming ``run`` and what differs when ``spec``
    is not the dataset the run recorded. A run made before fingerprints were recorded is
    accepted; the returned note (to show as a warning) says so, and :func:`record_dataset`
    then records the fingerprint."""
    path = run / DATASET_RECORD
    record: Any = None
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path}: unreadable dataset record: {e}") from e
    saved = record.get("fingerprint") if isinstance(record, dict) else None
    if not isinstance(saved, dict):
        return (f"{run} does not record which patches it was trained on (made by an older version): "
                f"resuming on {spec.root} unchecked; its fingerprint is recorded now")
    diffs = []
    if saved.get("train_names") != fingerprint["train_names"]:
        diffs.append(f"other training patches ({fingerprint['train']}, the run has {saved.get('train')})")
    elif saved.get("train_labels") != fingerprint["train_labels"]:
        diffs.append(f"the run's {fingerprint['train']} training patches with other labels")
    if saved.get("val_names") != fingerprint["val_names"]:
        diffs.append(f"other validation images ({fingerprint['val']}, the run has {saved.get('val')})")
    if not diffs:
        return None
    trained_on = record.get("path")
    source = f"; the run was trained on {trained_on}" if trained_on else ""
    raise TrainingError(f"{run}: cannot resume on a different dataset: {spec.root} has {' and '.join(diffs)}{source}. "
                        "Resume with that dataset or start a new run folder")


def record_dataset(run: Path, spec: Any, fingerprint: dict[str, Any]) -> None:
    """Write the run's ``dataset.json``: the dataset folder (absolute, so that stage two finds it
    from anywhere), its layout and its fingerprint."""
    write_json(run / DATASET_RECORD, {"path": str(Path(spec.root).resolve()), "layout": spec.layout,
                                      "fingerprint": fingerprint})


def check_run_place(run: Path, inputs: Sequence[Path] = (), holders: Sequence[Path] = (),
                    what: str = "run folder") -> None:
    """Refuse a run folder that is, holds or lies inside one of ``inputs`` (the dataset folder,
    a stage-one run), or is or holds one of ``holders`` (a project, which keeps its runs inside):
    the run's ``config.json``, ``checkpoints/`` and ``metrics.jsonl`` would replace the input's
    own, or its files would land among the data. One line naming both; nothing written."""
    check_apart(run, inputs, holders, what)


def ensure_run_folders(run: Path, checkpoints: Path) -> None:
    """Create the run folder and its checkpoint folder and check both writable before any
    training: a read-only or full disk, missing permissions or a file where a folder belongs is
    one line naming the path, not a failure after the first epoch."""
    ensure_dir(run, "run folder")
    ensure_dir(checkpoints, "checkpoint folder")


def describe_position(position: tuple[int, int]) -> str:
    """``(epochs done, steps done in the next)`` of a checkpoint, in words."""
    epoch, step = position
    return f"epoch {epoch + 1}, step {step}" if step else f"epoch {epoch}"


@contextlib.contextmanager
def saving(last_path: Path, saved: tuple[int, int]) -> Iterator[None]:
    """Wrap the writes of a run's files (metrics, checkpoints). A write that fails on an OS error
    becomes one :class:`TrainingError` line naming the file, saying when the disk is full, and
    naming the checkpoint the run can be resumed from (``saved``: its position), which the
    atomic writes kept whole."""
    try:
        yield
    except HistoWSSSError as e:
        cause = e.__cause__
        if not isinstance(cause, OSError):
            raise
        full = cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        text = str(e).rstrip(".")
        if full:
            text += " (the disk is full)"
            todo = "free some space"
        else:
            todo = "fix this"
        if last_path.is_file():
            tail = (f"the previous checkpoint {last_path} ({describe_position(saved)}) is kept whole: {todo}, "
                    f"then resume the run from it")
        else:
            tail = f"no checkpoint was saved yet: {todo}, then start the run again"
        raise TrainingError(f"{text}; {tail}") from e


_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.")


def worker_error(error: BaseException) -> HistoWSSSError | None:
    """The one-line error of an exception raised in a DataLoader worker, or None when ``error``
    does not come from one. torch re-raises it in the training process with the worker's whole
    traceback as its message; the original message (last line of that traceback) is kept, and
    an ``OSError`` becomes a :class:`DatasetError`."""
    text = str(error)
    m = _WORKER.match(text)
    if m is None:
        return None
    name = m.group(1)
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: (.+)$", text, re.M):  # noqa: B007 - keeps the last
        pass
    message = last.group(1).strip() if last is not None else text.strip().splitlines()[-1]
    if isinstance(error, HistoWSSSError):
        return type(error)(message)
    return DatasetError(f"a training patch cannot be read: {message}")


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (stage one or two), up to ``upto_epoch`` if given;
    unreadable lines are skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (upto_epoch is None or int(row.get("epoch", 0)) <= upto_epoch):
                rows.append(row)
    return rows


def checkpoint_file(run: Path, which: str = "best", subrun: str | None = None) -> Path:
    """The checkpoint that ``which`` names for a run folder: ``"best"`` (``checkpoints/best.pt``,
    or ``last.pt`` while no epoch has finished validation), ``"last"``, or a checkpoint path
    (returned as is). ``subrun``: a run folder that may hold that kind of run inside it (a
    stage-one run holds its segmenter run in ``segmenter/``), which is then taken. The file may
    not exist; the caller says what is missing."""
    run = Path(run)
    if which not in ("best", "last"):
        return Path(which)
    if subrun is not None and (run / subrun / "checkpoints").is_dir():
        run = run / subrun
    path = run / "checkpoints" / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run / "checkpoints" / "last.pt"
    return path
