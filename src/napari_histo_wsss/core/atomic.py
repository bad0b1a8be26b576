"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a process restarted after ``kill -9``) sees either the old file or the new one,
never a half-written file. Every project, checkpoint and export writer goes through here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import HistoWSSSError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit it is fsynced and renamed onto
    ``path``. On error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise HistoWSSSError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporaries that :func:`atomic_path` left next to ``folder/<name>`` when a
    process was killed mid-write (``.<name>.<random><suffix>``). Call it only where no other process
    is writing those files (e.g. when a run starts in its own folder). Returns what was removed."""
    folder = Path(folder)
    removed = []
    for name in names:
        for p in folder.glob(f".{glob.escape(name)}.*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], suffix: str | None = None) -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (e.g. ``torch.save``, ``Image.save``).
    ``suffix`` lets writers that pick a format from the extension see the right one."""
    with atomic_path(path, suffix=suffix if suffix is not None else Path(path).suffix) as tmp:
        writer(tmp)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` before it is renamed into place, so that the
    rename publishes complete contents even after a power cut (used for zarr masks and by
    ``datasets.make_patches``)."""
    for dirpath, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
