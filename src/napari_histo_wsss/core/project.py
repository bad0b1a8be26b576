"""The project folder: the one source of truth of a labelling/training session (design section 3).

Layout of a project folder (e.g. ``case-12.wsss/``)::

    project.json            manifest: schema_version, classes (ClassTable.to_dict), settings, slides
    labels.csv              patch labels, one row per patch:
                            slide_id,x,y,size0,<one 0/1 column per class name>,updated,who
    masks/<slide_id>/<name> zarr v3 arrays ("tissue", "cam", "pseudo", "corrected", ...) with attrs
                            downsample, classes_hash, complete
    runs/                   training runs (written by core.train / core.train_seg)

Durability: ``project.json`` and ``labels.csv`` are rewritten whole through :mod:`core.atomic`
(temp file + fsync + rename) on every change, so a crash or ``kill -9`` leaves the previous or the
new version, never a mix. A mask is written into a hidden temporary zarr array, marked
``complete`` in its attributes last, and then swapped in by renames; a kill between the renames
is repaired on the next open (the previous complete array is restored). Temporary names start
with ``.`` and are cleaned up on open.

Coordinates are level-0 pixels; ``size0`` is a patch's side in level-0 pixels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .atomic import fsync_dir, fsync_tree, write_json, write_text
from .classes import ClassTable, get_preset
from .errors import ClassTableError, HistoWSSSError, ProjectError

if TYPE_CHECKING:  # pragma: no cover
    from .grid import PatchGrid
    from .slide import Slide

MANIFEST_NAME = "project.json"
LABELS_NAME = "labels.csv"
MASKS_DIR = "masks"
RUNS_DIR = "runs"
_FIXED_COLUMNS = ("slide_id", "x", "y", "size0")
_TRAILING_COLUMNS = ("updated", "who")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SlideRecord":
        return cls(
            path=str(d["path"]), width=int(d["width"]), height=int(d["height"]),
            mpp=None if d.get("mpp") is None else float(d["mpp"]), format=str(d.get("format", "")),
            objective_power=None if d.get("objective_power") is None else float(d["objective_power"]),
            relpath=d.get("relpath"), added=str(d.get("added", "")),
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


class Project:
    """An open project folder. Create with :meth:`create`, open with :meth:`open`.

    Every mutating method saves at once (atomically); there is no separate save step. A project
    on a read-only disk opens for reading (``read_only`` is True) and refuses changes with a
    :class:`ProjectError`. Methods are safe to call from several threads of one process; two
    processes editing the same project concurrently are not coordinated (last save wins per file).
    """

    SCHEMA_VERSION = 1

    def __init__(self, root: Path, manifest: dict, labels: dict, read_only: bool):
        self.root = root
        self.classes: ClassTable = ClassTable.from_dict(manifest["classes"])
        self.settings: dict[str, Any] = dict(manifest["settings"])
        self.slides: dict[str, SlideRecord] = {k: SlideRecord.from_dict(v) for k, v in manifest["slides"].items()}
        self.read_only = read_only
        self._created = str(manifest.get("created", ""))
        self._labels: dict[tuple[str, int, int, int], tuple[np.ndarray, str, str]] = labels
        self._grids: dict[str, "PatchGrid"] = {}
        self._lock = threading.RLock()
        self._grid_lock = threading.Lock()  # tissue detection is slow: do not block label saves

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
    ) -> "Project":
        """Create a new project in ``path`` (absent or empty folder). ``classes`` is a
        :class:`ClassTable` or a preset name. ``target_mpp`` = microns per pixel of the patches the
        models see (1.0 is about 10x); ``None`` reads patches at level 0."""
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
            project._save_labels()
            project._save_manifest()
        except ProjectError:
            _remove_partial_project(root, made_root)
            raise
        return project

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Project":
        """Open an existing project (its folder or its ``project.json``). Raises ProjectError for
        a missing or damaged manifest or label file, or a schema newer than this plugin's."""
        root = Path(path).expanduser().resolve()
        if root.is_file() and root.name == MANIFEST_NAME:
            root = root.parent
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise ProjectError(f"{root}: not a napari-histo-wsss project (no {MANIFEST_NAME})")
        manifest = _read_manifest(mpath, cls.SCHEMA_VERSION)
        try:
            table = ClassTable.from_dict(manifest["classes"])
        except (ClassTableError, TypeError, AttributeError) as e:
            raise ProjectError(f"{mpath}: damaged class table: {e}") from e
        manifest["settings"] = _check_settings(manifest["settings"], mpath)
        lpath = root / LABELS_NAME
        if not lpath.is_file():
            raise ProjectError(f"{lpath}: the patch label file is missing; restore it from a backup")
        labels = _read_labels(lpath, table, set(manifest["slides"]))
        project = cls(root, manifest, labels, read_only=not _writable(root))
        if not project.read_only:
            project._clean_temporaries()
        return project

    # -- slides ------------------------------------------------------------------------------------
    def add_slide(self, path: str | os.PathLike) -> str:
        """Add a slide (reads its metadata through ``open_slide``; SlideError if unreadable) and
        return its id (the file name stem, made unique). Adding the same file again returns the
        existing id."""
        from .slide import open_slide

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
                )
            sid = self._new_slide_id(p)
            self.slides[sid] = rec
            try:
                self._save_manifest()
            except ProjectError:
                del self.slides[sid]
                raise
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
        return sid

    def _record(self, slide_id: str) -> SlideRecord:
        try:
            return self.slides[slide_id]
        except KeyError:
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

    def open_slide(self, slide_id: str) -> "Slide":
        """Open a project slide (the caller closes it, e.g. ``with project.open_slide(i) as s``)."""
        from .slide import open_slide

        return open_slide(self.slide_path(slide_id))

    # -- settings and grid -------------------------------------------------------------------------
    def update_settings(self, **changes: Any) -> None:
        """Change ``patch_size``, ``target_mpp`` or ``min_tissue`` and save. Patch grids are
        recomputed on next use; existing labels keep their own ``size0``."""
        unknown = set(changes) - {"patch_size", "target_mpp", "min_tissue"}
        if unknown:
            raise ProjectError(f"{self.manifest_path}: unknown setting(s) {sorted(unknown)}")
        with self._lock:
            old = dict(self.settings)
            self.settings = _check_settings({**self.settings, **changes}, self.manifest_path)
            try:
                self._save_manifest()
            except ProjectError:
                self.settings = old
                raise
            self._grids.clear()

    def tissue(self, slide_id: str):
        """The slide's tissue mask (:class:`core.tissue.TissueMask`), detected once and cached
        as the mask ``"tissue"`` (detected again, without caching, on a read-only project)."""
        from .tissue import TissueMask, detect_tissue

        cached = self.read_mask(slide_id, "tissue")
        if cached is not None:
            return TissueMask(cached[0].astype(bool), cached[1])
        with self.open_slide(slide_id) as slide:
            tm = detect_tissue(slide)
        if not self.read_only:
            self.write_mask(slide_id, "tissue", tm.mask.astype(bool), tm.downsample)
        return tm

    def grid(self, slide_id: str) -> "PatchGrid":
        """The patch grid of a slide with the project's settings (tissue mask + ``make_grid``),
        computed once per settings and cached in memory."""
        from .grid import make_grid

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
        self._record(slide_id)
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
        with self._lock:
            previous = dict(self._labels)
            for xi, yi, row in zip(xs.tolist(), ys.tolist(), lab):
                self._labels[(slide_id, xi, yi, size0)] = (np.array(row, dtype=np.uint8), stamp, who)
            self._commit_labels(previous)

    def remove_patch_labels(self, slide_id: str, x: Any, y: Any, size0: int) -> None:
        """Delete the labels of one or several patches (absent ones are ignored) and save."""
        xs = np.atleast_1d(np.asarray(x, dtype=np.int64)).tolist()
        ys = np.atleast_1d(np.asarray(y, dtype=np.int64)).tolist()
        with self._lock:
            previous = dict(self._labels)
            changed = False
            for xi, yi in zip(xs, ys):
                changed |= self._labels.pop((slide_id, xi, yi, int(size0)), None) is not None
            if changed:
                self._commit_labels(previous)

    def _commit_labels(self, previous: dict) -> None:
        try:
            self._save_labels()
        except ProjectError:
            self._labels = previous  # memory stays equal to what is on disk
            raise

    def patch_labels(self, slide_id: str | None = None) -> PatchLabelTable:
        """All patch labels, or those of one slide, in insertion order."""
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

    # -- masks -------------------------------------------------------------------------------------
    def _mask_path(self, slide_id: str, name: str) -> Path:
        self._record(slide_id)
        if not _SAFE_NAME.match(name):
            raise ProjectError(f"mask name {name!r} must be letters, digits, '.', '_' or '-'")
        return self.root / MASKS_DIR / slide_id / name

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
        with self._lock:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
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

    def read_mask(self, slide_id: str, name: str) -> tuple[np.ndarray, float] | None:
        """``(array, downsample)`` of a stored mask, or ``None`` if there is none. A mask written
        for a different class table or left incomplete raises ProjectError naming it."""
        import zarr

        final = self._mask_path(slide_id, name)
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
        self._record(slide_id)
        folder = self.root / MASKS_DIR / slide_id
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file())

    def classes_hash(self) -> str:
        """Short hash of the class table, stored with masks to catch masks from another table."""
        text = json.dumps(self.classes.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    # -- saving ------------------------------------------------------------------------------------
    def _check_writable(self, what: Path) -> None:
        if self.read_only:
            raise ProjectError(f"{what}: cannot save, the project folder {self.root} is read-only; copy the project to a writable disk")

    def _write(self, path: Path, writer: Callable[[], None]) -> None:
        self._check_writable(path)
        try:
            writer()
        except HistoWSSSError as e:  # core.atomic turns OSError into HistoWSSSError
            raise ProjectError(f"{e} (project {self.root})") from e

    def _save_manifest(self) -> None:
        manifest = {
            "schema_version": self.SCHEMA_VERSION,
            "created": self._created or _now(),
            "classes": self.classes.to_dict(),
            "settings": self.settings,
            "slides": {k: v.to_dict() for k, v in self.slides.items()},
        }
        self._write(self.manifest_path, lambda: write_json(self.manifest_path, manifest))

    def _save_labels(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*_FIXED_COLUMNS, *self.classes.names, *_TRAILING_COLUMNS])
        for (sid, x, y, s0), (lab, stamp, who) in self._labels.items():
            w.writerow([sid, x, y, s0, *lab.tolist(), stamp, who])
        text = buf.getvalue()
        self._write(self.labels_path, lambda: write_text(self.labels_path, text))

    def _clean_temporaries(self) -> None:
        """Remove temporaries left by a killed process; restore a mask whose swap was cut short."""
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        masks = self.root / MASKS_DIR
        if not masks.is_dir():
            return
        for folder in masks.iterdir():
            if not folder.is_dir():
                continue
            for p in folder.glob(".*"):
                m = re.match(r"^\.(.+)\.(tmp|old)-[0-9a-f]+$", p.name)
                if m is None:
                    continue
                final = folder / m.group(1)
                if m.group(2) == "old" and not final.exists() and _is_complete(p):
                    os.rename(p, final)
                else:
                    shutil.rmtree(p, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------
def _remove_partial_project(root: Path, made_root: bool) -> None:
    """Undo a :meth:`Project.create` that failed half-way, so that the folder can be used again."""
    steps: list[Callable[[], None]] = [(root / LABELS_NAME).unlink, (root / MASKS_DIR).rmdir, (root / RUNS_DIR).rmdir]
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
    os.unlink(tmp)
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


def _read_manifest(path: Path, supported: int) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProjectError(f"{path}: cannot read the project manifest: {e.strerror or e}") from e
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
        try:
            SlideRecord.from_dict(rec)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProjectError(f"{path}: damaged record of slide {sid!r}: {e}") from e
    return manifest


def _read_labels(path: Path, classes: ClassTable, slide_ids: set[str]) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProjectError(f"{path}: cannot read patch labels: {e.strerror or e}") from e
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
    out: dict[tuple[str, int, int, int], tuple[np.ndarray, str, str]] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(expected):
            raise ProjectError(f"{path}: line {line}: damaged row ({len(row)} fields, expected {len(expected)})")
        sid = row[0]
        if sid not in slide_ids:
            raise ProjectError(f"{path}: line {line}: slide id {sid!r} is not in {MANIFEST_NAME}")
        try:
            x, y, s0 = int(row[1]), int(row[2]), int(row[3])
            lab = np.array([int(v) for v in row[4 : 4 + c]], dtype=np.int64)
        except ValueError as e:
            raise ProjectError(f"{path}: line {line}: damaged row ({e})") from e
        if s0 <= 0 or not np.isin(lab, (0, 1)).all():
            raise ProjectError(f"{path}: line {line}: damaged row (size0 must be positive and labels 0/1)")
        out[(sid, x, y, s0)] = (lab.astype(np.uint8), row[4 + c], row[5 + c])
    return out
