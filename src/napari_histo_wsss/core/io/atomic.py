"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a process restarted after ``kill -9``) sees either the old file or the new one,
never a half-written file. Every project, checkpoint and export writer goes through here.

The destination checks every command makes before it starts work live here too:
:func:`check_output` (never an input, never an existing output without ``overwrite``),
:func:`ensure_dir` (the folder exists and is writable, else one clear line) and
:func:`replace_dir` (a whole output folder built beside the old one and swapped in at the end);
all three (and every atomic write) first refuse a name too long for the file system
(:func:`check_names`).
Files and folders are created with the user's umask (temporary files from :mod:`tempfile`
would otherwise stay ``0600``/``0700`` after the rename, unreadable to colleagues on a shared
server).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from napari_histo_wsss.core.errors import HistoWSSSError


# ---------------------------------------------------------------------------------------------
# umask: read without changing it (os.umask sets it too, a race with threads creating files)
# ---------------------------------------------------------------------------------------------
def _proc_umask() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux >= 4.7), or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    mask = _proc_umask()
    if mask is None:  # set-and-restore once, at import, before any writer thread exists
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask()


def current_umask() -> int:
    """The umask new files get (read each time where the OS tells it without changing it; else
    the value at import)."""
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def file_mode() -> int:
    """Permission bits of a newly created file: ``0o666 & ~umask`` (e.g. 0644)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permission bits of a newly created folder: ``0o777 & ~umask`` (e.g. 0755)."""
    return 0o777 & ~current_umask()


def _problem(folder: Path, e: OSError) -> str:
    """A short description of why ``folder`` cannot be created or written: names a file standing
    where a folder is expected (the OS only says "File exists" or "Not a directory")."""
    for p in (folder, *folder.parents):
        try:
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    return f"{p} is a file, not a folder"
                break
        except OSError:  # a name the OS cannot even look up (too long, ...): its own error says it
            continue
    return e.strerror or str(e)


def _limit(path: Path, name: str, default: int) -> int:
    """``os.pathconf(name)`` of the nearest existing folder above ``path`` (the file system the
    path would be created on), or ``default`` where the OS does not say."""
    for p in path.parents:
        try:
            return int(os.pathconf(p, name))
        except (OSError, ValueError, AttributeError):
            continue
    return default


def check_names(path: str | os.PathLike) -> Path:
    """Refuse, in one line naming the path, a path the OS cannot create: a file or folder name
    longer than its file system allows (``NAME_MAX``, 255 bytes on most) or a path longer than
    ``PATH_MAX``. Without this the first ``stat`` of the path raises ``ENAMETOOLONG``. Returns
    ``path`` as a Path."""
    p = Path(path)
    full = Path(os.path.abspath(p))
    name_max = _limit(full, "PC_NAME_MAX", 255)
    for part in full.parts[1:]:
        size = len(os.fsencode(part))
        if size > name_max:
            short = part if len(part) <= 24 else f"{part[:12]}...{part[-8:]}"
            raise HistoWSSSError(f"{p}: the name {short!r} is too long ({size} bytes; the file system allows "
                                 f"{name_max}); choose a shorter name")
    path_max = _limit(full, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(str(full)))
    if size >= path_max:
        raise HistoWSSSError(f"{p}: the path is too long ({size} bytes; the file system allows {path_max - 1}); "
                             "choose a shorter one")
    return p


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit it is fsynced and renamed onto
    ``path``. On error the temporary file is removed and ``path`` is untouched. The file gets
    the umask's permissions (not mkstemp's 0600)."""
    path = check_names(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoWSSSError(f"could not write {path}: {_problem(path.parent, e)}") from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise HistoWSSSError(f"could not write {path}: {_problem(path.parent, e)}") from e
    tmp_path = Path(tmp)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, file_mode())
            else:  # pragma: no cover - Windows: no modes to speak of
                os.chmod(tmp_path, file_mode())
        finally:
            os.close(fd)
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


# ---------------------------------------------------------------------------------------------
# destinations: folders, output checks, whole-folder replacement
# ---------------------------------------------------------------------------------------------
def ensure_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and its parents) if needed and check that it is a folder this process can
    write in (a hidden probe file is created and removed: permissions, read-only mounts and a full
    inode table all show up). Any failure is one :class:`HistoWSSSError` line naming the path."""
    p = check_names(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoWSSSError(f"{p}: cannot create the {what}: {_problem(p, e)}") from e
    if not p.is_dir():
        raise HistoWSSSError(f"{p}: cannot create the {what}: {_problem(p, NotADirectoryError())}")
    _probe(p, p, what)
    return p


def _probe(folder: Path, path: Path, what: str) -> None:
    """Create and remove a hidden file in ``folder``; failure: one line naming ``path``."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HistoWSSSError(f"{path}: the {what} is not writable: {e.strerror or e}") from e


def check_writable(path: str | os.PathLike, what: str = "folder") -> Path:
    """:func:`ensure_dir` without creating anything: ``path`` if it exists, else the nearest
    folder above it that does, must be a folder this process can write in (for a destination
    that is created only once the work has started, so that a refusal before it leaves nothing
    behind). Failures are one :class:`HistoWSSSError` line naming ``path``."""
    p = check_names(path)
    full = Path(os.path.abspath(p))
    for existing in (full, *full.parents):
        if existing.exists() or existing.is_symlink():
            break
    if not existing.is_dir():
        raise HistoWSSSError(f"{p}: cannot create the {what}: {existing} is a file, not a folder")
    _probe(existing, p, what)
    return p


def _real(path: Path) -> Path:
    """Absolute path with symlinks resolved (for the parts that exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False


def check_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                protect: Iterable[str | os.PathLike | None] = (), what: str = "output") -> Path:
    """Refuse, in one line, a destination ``out`` that is, holds or lies inside one of ``inputs``,
    or is or holds one of ``protect`` (symlinks and hard links resolved; None entries skipped),
    and a name too long for the file system (:func:`check_names`). :func:`check_output`'s rule
    for what an output may not touch; on its own for destinations that are written into rather
    than replaced (a run folder, ``predict-many``'s output folder). Returns ``out`` as a Path."""
    path = check_names(out)
    real = _real(path)
    for kind, group in (("input", inputs), ("protected", protect)):
        for given in group:
            if given is None or str(given) == "":
                continue
            other = _real(Path(given))
            name = f"the input {given}" if kind == "input" else str(given)
            if real == other or _same(path, Path(given)):
                raise HistoWSSSError(f"{path}: the {what} would replace {name}; choose another {what}")
            if other.is_relative_to(real):
                raise HistoWSSSError(f"{path}: the {what} contains {name}; choose another {what}")
            if kind == "input" and real.is_relative_to(other):
                raise HistoWSSSError(f"{path}: the {what} lies inside the input {given}; choose another {what}")
    return path


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 what: str = "output", protect: Iterable[str | os.PathLike | None] = (),
                 folder: bool | None = None) -> Path:
    """Check a command's destination before any work is done; returns ``out`` as a Path.

    * ``out`` may not be, lie inside or contain any of ``inputs`` (symlinks resolved), even with
      ``overwrite``: an output never replaces what it is computed from.
    * ``out`` may not be or contain any of ``protect`` (e.g. a run folder an output may be
      written into, but must never replace), nor the current folder (an output is published by
      renaming it into place, which would pull the folder away from under the shell).
    * An existing ``out`` is refused unless ``overwrite``; with ``folder=True`` an existing empty
      folder counts as absent, and an existing entry of the wrong kind (a file where a folder is
      written, or the reverse) is refused even with ``overwrite``.
    * The parent folder is created if needed and must be writable (:func:`ensure_dir`).
    * A name too long for the file system is refused first (:func:`check_names`).
    """
    path = check_apart(out, inputs, [*protect, os.getcwd()], what)
    if path.exists() or path.is_symlink():
        is_dir = path.is_dir()
        if folder is True and not is_dir:
            raise HistoWSSSError(f"{path} exists and is a file, not a folder; refusing to replace it")
        if folder is False and is_dir:
            raise HistoWSSSError(f"{path} exists and is a folder; refusing to replace it with a file")
        empty = folder is True and is_dir and not path.is_symlink() and not any(path.iterdir())
        if not overwrite and not empty:
            raise HistoWSSSError(f"{path} exists; pass --overwrite to replace it")
    ensure_dir(_real(path).parent if path.is_symlink() else Path(os.path.abspath(path)).parent, "output folder")
    return path


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree, ignoring what is already gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def staging_dir(final: str | os.PathLike, tag: str = "new") -> Path:
    """Create a hidden folder beside ``final`` (``.<name>.<tag>-<random>``, umask permissions)
    to build a replacement of ``final`` in; loaders skip dot-folders. Errors are one line."""
    final = Path(os.path.abspath(final))  # "out/.." or "." name their real folder
    parent = final.parent
    ensure_dir(parent, "output folder")
    tmp = parent / f".{final.name}.{tag}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        os.chmod(tmp, dir_mode())
    except OSError as e:
        raise HistoWSSSError(f"could not write {final}: {e.strerror or e}") from e
    return tmp


def swap_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Publish the folder ``tmp`` (a sibling of ``final``) as ``final``: the old ``final`` (if
    any) is renamed aside, ``tmp`` renamed in, then the old one removed. A failure of the second
    rename puts the old one back; a crash between the two renames leaves the old output whole as
    ``.<name>.old-*`` beside it. Raises :class:`HistoWSSSError`."""
    tmp, final = Path(tmp), Path(os.path.abspath(final))
    old = None
    try:
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)
                old = None
            raise
        fsync_dir(final.parent)
    except OSError as e:
        raise HistoWSSSError(f"could not write {final}: {e.strerror or e}") from e
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def replace_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final`` to write a whole output folder into. On
    a clean exit it is fsynced and swapped in for ``final`` (:func:`swap_dir`; the old folder, if
    any, is removed after). On any error, including a cancel raised inside the block, the
    temporary folder is removed and ``final`` stays exactly as it was."""
    final = Path(os.path.abspath(final))
    tmp = staging_dir(final)
    try:
        yield tmp
        try:
            fsync_tree(tmp)
        except OSError as e:
            raise HistoWSSSError(f"could not write {final}: {e.strerror or e}") from e
        swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
