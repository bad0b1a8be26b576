"""The project folder: the one source of truth of a labelling/training session.

Layout of a project folder (e.g. ``case-12.wsss/``)::

    project.json            manifest: schema_version, classes (ClassTable.to_dict), settings, slides
    labels.csv              patch labels, one row per patch:
                            slide_id,x,y,size0,<one 0/1 column per class name>,updated,who
    masks/<slide_id>/<name> zarr v3 arrays ("tissue", "cam", "pseudo", "corrected", ...) with attrs
                            downsample, classes_hash, complete
    runs/                   training runs (written by core.stage1.train / core.stage2.train)
    .lock                   empty file whose advisory lock (``fcntl.flock``) serialises the saves
                            of all processes that have the project open
    .session-<pid>-<token>  one per GUI window that has the project open (pid, host, start time),
                            locked while that window lives

Durability: ``project.json`` and ``labels.csv`` are rewritten whole through :mod:`core.io.atomic`
(temp file + fsync + rename) on every change, so a crash or ``kill -9`` leaves the previous or the
new version, never a mix. A mask is written into a hidden temporary zarr array, marked
``complete`` in its attributes last, and then swapped in by renames; a kill between the renames
is repaired on the next open (the previous complete array is restored). Temporary names start
with ``.`` and are cleaned up on open.

Several writers (two GUI windows, a GUI and a script): every save takes the exclusive lock on
``.lock``, re-reads the file from disk (when another process changed it), applies only this
call's change (set or remove of patch rows keyed by ``slide_id,x,y,size0``; a slide added; a
setting changed) and writes the result atomically, so no writer's saves are lost (not "last writer
wins"). Opening reads the manifest and the labels under the shared lock (a consistent pair).
On platforms without ``fcntl`` (Windows) saves are not coordinated between processes.

Safety: slide ids, mask names and run names become folder names, so they must match
``_SAFE_NAME`` (checked when ``project.json`` is read and wherever they become paths), and every
such path must resolve inside the project folder: nothing a project file says reaches outside it.

Coordinates are level-0 pixels; ``size0`` is a patch's side in level-0 pixels.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not coordinated between processes
    fcntl = None  # type: ignore[assignment]

from napari_histo_wsss.core.data.classes import ClassTable, get_preset
from napari_histo_wsss.core.errors import ClassTableError, HistoWSSSError, ProjectError
from napari_histo_wsss.core.io.atomic import atomic_path, fsync_dir, fsync_tree, remove_temporaries, write_text
from napari_histo_wsss.core.slides.mosaic import LAYOUT_KEY

if TYPE_CHECKING:  # pragma: no cover
    from napari_histo_wsss.core.slides.grid import PatchGrid
    from napari_histo_wsss.core.slides.slide import Slide

MANIFEST_NAME = "project.json"
LABELS_NAME = "labels.csv"
MASKS_DIR = "masks"
RUNS_DIR = "runs"
FEATURES_DIR = "features"
LOCK_NAME = ".lock"
SESSION_PREFIX = ".session-"
_FIXED_COLUMNS = ("slide_id", "x", "y", "size0")
_TRAILING_COLUMNS = ("updated", "who")
# Slide ids, mask names and run names become folder names: no separators, no "..", no leading dot
# (hidden names are temporaries), no absolute paths. Used with fullmatch (``$`` would accept "\n").
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MASK_CHUNK = 1024


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlideRecord:
    """A slide of the project. ``path`` is absolute; ``relpath`` (relative to the project folder)
    finds the slide again when the project and its slides move together."""

    path: str
    width: int
    height: int
    mpp: float | None
    format: str
    objective_power: float | None = None
    relpath: str | None = None
    added: str = ""
    #: a patch folder's layout fingerprint (``core/slides/mosaic.py``): its images must not change
    layout: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SlideRecord:
        return cls(
            path=str(d["path"]), width=int(d["width"]), height=int(d["height"]),
            mpp=None if d.get("mpp") is None else float(d["mpp"]), format=str(d.get("format", "")),
            objective_power=None if d.get("objective_power") is None else float(d["objective_power"]),
            relpath=d.get("relpath"), added=str(d.get("added", "")),
            layout=None if d.get("layout") is None else str(d["layout"]),
        )


@dataclass
class PatchLabelTable:
    """Patch labels as columns: ``labels`` is ``(N, C)`` uint8 multi-hot over the tissue classes."""

    slide_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size0: np.ndarray
    labels: np.ndarray
    updated: np.ndarray
    who: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class SessionInfo:
    """Another process that has the project open for writing (from its ``.session-*`` file)."""

    pid: int
    host: str
    started: str
    program: str
    path: Path

    def message(self, root: Path) -> str:
        where = f"pid {self.pid} on host {self.host}" + (f", {self.program}" if self.program else "")
        since = f" since {self.started}" if self.started else ""
        return (f"project {root} is open in another window ({where}{since}); saves from both merge "
                "safely, but each window shows the other's new labels only after reopening")


class _DiskLock:
    """The advisory lock of a project folder across processes: ``fcntl.flock`` on ``.lock``.

    Re-entrant for one :class:`Project` (its callers hold ``Project._lock``, so one thread at a
    time): a save inside a locked section does not lock again (a second ``flock`` on another file
    descriptor of the same file would wait for ourselves). Where locking is impossible (no
    ``fcntl``, a file system without ``flock``, a read-only folder without a ``.lock`` file) it
    degrades to no lock: the project still works as before, only writers are not coordinated.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._depth = 0
        self._exclusive = False
        self._pid = os.getpid()

    def _open(self) -> int | None:
        if self._fd is None and fcntl is not None:
            try:  # an empty file that is never rewritten: the lock lives on its inode
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)  # read-only folder: shared locks still work
                except OSError:
                    return None
            self._fd = fd
            weakref.finalize(self, os.close, fd)
        return self._fd

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        if self._pid != os.getpid():
            # a forked child (e.g. a data loader worker) shares the parent's open file, and so its
            # lock: locking or unlocking through it would change the parent's. Use a file of its own.
            self._fd, self._depth, self._pid = None, 0, os.getpid()
        if self._depth:
            if exclusive and not self._exclusive:
                raise RuntimeError("a shared project lock cannot be upgraded to an exclusive one")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fd = self._open()
        locked = False
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                locked = True
            except OSError:  # e.g. a network mount without flock: carry on uncoordinated
                pass
        self._depth, self._exclusive = 1, exclusive
        try:
            yield
        finally:
            self._depth = 0
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)


class Project:
    """An open project folder. Create with :meth:`create`, open with :meth:`open`.

    Every mutating method saves at once (atomically); there is no separate save step. A project
    on a read-only disk opens for reading (``read_only`` is True) and refuses changes with a
    :class:`ProjectError`. Methods are safe to call from several threads of one process, and
    several processes may save into one project at the same time: each save merges its change into
    the files on disk under the project's lock (see the module docstring). ``open_elsewhere`` tells
    whether another window had the project open when this one opened it.
    """

    SCHEMA_VERSION = 1

    def __init__(self, root: Path, manifest: dict, labels: dict, read_only: bool,
                 digests: tuple[str | None, str | None] = (None, None), disk_lock: _DiskLock | None = None):
        self.root = root
        self.classes: ClassTable = ClassTable.from_dict(manifest["classes"])
        self.settings: dict[str, Any] = dict(manifest["settings"])
        self.slides: dict[str, SlideRecord] = {k: SlideRecord.from_dict(v) for k, v in manifest["slides"].items()}
        self.read_only = read_only
        self.open_elsewhere: SessionInfo | None = None
        self._created = str(manifest.get("created", ""))
        self._labels: dict[tuple[str, int, int, int], tuple[np.ndarray, str, str]] = labels
        # digests of the project.json / labels.csv bytes that memory reflects: a save re-reads a
        # file only when another process has replaced it since
        self._manifest_digest, self._labels_digest = digests
        self._grids: dict[str, PatchGrid] = {}
        self._lock = threading.RLock()
        self._grid_lock = threading.Lock()  # tissue detection is slow: do not block label saves
        self._disk_lock = disk_lock if disk_lock is not None else _DiskLock(root / LOCK_NAME)
        self._session: Path | None = None
        self._end_session: Callable[[], Any] | None = None

    # -- paths -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def labels_path(self) -> Path:
        return self.root / LABELS_NAME

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    def run_dir(self, name: str) -> Path:
        """The folder of the training run ``name`` under ``runs/`` (not created); ``name`` must be
        a safe name, so a run name never reaches outside the project. ``runs/`` itself may link
        to another disk (checkpoints are large); a run is then a direct child of its target."""
        path = self.runs_dir / _check_name("run name", name, self.runs_dir)
        return self._inside(path, also=self.runs_dir.resolve())

    def _inside(self, path: Path, also: Path | None = None) -> Path:
        """Second line of defence after the name checks: ``path``, symlinks resolved, lies inside
        the project folder (a symlink planted in the project could otherwise lead out), or is a
        direct child of the folder ``also``."""
        real, root = path.resolve(), self.root.resolve()
        if real != root and not real.is_relative_to(root) and not (also is not None and real.parent == also):
            raise ProjectError(f"{path}: leads to {real}, outside the project folder {root} (a symbolic link?); "
                               "refusing to read or write there")
        return path

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r}, classes={self.classes.names}, slides={len(self.slides)}, labelled patches={len(self._labels)})"

    # -- create / open -----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        classes: ClassTable | str,
        patch_size: int = 224,
        target_mpp: float | None = 1.0,
        min_tissue: float = 0.5,
        session: bool = False,
    ) -> Project:
        """Create a new project in ``path`` (absent or empty folder). ``classes`` is a
        :class:`ClassTable` or a preset name. ``target_mpp`` = microns per pixel of the patches the
        models see (1.0 is about 10x); ``None`` reads patches at level 0. ``session``: register
        this process as a window that has the project open (see :meth:`open`)."""
        root = Path(path).expanduser().resolve()
        table = get_preset(classes) if isinstance(classes, str) else classes
        settings = _check_settings({"patch_size": patch_size, "target_mpp": target_mpp, "min_tissue": min_tissue}, root)
        if (root / MANIFEST_NAME).exists():
            raise ProjectError(f"{root}: already holds a project; open it instead")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ProjectError(f"{root}: folder is not empty; choose a new or empty folder for the project")
        made_root = not root.exists()
        try:
            for d in (root, root / MASKS_DIR, root / RUNS_DIR):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _remove_partial_project(root, made_root)
            raise ProjectError(f"{root}: cannot create the project folder: {e.strerror or e}") from e
        manifest = {
            "schema_version": cls.SCHEMA_VERSION,
            "created": _now(),
            "classes": table.to_dict(),
            "settings": settings,
            "slides": {},
        }
        project = cls(root, manifest, {}, read_only=False)
        # labels first, manifest last: a folder is a project only once project.json exists.
        try:
            with project._disk(exclusive=True):
                project._write_labels({})
                project._write_manifest(project.settings, project.slides)
        except ProjectError:
            _remove_partial_project(root, made_root)
            raise
        if session:
            project._start_session()
        return project

    @classmethod
    def open(cls, path: str | os.PathLike, session: bool = False) -> Project:
        """Open an existing project (its folder or its ``project.json``). Raises ProjectError for
        a missing or damaged manifest or label file, an unsafe slide id, or a schema newer than
        this plugin's.

        ``open_elsewhere`` is set to another live window's :class:`SessionInfo` (or None).
        ``session=True`` (the GUI) registers this process as such a window until
        :meth:`end_session` or the end of the process; scripts need not."""
        root = Path(path).expanduser().resolve()
        if root.is_file() and root.name == MANIFEST_NAME:
            root = root.parent
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise ProjectError(f"{root}: not a napari-histo-wsss project (no {MANIFEST_NAME})")
        disk_lock = _DiskLock(root / LOCK_NAME)
        with disk_lock.hold(exclusive=False):  # no save between the two reads: a consistent pair
            mdata = _read_bytes(mpath, "the project manifest")
            manifest = _parse_manifest(mpath, mdata, cls.SCHEMA_VERSION)
            table = _classes_of(manifest, mpath)
            manifest["settings"] = _check_settings(manifest["settings"], mpath)
            lpath = root / LABELS_NAME
            if not lpath.is_file():
                raise ProjectError(f"{lpath}: the patch label file is missing; restore it from a backup")
            ldata = _read_bytes(lpath, "patch labels")
            labels = _parse_labels(lpath, ldata, table, set(manifest["slides"]))
        project = cls(root, manifest, labels, read_only=not _writable(root),
                      digests=(_digest(mdata), _digest(ldata)), disk_lock=disk_lock)
        if not project.read_only:
            project._clean_temporaries()
        project.open_elsewhere = project.other_session()
        if session:
            project._start_session()
        return project

    # -- other windows -----------------------------------------------------------------------------
    def _start_session(self) -> None:
        """Register this process as a window that has the project open: a ``.session-*`` file
        (pid, host, start time) holding an exclusive ``flock`` while this process lives. Best
        effort: a read-only folder or a file system without ``flock`` just has no session."""
        if self._session is not None or self.read_only or fcntl is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "program": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""}
        path = self.root / f"{SESSION_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = None
        try:
            # written under the project lock (so _clean_temporaries never meets its temporary) and
            # locked before it is renamed into place, so it is never seen unlocked while we live
            with self._disk(exclusive=True), atomic_path(path) as tmp:
                tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
                fd = os.open(tmp, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (OSError, HistoWSSSError):
            if fd is not None:
                os.close(fd)
            return
        self._session = path
        self._end_session = weakref.finalize(self, _release_session, path, fd)

    def end_session(self) -> None:
        """Unregister this window (the GUI calls it when it opens another project); the project
        stays usable."""
        if self._end_session is not None:
            self._end_session()
        self._session = self._end_session = None

    def other_session(self) -> SessionInfo | None:
        """A live window of another process that has this project open, or None. Session files of
        processes that ended (their lock is free, or their pid is gone on this host) are stale:
        they never count, and are removed."""
        me = (os.getpid(), socket.gethostname())
        for path in sorted(self.root.glob(f"{SESSION_PREFIX}*")):
            if path == self._session or path.name.endswith(".tmp"):
                continue
            info = _live_session(path, remove_stale=not self.read_only)
            if info is not None and (info.pid, info.host) != me:
                return info
        return None

    # -- slides ------------------------------------------------------------------------------------
    def add_slide(self, path: str | os.PathLike) -> str:
        """Add a slide (reads its metadata through ``open_slide``; SlideError if unreadable) and
        return its id (the file name stem, made unique). Adding the same file again returns the
        existing id."""
        from napari_histo_wsss.core.slides.slide import open_slide

        p = Path(path).expanduser().resolve()
        with self._lock:
            for sid, rec in self.slides.items():
                if Path(rec.path) == p:
                    return sid
        with open_slide(p) as slide:
            w, h = slide.dimensions
            rec = SlideRecord(
                path=str(p), width=int(w), height=int(h), mpp=slide.mpp, format=slide.format,
                objective_power=slide.objective_power, relpath=os.path.relpath(p, self.root), added=_now(),
                layout=slide.properties.get(LAYOUT_KEY),
            )
        self._check_writable(self.manifest_path)
        with self._disk(exclusive=True):
            self._sync()  # another window may have added slides (or this very one) meanwhile
            for sid, known in self.slides.items():
                if Path(known.path) == p:
                    return sid
            sid = self._new_slide_id(p)
            self._write_manifest(self.settings, {**self.slides, sid: rec})
            return sid

    def _new_slide_id(self, p: Path) -> str:
        name = p.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            name = p.stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-") or "slide"
        sid, n = base, 2
        while sid in self.slides:
            sid, n = f"{base}-{n}", n + 1
        return _check_name("slide id", sid, self.manifest_path)

    def _record(self, slide_id: str) -> SlideRecord:
        try:
            return self.slides[slide_id]
        except (KeyError, TypeError):
            raise ProjectError(f"{self.manifest_path}: unknown slide id {slide_id!r}") from None

    def slide_path(self, slide_id: str) -> Path:
        """The slide's file: its recorded absolute path, else its path relative to the project."""
        rec = self._record(slide_id)
        p = Path(rec.path)
        if p.exists():
            return p
        if rec.relpath:
            alt = (self.root / rec.relpath).resolve()
            if alt.exists():
                return alt
        raise ProjectError(f"{p}: slide {slide_id!r} of project {self.root} is missing (moved or deleted?)")

    def open_slide(self, slide_id: str) -> Slide:
        """Open a project slide (the caller closes it, e.g. ``with project.open_slide(i) as s``).
        A patch folder whose images changed since it was added (its labels and masks would
        point at other images) raises one ProjectError line naming it."""
        from napari_histo_wsss.core.slides.slide import open_slide

        rec = self._record(slide_id)
        slide = open_slide(self.slide_path(slide_id))
        if rec.layout is not None and slide.properties.get(LAYOUT_KEY) != rec.layout:
            now = slide.properties.get("patch-folder.images", "?")
            slide.close()
            raise ProjectError(f"{slide.path}: the images of patch folder {slide_id!r} changed since it was added to "
                               f"{self.root} (added, removed, renamed or resized; {now} images now), so its labels and "
                               "masks would point at other images; restore the folder, or add it again as a new slide")
        return slide

    # -- settings and grid -------------------------------------------------------------------------
    def update_settings(self, **changes: Any) -> None:
        """Change ``patch_size``, ``target_mpp`` or ``min_tissue`` and save. Patch grids are
        recomputed on next use; existing labels keep their own ``size0``."""
        unknown = set(changes) - {"patch_size", "target_mpp", "min_tissue"}
        if unknown:
            raise ProjectError(f"{self.manifest_path}: unknown setting(s) {sorted(unknown)}")
        self._check_writable(self.manifest_path)
        with self._disk(exclusive=True):
            self._sync()
            settings = _check_settings({**self.settings, **changes}, self.manifest_path)
            self._write_manifest(settings, self.slides)
            self._grids.clear()

    def tissue(self, slide_id: str):
        """The slide's tissue mask (:class:`core.slides.tissue.TissueMask`), detected once and cached
        as the mask ``"tissue"`` (detected again, without caching, on a read-only project)."""
        from napari_histo_wsss.core.slides.tissue import TissueMask, detect_tissue

        cached = self.read_mask(slide_id, "tissue")
        if cached is not None:
            return TissueMask(cached[0].astype(bool), cached[1])
        with self.open_slide(slide_id) as slide:
            tm = detect_tissue(slide)
        if not self.read_only:
            self.write_mask(slide_id, "tissue", tm.mask.astype(bool), tm.downsample)
        return tm

    def grid(self, slide_id: str) -> PatchGrid:
        """The patch grid of a slide with the project's settings (tissue mask + ``make_grid``),
        computed once per settings and cached in memory."""
        from napari_histo_wsss.core.slides.grid import make_grid

        with self._grid_lock:
            if slide_id not in self._grids:
                tissue = self.tissue(slide_id)
                with self.open_slide(slide_id) as slide:
                    self._grids[slide_id] = make_grid(
                        slide, tissue, patch_size=int(self.settings["patch_size"]),
                        target_mpp=self.settings["target_mpp"], min_tissue=float(self.settings["min_tissue"]),
                    )
            return self._grids[slide_id]

    # -- patch labels ------------------------------------------------------------------------------
    def set_patch_labels(
        self, slide_id: str, x: Any, y: Any, size0: int, labels: Any, who: str = ""
    ) -> None:
        """Insert or replace the labels of one or several patches and save.

        ``x``, ``y``: level-0 top-left (scalars or length-N arrays); ``labels``: a ``(C,)`` vector
        applied to all, or ``(N, C)``, 0/1 over the project's tissue classes (ClassTableError if
        the length differs from the class table)."""
        xs = np.atleast_1d(np.asarray(x, dtype=np.int64))
        ys = np.atleast_1d(np.asarray(y, dtype=np.int64))
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(f"x and y must be scalars or equal-length 1-D arrays, got shapes {xs.shape} and {ys.shape}")
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = np.broadcast_to(self.classes.check_labels(lab, where=f"slide {slide_id}"), (xs.shape[0], lab.shape[0]))
        elif lab.ndim == 2 and lab.shape[0] == xs.shape[0]:
            lab = np.stack([self.classes.check_labels(row, where=f"slide {slide_id}") for row in lab]) if len(lab) else lab
        else:
            raise ClassTableError(
                f"slide {slide_id}: labels of shape {lab.shape} do not fit {xs.shape[0]} patch(es) x {self.classes.num_classes} classes"
            )
        who = " ".join(str(who).split())
        stamp = _now()
        size0 = int(size0)
        self._check_writable(self.labels_path)
        with self._disk(exclusive=True):
            self._sync()
            self._record(slide_id)
            # This call's rows go over what is on disk now (other writers' rows included): under
            # the lock, saves apply in the order they happen, so each row's ``updated`` stamp is
            # that of its latest save and no other row changes.
            labels = dict(self._labels)
            for xi, yi, row in zip(xs.tolist(), ys.tolist(), lab):
                labels[(slide_id, xi, yi, size0)] = (np.array(row, dtype=np.uint8), stamp, who)
            self._write_labels(labels)

    def remove_patch_labels(self, slide_id: str, x: Any, y: Any, size0: int) -> None:
        """Delete the labels of one or several patches (absent ones are ignored) and save."""
        xs = np.atleast_1d(np.asarray(x, dtype=np.int64)).tolist()
        ys = np.atleast_1d(np.asarray(y, dtype=np.int64)).tolist()
        self._check_writable(self.labels_path)
        with self._disk(exclusive=True):
            self._sync()
            labels = dict(self._labels)
            changed = False
            for xi, yi in zip(xs, ys):
                changed |= labels.pop((slide_id, xi, yi, int(size0)), None) is not None
            if changed:
                self._write_labels(labels)

    def patch_labels(self, slide_id: str | None = None) -> PatchLabelTable:
        """All patch labels, or those of one slide, in insertion order (as of this object's last
        save or :meth:`refresh`)."""
        with self._lock:
            items = [(k, v) for k, v in self._labels.items() if slide_id is None or k[0] == slide_id]
        n, c = len(items), self.classes.num_classes
        return PatchLabelTable(
            slide_id=np.array([k[0] for k, _ in items], dtype=object),
            x=np.array([k[1] for k, _ in items], dtype=np.int64),
            y=np.array([k[2] for k, _ in items], dtype=np.int64),
            size0=np.array([k[3] for k, _ in items], dtype=np.int64),
            labels=np.stack([v[0] for _, v in items]) if n else np.zeros((0, c), dtype=np.uint8),
            updated=np.array([v[1] for _, v in items], dtype=object),
            who=np.array([v[2] for _, v in items], dtype=object),
            class_names=self.classes.names,
        )

    def refresh(self) -> None:
        """Catch up with what other processes saved into the project since (slides, settings,
        labels); saves do this by themselves."""
        with self._disk(exclusive=False):
            self._sync()

    # -- masks -------------------------------------------------------------------------------------
    def _slide_dir(self, slide_id: str) -> Path:
        self._record(slide_id)
        _check_name("slide id", slide_id, self.manifest_path)  # also checked when project.json is read
        return self._inside(self.root / MASKS_DIR / slide_id)

    def features_dir(self, slide_id: str) -> Path:
        """The folder of a slide's cached feature maps (``core/stage1/features.py``); derived data,
        rebuilt from the slide whenever it is missing."""
        self._record(slide_id)
        _check_name("slide id", slide_id, self.manifest_path)
        return self._inside(self.root / FEATURES_DIR / slide_id)

    def _mask_path(self, slide_id: str, name: str) -> Path:
        folder = self._slide_dir(slide_id)
        return self._inside(folder / _check_name("mask name", name, folder))

    def write_mask(self, slide_id: str, name: str, array: np.ndarray, downsample: float) -> None:
        """Store a 2-D mask or a ``(C, h, w)`` stack (e.g. CAMs) as a zarr v3 array under
        ``masks/<slide_id>/<name>``, replacing any previous one atomically. ``downsample`` =
        level-0 pixels per mask pixel."""
        import zarr

        final = self._mask_path(slide_id, name)
        array = np.asarray(array)
        if array.ndim not in (2, 3) or array.size == 0:
            raise ProjectError(f"{final}: a mask must be a non-empty 2-D array or a (C, h, w) stack, got shape {array.shape}")
        if not (np.isfinite(downsample) and downsample > 0):
            raise ProjectError(f"{final}: downsample must be a positive number, got {downsample}")
        self._check_writable(final)
        token = uuid.uuid4().hex[:8]
        tmp = final.parent / f".{name}.tmp-{token}"
        old = final.parent / f".{name}.old-{token}"
        chunks = tuple(min(s, _MASK_CHUNK) for s in array.shape[-2:])
        if array.ndim == 3:
            chunks = (1,) + chunks
        # The whole write holds the exclusive lock: its temporaries then exist only while the lock
        # is held, which is what lets _clean_temporaries in another process tell them from
        # leftovers of a killed one.
        with self._disk(exclusive=True):
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._inside(final.parent)
                z = zarr.create_array(store=str(tmp), shape=array.shape, dtype=array.dtype, chunks=chunks, zarr_format=3)
                z[...] = array
                # "complete" goes in last: an array without it is never read as valid.
                z.attrs.update({"downsample": float(downsample), "classes_hash": self.classes_hash(),
                                "name": name, "written": _now(), "complete": True})
                fsync_tree(tmp)
                if final.exists():
                    os.rename(final, old)
                os.rename(tmp, final)
                fsync_dir(final.parent)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if old.exists() and not final.exists():
                    os.rename(old, final)
                raise ProjectError(f"{final}: cannot write mask: {e.strerror or e}") from e
            shutil.rmtree(old, ignore_errors=True)

    def delete_mask(self, slide_id: str, name: str) -> bool:
        """Remove a stored mask (a layer a recomputation no longer makes); False when there was
        none. The folder is renamed away under the exclusive lock first, so a reader never sees
        half of it."""
        final = self._mask_path(slide_id, name)
        if not final.exists():
            return False
        self._check_writable(final)
        gone = final.parent / f".{name}.old-{uuid.uuid4().hex[:8]}"
        with self._disk(exclusive=True):
            try:
                os.rename(final, gone)
                fsync_dir(final.parent)
            except OSError as e:
                raise ProjectError(f"{final}: cannot remove mask: {e.strerror or e}") from e
            shutil.rmtree(gone, ignore_errors=True)
        return True

    def read_mask(self, slide_id: str, name: str) -> tuple[np.ndarray, float] | None:
        """``(array, downsample)`` of a stored mask, or ``None`` if there is none. A mask written
        for a different class table or left incomplete raises ProjectError naming it."""
        import zarr

        final = self._mask_path(slide_id, name)
        with self._disk(exclusive=False):  # not in the middle of another process's swap
            path = final if final.exists() else _complete_backup(final)
            if path is None:
                return None
            try:
                z = zarr.open_array(str(path), mode="r")
                attrs = dict(z.attrs)
                if attrs.get("complete") is not True:
                    raise ProjectError(f"{final}: mask was not completely written (damaged); write it again")
                if attrs.get("classes_hash") != self.classes_hash():
                    raise ProjectError(f"{final}: mask was written for a different class table than this project's")
                return np.asarray(z[...]), float(attrs["downsample"])
            except ProjectError:
                raise
            except Exception as e:  # zarr raises several types for missing/garbled metadata or chunks
                raise ProjectError(f"{final}: cannot read mask: {e}") from e

    def mask_names(self, slide_id: str) -> list[str]:
        """Names of the masks stored for a slide."""
        folder = self._slide_dir(slide_id)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file())

    def classes_hash(self) -> str:
        """Short hash of the class table, stored with masks to catch masks from another table."""
        text = json.dumps(self.classes.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    # -- saving ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _disk(self, exclusive: bool) -> Iterator[None]:
        """This object's thread lock plus the project's lock across processes (shared for
        reading, exclusive for a read-modify-write)."""
        with self._lock, self._disk_lock.hold(exclusive):
            yield

    def _sync(self) -> None:
        """Adopt what other processes saved since this object last read or wrote the files (call
        with the lock held). Every change of this object is saved at once, so memory holds
        nothing unsaved and the files on disk are the state to apply the next change to."""
        mdata = _read_bytes(self.manifest_path, "the project manifest")
        digest = _digest(mdata)
        if digest != self._manifest_digest:
            manifest = _parse_manifest(self.manifest_path, mdata, self.SCHEMA_VERSION)
            if _classes_of(manifest, self.manifest_path).to_dict() != self.classes.to_dict():
                raise ProjectError(f"{self.manifest_path}: the class table was changed by another program; "
                                   "open the project again")
            settings = _check_settings(manifest["settings"], self.manifest_path)
            if settings != self.settings:
                self._grids.clear()
            self.settings = settings
            self.slides = {k: SlideRecord.from_dict(v) for k, v in manifest["slides"].items()}
            self._created = str(manifest.get("created", self._created))
            self._manifest_digest = digest
        if not self.labels_path.is_file():
            raise ProjectError(f"{self.labels_path}: the patch label file is missing; restore it from a backup")
        ldata = _read_bytes(self.labels_path, "patch labels")
        digest = _digest(ldata)
        if digest != self._labels_digest:
            self._labels = _parse_labels(self.labels_path, ldata, self.classes, set(self.slides))
            self._labels_digest = digest

    def _check_writable(self, what: Path) -> None:
        if self.read_only:
            raise ProjectError(f"{what}: cannot save, the project folder {self.root} is read-only; copy the project to a writable disk")

    def _write(self, path: Path, writer: Callable[[], None]) -> None:
        self._check_writable(path)
        try:
            writer()
        except HistoWSSSError as e:  # core.io.atomic turns OSError into HistoWSSSError
            raise ProjectError(f"{e} (project {self.root})") from e

    def _write_manifest(self, settings: dict, slides: dict[str, SlideRecord]) -> None:
        """Save a manifest with ``settings`` and ``slides``; memory takes them only once saved."""
        manifest = {
            "schema_version": self.SCHEMA_VERSION,
            "created": self._created or _now(),
            "classes": self.classes.to_dict(),
            "settings": settings,
            "slides": {k: v.to_dict() for k, v in slides.items()},
        }
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        self._write(self.manifest_path, lambda: write_text(self.manifest_path, text))
        self.settings, self.slides = settings, slides
        self._manifest_digest = _digest(text.encode("utf-8"))

    def _write_labels(self, labels: dict) -> None:
        """Save ``labels`` as the whole label file; memory takes them only once saved."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*_FIXED_COLUMNS, *self.classes.names, *_TRAILING_COLUMNS])
        for (sid, x, y, s0), (lab, stamp, who) in labels.items():
            w.writerow([sid, x, y, s0, *lab.tolist(), stamp, who])
        text = buf.getvalue()
        self._write(self.labels_path, lambda: write_text(self.labels_path, text))
        self._labels = labels
        self._labels_digest = _digest(text.encode("utf-8"))

    def _clean_temporaries(self) -> None:
        """Remove temporaries left by a killed process; restore a mask whose swap was cut short.

        Why this never deletes a live writer's temporaries: it runs under the exclusive project
        lock, and every writer of these temporaries (label and manifest saves, ``write_mask``,
        session registration) holds that lock for as long as its temporaries exist, so whatever
        is found here belongs to a process that died. While another window has the project open
        nothing is removed at all (defence in depth against a writer outside the lock, e.g. an
        older version of the plugin): the temporaries are hidden and harmless, and a later open
        removes them."""
        with self._disk(exclusive=True):
            if self.other_session() is not None:
                return
            # only this module's temporaries: another program may be writing its own file here
            remove_temporaries(self.root, [MANIFEST_NAME, LABELS_NAME])
            for p in self.root.glob(f".{SESSION_PREFIX}*.tmp"):
                p.unlink(missing_ok=True)
            for p in self.root.glob(".write-test-*.tmp"):  # _writable's probes live for microseconds
                with contextlib.suppress(OSError):
                    if time.time() - p.lstat().st_mtime > 60:
                        p.unlink()
            masks = self.root / MASKS_DIR
            if not masks.is_dir() or masks.is_symlink():
                return
            for folder in masks.iterdir():
                # only real folders of safe names: a planted symlink must not lead the clean-up out
                if folder.is_symlink() or not folder.is_dir() or not _SAFE_NAME.fullmatch(folder.name):
                    continue
                for p in folder.glob(".*"):
                    m = re.match(r"^\.(.+)\.(tmp|old)-[0-9a-f]+$", p.name)
                    if m is None or p.is_symlink():
                        continue
                    final = folder / m.group(1)
                    if m.group(2) == "old" and not final.exists() and _is_complete(p):
                        os.rename(p, final)
                    else:
                        shutil.rmtree(p, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------
def _check_name(kind: str, name: Any, where: Path | str) -> str:
    """``name`` if it is safe as a single folder name (``_SAFE_NAME``), else one ProjectError line
    naming ``where`` (the file it came from or the folder it would go in) and the name."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ProjectError(f"{where}: {kind} {name!r} is not allowed: it must be letters, digits, '.', '_' or '-' "
                           "starting with a letter or digit, so that it stays inside the project folder")
    return name


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ProjectError(f"{path}: cannot read {what}: {e.strerror or e}") from e


def _classes_of(manifest: dict, path: Path) -> ClassTable:
    try:
        return ClassTable.from_dict(manifest["classes"])
    except (ClassTableError, TypeError, AttributeError) as e:
        raise ProjectError(f"{path}: damaged class table: {e}") from e


def _live_session(path: Path, remove_stale: bool) -> SessionInfo | None:
    """The session recorded in ``path`` if its process still has it open, else None (and the
    stale file is removed when ``remove_stale``). Live = its ``flock`` is held by someone and,
    on this host, its pid still runs (a forked child may hold an inherited lock). Without
    ``fcntl`` (Windows) nothing can be judged: no session counts and none is removed."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            raw = json.loads(os.read(fd, 65536).decode("utf-8"))
            info = SessionInfo(int(raw["pid"]), str(raw["host"]), str(raw.get("started", "")),
                               str(raw.get("program", "")), path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            info = None  # damaged: nobody to name
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except OSError:  # BlockingIOError: held; other errors (no flock here): trust the pid check
            held = True
        if held and info is not None and info.host == socket.gethostname() and not _pid_alive(info.pid):
            held = False
        if held:
            return info  # None for a damaged file someone holds: left alone, but nobody to warn about
        if remove_stale:
            path.unlink(missing_ok=True)
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # POSIX only (this runs only where fcntl exists)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _release_session(path: Path, fd: int) -> None:
    """Remove a session file, then drop its lock (in this order: it is never seen unlocked)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _remove_partial_project(root: Path, made_root: bool) -> None:
    """Undo a :meth:`Project.create` that failed half-way, so that the folder can be used again."""
    steps: list[Callable[[], None]] = [(root / LABELS_NAME).unlink, (root / LOCK_NAME).unlink,
                                       (root / MASKS_DIR).rmdir, (root / RUNS_DIR).rmdir]
    if made_root:
        steps.append(root.rmdir)
    for step in steps:
        try:
            step()
        except OSError:  # absent, or the disk refuses: nothing more to undo there
            pass


def _writable(root: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", suffix=".tmp", dir=root)
    except OSError:
        return False
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)  # missing: removed by a clean-up of another process
    return True


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {}).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _complete_backup(final: Path) -> Path | None:
    """A complete previous version left by a swap cut short (read-only projects read it as is)."""
    if not final.parent.is_dir():
        return None
    for p in sorted(final.parent.glob(f".{final.name}.old-*")):
        if _is_complete(p):
            return p
    return None


def _check_settings(settings: Any, where: Path) -> dict:
    if not isinstance(settings, dict):
        raise ProjectError(f"{where}: settings must be a mapping, got {type(settings).__name__}")
    try:
        patch_size = int(settings["patch_size"])
        mpp = settings.get("target_mpp")
        mpp = None if mpp is None else float(mpp)
        min_tissue = float(settings["min_tissue"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProjectError(f"{where}: bad or missing setting: {e}") from e
    if patch_size < 8:
        raise ProjectError(f"{where}: patch_size must be at least 8 pixels, got {patch_size}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ProjectError(f"{where}: target_mpp must be positive or null, got {mpp}")
    if not 0 <= min_tissue <= 1:
        raise ProjectError(f"{where}: min_tissue must lie in 0..1, got {min_tissue}")
    return {**settings, "patch_size": patch_size, "target_mpp": mpp, "min_tissue": min_tissue}


def _parse_manifest(path: Path, data: bytes, supported: int) -> dict:
    """The manifest read from ``path`` (its bytes ``data``), checked: schema, sections, slide
    records and slide ids (they become folder names under ``masks/``)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ProjectError(f"{path}: damaged project manifest (not valid JSON: {e})") from e
    if not isinstance(manifest, dict):
        raise ProjectError(f"{path}: damaged project manifest (not a JSON object)")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProjectError(f"{path}: damaged project manifest (schema_version {version!r} is not a positive integer)")
    if version > supported:
        raise ProjectError(
            f"{path}: created by a newer napari-histo-wsss (schema {version} > {supported}); update the plugin to open it"
        )
    for key, kind in (("classes", dict), ("settings", dict), ("slides", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ProjectError(f"{path}: damaged project manifest (missing or invalid {key!r})")
    for sid, rec in manifest["slides"].items():
        _check_name("slide id", sid, path)
        try:
            SlideRecord.from_dict(rec)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProjectError(f"{path}: damaged record of slide {sid!r}: {e}") from e
    return manifest


def _parse_labels(path: Path, data: bytes, classes: ClassTable, slide_ids: set[str]) -> dict:
    """The label rows of ``path`` (its bytes ``data``) keyed by ``(slide_id, x, y, size0)``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProjectError(f"{path}: damaged patch label file (not UTF-8 text)") from e
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    expected = [*_FIXED_COLUMNS, *classes.names, *_TRAILING_COLUMNS]
    if header != expected:
        if header and header[: len(_FIXED_COLUMNS)] == list(_FIXED_COLUMNS) and header[-2:] == list(_TRAILING_COLUMNS):
            found = header[len(_FIXED_COLUMNS) : -2]
            unknown = [c for c in found if c not in classes.names]
            missing = [c for c in classes.names if c not in found]
            detail = "; ".join(
                s for s in (f"unknown class column(s) {unknown}" if unknown else "",
                            f"missing class column(s) {missing}" if missing else "",
                            "class columns in another order" if not unknown and not missing else "") if s
            )
            raise ProjectError(f"{path}: label columns do not match the project's class table ({detail})")
        raise ProjectError(f"{path}: damaged patch label file (header {header!r}, expected {expected!r})")
    c = classes.num_classes
    keys: list[tuple[str, int, int, int]] = []
    values: list[int] = []
    tails: list[tuple[str, str]] = []
    # plain Python per row, one numpy array at the end: a save that merges another window's
    # changes parses the whole file, which must stay fast for tens of thousands of rows
    try:
        for line, row in enumerate(rows, start=2):
            if len(row) != len(expected):
                raise ProjectError(f"{path}: line {line}: damaged row ({len(row)} fields, expected {len(expected)})")
            sid = row[0]
            if sid not in slide_ids:
                raise ProjectError(f"{path}: line {line}: slide id {sid!r} is not in {MANIFEST_NAME}")
            try:
                x, y, s0 = int(row[1]), int(row[2]), int(row[3])
                lab = [int(v) for v in row[4 : 4 + c]]
            except ValueError as e:
                raise ProjectError(f"{path}: line {line}: damaged row ({e})") from e
            if s0 <= 0 or any(v not in (0, 1) for v in lab):
                raise ProjectError(f"{path}: line {line}: damaged row (size0 must be positive and labels 0/1)")
            keys.append((sid, x, y, s0))
            values.extend(lab)
            tails.append((row[4 + c], row[5 + c]))
    except csv.Error as e:
        raise ProjectError(f"{path}: damaged patch label file ({e})") from e
    labels = np.array(values, dtype=np.uint8).reshape(len(keys), c)
    return {key: (labels[i], updated, who) for i, (key, (updated, who)) in enumerate(zip(keys, tails))}
