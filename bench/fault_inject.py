#!/usr/bin/env python
"""Fault-injection bench for the whole ``histo-wsss`` command line (issue 12, "Measure").

Each case runs the real CLI (``python -m napari_histo_wsss ...``; a few cases call the public core
API in a ``python -c`` child) as a subprocess, in its own temporary folder (also its working
directory), with a time limit. Every file in that folder -- the case's inputs and pre-existing
outputs: copies of the shared fixtures, generated bad files -- is hashed (sha256) before and after
the run. A case is classified as

* ``clean``: it should be refused and was (exit status != 0, exactly one error line on stderr, no
  traceback), or it should succeed and did, with a correct result (such cases check their output);
* ``traceback``: a Python traceback on stderr, more than one error line, or death by a signal;
* ``wrong``: exit 0 where it should have refused, a refusal of a valid request, a failure without
  any message, or a wrong result (a crafted checkpoint ran code, a file written outside a project);
* ``data lost``: an input or pre-existing output file changed or removed (except an output the case
  asked to replace with ``--overwrite``), or label rows missing after two concurrent writers;
* ``hung``: still running at the time limit (then killed with its whole process group).

A case counts in the worst class that applies (data lost > hung > traceback > wrong > clean).
"Error lines" are the non-empty lines of stderr without argparse's usage block (argparse prints
``usage: ...`` before its one ``error:`` line) and without Python ``warnings`` (``file:N:
XWarning: ...`` plus the source line under it), which are counted separately. Progress bars are
switched off (``TQDM_DISABLE=1``) so that stderr holds only messages. For a traceback the table
shows its exception line instead of "Traceback (most recent call last):".

Expectations are issue 12's: every bad input gives one clear line naming the file and the problem
and a non-zero exit, and nothing is lost; no command overwrites an input or an existing output
without --overwrite; an output equal to or inside an input is refused even with --overwrite.

The shared fixtures (tiny generated images, masks and slides, bad TIFFs, a make-patches set, ONE
tiny ``train-cls`` run and one ``train-seg`` run on it, an OME-Zarr, a project, foreign and
crafted checkpoints) are built once per bench run, through the CLI where there is a command for
it, only those the selected cases need; cases copy what they use. The fixtures are hashed before
and after the whole bench as well.

    OMP_NUM_THREADS=1 nice -n 10 python bench/fault_inject.py          # all cases, then the table
    python bench/fault_inject.py --list                                 # case ids and what they expect
    python bench/fault_inject.py --only 'export-*' --json /tmp/fi.json  # a subset; per-case JSON

The exit status is 0 whatever the results (a bench, not a test); ``tests/test_fault_inject.py``
runs a few cheap cases as a test.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "napari_histo_wsss"]
SAMPLE_SVS = ROOT / "src" / "napari_histo_wsss" / "data" / "CMU-1-Small-Region.svs"
CLASSES = ("clean", "traceback", "wrong", "data lost", "hung")
COMMANDS = ("info", "overview", "make-patches", "train-cls", "pseudo-masks", "evaluate", "train-seg", "predict",
            "predict-many", "export", "demo", "gui", "cli", "project-api")
DEFAULT_TIMEOUT = 120.0
#: Destinations that cannot be written (the bench runs as root, so chmod would not stop anything).
PROC_DIR = "/proc/histo-wsss-fault-inject"
LONG_NAME = "n" * 300  # longer than NAME_MAX (255)

#: Tiny settings shared by the cases, so that a command that fails to refuse finishes quickly.
CLS = {"--epochs": "1", "--batch-size": "4", "--max-steps-per-epoch": "2", "--weights": "none", "--device": "cpu",
       "--output-stride": "32", "--seed": "0"}
SEG = {"--epochs": "1", "--batch-size": "2", "--max-steps-per-epoch": "1", "--weights": "none", "--device": "cpu"}
PRED = {"--tile": "128", "--overlap": "16", "--device": "cpu"}
MANY = {"--threads": None, "--workers": "1", "--tile": "128", "--overlap": "16", "--device": "cpu"}


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
class Skip(Exception):
    """A case that cannot run on this machine (e.g. no tmpfs mount); reported, not counted."""


@dataclass
class Outcome:
    rc: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    lost: list[str] = field(default_factory=list)  # data loss found by a custom runner


@dataclass
class Spec:
    """What a case runs and how its result is judged."""

    argv: list | None = None                # histo-wsss arguments (str or Path)
    code: str | None = None                 # or: Python code run with the public API (``python -c``)
    args: list | None = None                # sys.argv[1:] of that code
    check: Callable[[Ctx, Outcome], str | None] | None = None  # problem with the result, or None
    may_change: tuple = ()                  # paths the command is asked to replace (--overwrite, --resume)
    names: str | None = None                # text the error line should contain (the culprit's name)
    runner: Callable[[Ctx, float], Outcome] | None = None  # custom run (concurrent writers)


@dataclass
class Case:
    id: str
    command: str
    expect: str                             # "refuse" or "ok"
    make: Callable[[Ctx], Spec | list]
    needs: tuple[str, ...] = ()             # fixtures
    timeout: float | None = None
    group: str | None = None                # cases of one group never run at the same time
    doc: str = ""


@dataclass
class Result:
    id: str
    command: str
    expect: str
    cls: str                                # one of CLASSES, or "skipped"
    rc: int | None = None
    seconds: float = 0.0
    first_line: str = ""
    detail: str = ""
    error_lines: int = 0
    warnings: int = 0
    names_file: bool | None = None


CASES: list[Case] = []


def case(id: str, command: str, expect: str = "refuse", needs: Sequence[str] = ("gen",), timeout: float | None = None,
         group: str | None = None) -> Callable:
    """Register ``fn(ctx) -> Spec | argv`` as a case."""
    assert expect in ("refuse", "ok")

    def deco(fn: Callable) -> Callable:
        CASES.append(Case(id, command, expect, fn, tuple(needs), timeout, group, (fn.__doc__ or "").strip()))
        return fn
    return deco


def simple(id: str, command: str, argv: Callable[[Ctx], list], expect: str = "refuse", needs: Sequence[str] = ("gen",),
           **spec: object) -> None:
    """Register a case that is a single command line (``argv(ctx)``) plus Spec fields."""
    case(id, command, expect, needs, timeout=spec.pop("timeout", None), group=spec.pop("group", None))(
        lambda c: Spec(argv=argv(c), **spec))


#: The unwritable destinations every writing command is tried with (see :func:`destination_cases`).
DESTINATIONS = ("is-file", "parent-is-file", "proc", "name-too-long")


def destination_cases(prefix: str, command: str, argv: Callable[[Ctx, str | Path], list], name: str = "out",
                      suffix: str = "", kinds: Sequence[str] = DESTINATIONS, needs: Sequence[str] = ("gen",),
                      **spec: object) -> None:
    """Register ``<prefix>-<kind>`` for each kind of destination that cannot be written:
    ``argv(ctx, dest)`` is the command line writing to ``dest`` -- a file where the output folder
    goes (``name + suffix``), a path under a file (``blocker/...``), a path under ``/proc`` (cannot
    be created, even as root), a name over NAME_MAX. The error line must name the file in the way."""
    dests: dict[str, tuple[Callable[[Ctx], str | Path], str | None]] = {
        "is-file": (lambda c: c.write(name + suffix, "a file"), name + suffix),
        "parent-is-file": (lambda c: c.blocker() / (name + suffix), "blocker"),
        "proc": (lambda c: f"{PROC_DIR}/{name}{suffix}", None),
        "name-too-long": (lambda c: LONG_NAME + suffix, None),
    }
    for kind in kinds:
        dest, names = dests[kind]
        simple(f"{prefix}-{kind}", command, lambda c, dest=dest: argv(c, dest(c)), needs=needs,
               **({"names": names} if names else {}), **spec)


def opts(base: dict, changes: dict | None = None) -> list[str]:
    """``base`` options with ``changes`` applied (value None: a flag; False: left out)."""
    merged = {**base, **(changes or {})}
    out: list[str] = []
    for k, v in merged.items():
        if v is False:
            continue
        out += [k] if v is None else [k, str(v)]
    return out


class Ctx:
    """A case's folder and helpers to fill it."""

    def __init__(self, folder: Path, fixtures: Path):
        self.dir = folder
        self.fx = fixtures
        self.cleanups: list[Callable[[], None]] = []
        self.before: dict[str, str] = {}
        self.after: dict[str, str] = {}

    def p(self, rel: str) -> Path:
        return self.dir / rel

    def cp(self, name: str, dest: str | None = None, skip: Sequence[str] = ()) -> Path:
        """Copy fixture ``name`` into the case folder (``skip``: file/folder name patterns)."""
        src, dst = self.fx / name, self.dir / (dest or Path(name).name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip) if skip else None, symlinks=True)
        else:
            shutil.copy2(src, dst)
        return dst

    def write(self, rel: str, data: bytes | str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            p.write_text(data, encoding="utf-8")
        else:
            p.write_bytes(data)
        return p

    def garbage(self, rel: str, n: int = 4096) -> Path:
        """``n`` deterministic random bytes."""
        return self.write(rel, random.Random(rel).randbytes(n))

    def truncated(self, fixture: str, rel: str, fraction: float = 0.5) -> Path:
        data = (self.fx / fixture).read_bytes()
        return self.write(rel, data[: int(len(data) * fraction)])

    def mkdir(self, rel: str) -> Path:
        p = self.dir / rel
        p.mkdir(parents=True, exist_ok=True)
        return p

    def blocker(self) -> Path:
        """A plain file where the command will want a folder: outputs go to ``blocker/...``."""
        return self.write("blocker", "a file in the way\n")

    def tmpfs(self, rel: str, size_bytes: int) -> Path:
        """A small tmpfs mounted at ``rel`` (a full disk); Skip where mounting is not allowed."""
        p = self.mkdir(rel)
        kib = max(64, size_bytes // 1024)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}); full-disk case skipped")

        def unmount() -> None:
            if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)
        self.cleanups.append(unmount)
        return p


# --- checks (return a problem, or None) -------------------------------------------------------
def _all(*checks: Callable) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        for ch in checks:
            problem = ch(c, o)
            if problem:
                return problem
        return None
    return check


def stdout_has(text: str) -> Callable:
    return lambda c, o: None if text in o.stdout else f"stdout lacks {text!r}"


def files_exist(*rels: str) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        missing = [r for r in rels if not c.p(r).exists()]
        return f"missing output {', '.join(missing)}" if missing else None
    return check


def no_file(rel: str, what: str) -> Callable:
    return lambda c, o: what if c.p(rel).exists() else None


def images_in(rel: str, n: int, size: tuple[int, int] | None = None) -> Callable:
    """``rel`` holds ``n`` readable PNGs (of ``size`` (w, h))."""
    def check(c: Ctx, o: Outcome) -> str | None:
        from PIL import Image

        folder = c.p(rel)
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if len(pngs) != n:
            return f"{rel}: {len(pngs)} PNGs, expected {n}"
        for p in pngs:
            try:
                with Image.open(p) as im:
                    im.load()
                    if size and im.size != size:
                        return f"{p.name}: {im.size[0]}x{im.size[1]} px, expected {size[0]}x{size[1]}"
            except Exception as e:  # noqa: BLE001 - any unreadable output is a wrong result
                return f"{p.name}: unreadable output ({e})"
        return None
    return check


def image_ok(rel: str) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        from PIL import Image

        try:
            with Image.open(c.p(rel)) as im:
                im.load()
                return None if im.size[0] > 0 else f"{rel}: empty image"
        except Exception as e:  # noqa: BLE001
            return f"{rel}: not a readable image ({e})"
    return check


def zarr_complete(rel: str) -> Callable:
    """An OME-Zarr whose metadata says ``complete: true`` (and nowhere false)."""
    def check(c: Ctx, o: Outcome) -> str | None:
        root = c.p(rel)
        flags = []
        for meta in list(root.rglob(".zattrs")) + list(root.rglob("zarr.json")):
            try:
                text = meta.read_text(encoding="utf-8")
            except OSError:
                continue
            flags += re.findall(r'"complete"\s*:\s*(true|false)', text)
        if not flags:
            return f"{rel}: no OME-Zarr with a 'complete' flag"
        return None if all(f == "true" for f in flags) else f"{rel}: marked incomplete"
    return check


def json_lines(rel: str, n: int) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        p = c.p(rel)
        if not p.is_file():
            return f"{rel} missing"
        lines = [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        return None if len(lines) == n else f"{rel}: {len(lines)} lines, expected {n}"
    return check


def geojson_ok(rel: str) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        try:
            doc = json.loads(c.p(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"{rel}: not GeoJSON ({e})"
        return None if isinstance(doc, dict) and "features" in doc else f"{rel}: no features"
    return check


def tiff_ok(rel: str) -> Callable:
    def check(c: Ctx, o: Outcome) -> str | None:
        import tifffile

        try:
            with tifffile.TiffFile(c.p(rel)) as tf:
                return None if tf.pages[0].shape[0] > 0 else f"{rel}: empty"
        except Exception as e:  # noqa: BLE001
            return f"{rel}: not a TIFF ({e})"
    return check


def nothing_new_outside(inside: str) -> Callable:
    """No file appeared in the case folder outside ``inside`` (a project must not write elsewhere)."""
    def check(c: Ctx, o: Outcome) -> str | None:
        new = [p for p in c.after if p not in c.before and not p.startswith(inside + os.sep)]
        return f"wrote outside {inside}/: {', '.join(sorted(new)[:3])}" if new else None
    return check


PWNED = no_file("PWNED", "the crafted checkpoint ran code (PWNED was created)")


# ---------------------------------------------------------------------------------------------
# fixtures, built once per bench run (only those needed)
# ---------------------------------------------------------------------------------------------
class FixtureError(Exception):
    pass


_GEN = r'''
import shutil, struct, sys
from pathlib import Path
import numpy as np, tifffile
from PIL import Image
fx, tests, svs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, tests)
from _generated import tissue_image

rng = np.random.default_rng(0)
COL = np.array([(150, 40, 90), (230, 150, 190), (110, 60, 190)], np.uint8)
for d in ("images", "masks", "slides"):
    (fx / d).mkdir()
for i in range(6):  # 96-px images of two tissue classes below a strip of glass; L masks of indices
    mask = np.full((96, 96), 3, np.uint8)
    mask[8:, :48], mask[8:, 48:] = i % 3, (i + 1) % 3
    img = np.full((96, 96, 3), 245, np.uint8)
    for k in range(3):
        sel = mask == k
        img[sel] = np.clip(COL[k].astype(int) + rng.integers(-25, 26, (int(sel.sum()), 3)), 0, 254)
    Image.fromarray(img).save(fx / "images" / f"im{i}.png")
    Image.fromarray(mask, mode="L").save(fx / "masks" / f"im{i}.png")
Image.fromarray(tissue_image(400, 300, 1)).save(fx / "slide.png")
tifffile.imwrite(fx / "slide.tif", tissue_image(500, 350, 2), tile=(128, 128), photometric="rgb", compression="zlib")
Image.fromarray(tissue_image(320, 240, 3)).save(fx / "slides" / "s1.png")
tifffile.imwrite(fx / "slides" / "s2.tif", tissue_image(256, 256, 4), tile=(128, 128), photometric="rgb")
m = np.full((150, 200), 3, np.uint8)
m[10:140, 10:100], m[10:140, 100:150], m[10:140, 150:190] = 0, 1, 2
Image.fromarray(m, mode="L").save(fx / "mask.png")
shutil.copyfile(svs, fx / "cmu.svs")
img = np.full((64, 64, 3), np.nan, np.float32)
img[:32] = np.inf
tifffile.imwrite(fx / "nan.tif", img, photometric="rgb")

def patch(path, entries):
    """Rewrite IFD entries of page 0 as LONG tags: {code: (count, value)}."""
    with tifffile.TiffFile(path) as tf:
        assert not tf.is_bigtiff
        bo, offs = tf.byteorder, {code: tf.pages[0].tags[code].offset for code in entries}
    with open(path, "r+b") as f:
        for code, (count, value) in entries.items():
            f.seek(offs[code])
            f.write(struct.pack(bo + "HHII", code, 4, count, value))

# a small tiled TIFF whose header says 200000 x 200000 px
tifffile.imwrite(fx / "huge.tif", tissue_image(256, 256, 7), tile=(128, 128), photometric="rgb", compression="zlib")
patch(fx / "huge.tif", {256: (1, 200000), 257: (1, 200000)})
# a 1024-px tiled TIFF whose tile table holds 1 of its 64 tiles, cut after that tile
tifffile.imwrite(fx / "tiletable.tif", tissue_image(1024, 1024, 8), tile=(128, 128), photometric="rgb", compression="zlib")
with tifffile.TiffFile(fx / "tiletable.tif") as tf:
    o0, b0 = int(tf.pages[0].dataoffsets[0]), int(tf.pages[0].databytecounts[0])
patch(fx / "tiletable.tif", {324: (1, o0), 325: (1, b0)})
with open(fx / "tiletable.tif", "r+b") as f:
    f.truncate(o0 + b0)
'''

_PROJECT = r'''
import shutil, sys
from pathlib import Path
import numpy as np
from napari_histo_wsss.core.data.project import Project
root, slide = Path(sys.argv[1]), Path(sys.argv[2])
p = Project.create(root, "wsss4luad", patch_size=64, target_mpp=None)
shutil.copyfile(slide, root / "slide.png")
sid = p.add_slide(root / "slide.png")
assert sid == "slide", sid
p.set_patch_labels(sid, [0, 64, 128], [0, 0, 0], 64, [[1, 0, 0], [0, 1, 0], [0, 1, 1]], who="bench")
mask = np.full((75, 100), 3, np.uint8)
mask[10:60, 10:50], mask[10:60, 50:90] = 0, 1
p.write_mask(sid, "pseudo", mask, 4.0)
'''

_CKPTS = r'''
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))
torch.save({"a": 1}, sys.argv[1])
torch.save(torch.nn.Linear(3, 2).state_dict(), sys.argv[2])
torch.save({"model": Payload(), "meta": {"classes": None}}, sys.argv[3])
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TQDM_DISABLE"] = "1"
    env.setdefault("HISTO_WSSS_DATA", str(ROOT.parent / "shared" / "data"))
    return env


def run_process(argv: list[str], cwd: Path, timeout: float) -> Outcome:
    """Run ``argv`` in its own process group; on timeout kill the whole group (workers included)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        timed_out = True
    return Outcome(proc.returncode, out, err, time.monotonic() - t0, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this bench started for this case
    except ProcessLookupError:
        pass


class Fixtures:
    """The shared inputs, built lazily in ``root`` with their dependencies."""

    DEPENDS = {"gen": (), "patches": ("gen",), "patches2": ("gen",), "run": ("patches",), "segrun": ("run",),
               "zarr": ("gen",), "project": ("gen",), "ckpts": ()}

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, str | None] = {}  # name -> None (ok) or the error
        self._lock = threading.Lock()

    def ensure(self, names: Iterable[str]) -> str | None:
        """Build ``names``; the first failure (a message) or None."""
        with self._lock:
            for name in names:
                problem = self._build(name)
                if problem:
                    return problem
        return None

    def _build(self, name: str) -> str | None:
        if name in self.built:
            return self.built[name]
        for dep in self.DEPENDS[name]:
            problem = self._build(dep)
            if problem:
                self.built[name] = problem
                return problem
        marker = self.root / f".built-{name}"
        if marker.exists():  # built by an earlier run in the same --workdir
            self.built[name] = None
            return None
        t0 = time.monotonic()
        try:
            getattr(self, "_" + name)()
            marker.touch()
            self.built[name] = None
            print(f"fixture {name}: built in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        except FixtureError as e:
            self.built[name] = f"fixture {name} failed: {e}"
            print(self.built[name], file=sys.stderr, flush=True)
        return self.built[name]

    def _cmd(self, argv: list, *outputs: str, timeout: float = 300) -> None:
        """Run a fixture command in the fixture folder after removing its ``outputs`` (left over
        from an interrupted build)."""
        for name in outputs:
            shutil.rmtree(self.root / name, ignore_errors=True)
        o = run_process([str(a) for a in argv], self.root, timeout)
        if o.rc != 0:
            lines = [x for x in o.stderr.splitlines() if x.strip()] or ["(no stderr)"]
            shown = "python -c ..." if argv[1] == "-c" else " ".join(map(str, argv[3:5]))
            raise FixtureError(f"{shown}: exit {o.rc}: {lines[-1]}")

    def _gen(self) -> None:
        self._cmd([sys.executable, "-c", _GEN, self.root, ROOT / "tests", SAMPLE_SVS], "images", "masks", "slides")

    def _patches(self) -> None:
        self._cmd(CLI + ["make-patches", "images", "masks", "patches", "--patch-size", "48", "--val-fraction", "0.34"], "patches")

    def _patches2(self) -> None:
        """Another dataset that suits the run (same patch size) but holds other patches (another split)."""
        self._cmd(CLI + ["make-patches", "images", "masks", "patches2", "--patch-size", "48", "--val-fraction", "0.34",
                         "--seed", "1"], "patches2")

    def _run(self) -> None:
        """THE tiny stage-one run, reused (copied) by every case that needs a trained classifier."""
        self._cmd(CLI + ["train-cls", "patches", "run"] + opts(CLS), "run")

    def _segrun(self) -> None:
        # RUN_DIR relative to the fixture folder, as a user working in that folder would type it
        self._cmd(CLI + ["train-seg", "run", "--out", "segrun"] + opts(SEG), "segrun")

    def _zarr(self) -> None:
        self._cmd(CLI + ["export", "mask.png", "pred.ome.zarr"], "pred.ome.zarr")

    def _project(self) -> None:
        self._cmd([sys.executable, "-c", _PROJECT, self.root / "project", self.root / "slide.png"], "project")

    def _ckpts(self) -> None:
        self._cmd([sys.executable, "-c", _CKPTS, self.root / "foreign.pt", self.root / "statedict.pt",
                   self.root / "pickle.pt"])


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
def _cls_run(c: Ctx, dest: str = "run", whole: bool = False) -> Path:
    """A copy of the tiny train-cls run (without last.pt unless ``whole``)."""
    return c.cp("run", dest, skip=() if whole else ("last.pt",))


def _seg_run(c: Ctx, dest: str = "segrun", whole: bool = False) -> Path:
    """A copy of the tiny train-seg run (without last.pt and pseudo-mask sets unless ``whole``)."""
    return c.cp("segrun", dest, skip=() if whole else ("last.pt", "pseudo"))


def _traversal_project(c: Ctx, sid: str = "../../x") -> Path:
    """A copy of the project whose project.json names its slide ``sid`` (labels.csv too), and a
    folder of someone else's data where ``masks/<sid>/...`` lands."""
    proj = c.cp("project")
    manifest = json.loads((proj / "project.json").read_text(encoding="utf-8"))
    manifest["slides"][sid] = manifest["slides"].pop("slide")
    (proj / "project.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    lab = proj / "labels.csv"
    lines = lab.read_text(encoding="utf-8").splitlines(keepends=True)
    lab.write_text("".join(lines[:1] + [sid + ln[len("slide"):] if ln.startswith("slide,") else ln for ln in lines[1:]]),
                   encoding="utf-8")
    for name in ("pseudo", "tissue"):
        c.write(f"x/{name}/keep.txt", "someone else's data\n")
    return proj


def _api(body: str) -> str:
    """Code that runs ``body`` and prints a HistoWSSSError as one line (exit 2), like the CLI."""
    return ("import sys\nimport numpy as np\nfrom napari_histo_wsss.core.errors import HistoWSSSError\n"
            "from napari_histo_wsss.core.data.project import Project\ntry:\n" + textwrap.indent(textwrap.dedent(body), "    ")
            + "\nexcept HistoWSSSError as e:\n    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)\n")


# --- the whole CLI -------------------------------------------------------------------------------
simple("cli-version", "cli", lambda c: ["--version"], "ok", (), check=stdout_has("histo-wsss"))
simple("cli-unknown-command", "cli", lambda c: ["frobnicate"], needs=())
simple("demo-help", "demo", lambda c: ["demo", "--help"], "ok", (), check=stdout_has("usage:"))
simple("gui-help", "gui", lambda c: ["gui", "--help"], "ok", (), check=stdout_has("usage:"))

# --- info ------------------------------------------------------------------------------------
simple("info-ok-svs", "info", lambda c: ["info", c.cp("cmu.svs")], "ok", check=_all(stdout_has("aperio"), stdout_has("patches:")))
simple("info-ok-png", "info", lambda c: ["info", c.cp("slide.png"), "--json"], "ok", check=stdout_has('"grid"'))
simple("info-missing-file", "info", lambda c: ["info", "never-scanned.svs"], names="never-scanned.svs")
simple("info-empty-svs", "info", lambda c: ["info", c.write("empty.svs", b"")], names="empty.svs")
simple("info-empty-png", "info", lambda c: ["info", c.write("empty.png", b"")], names="empty.png")
simple("info-garbage-svs", "info", lambda c: ["info", c.garbage("garbage.svs")], names="garbage.svs")
simple("info-garbage-tif", "info", lambda c: ["info", c.garbage("garbage.tif")], names="garbage.tif")
simple("info-garbage-png", "info", lambda c: ["info", c.garbage("garbage.png")], names="garbage.png")
simple("info-truncated-png", "info", lambda c: ["info", c.truncated("slide.png", "cut.png")], names="cut.png")
simple("info-truncated-tif", "info", lambda c: ["info", c.truncated("slide.tif", "cut.tif")], names="cut.tif")
simple("info-truncated-svs", "info", lambda c: ["info", c.truncated("cmu.svs", "cut.svs")], names="cut.svs")
simple("info-huge-declared-tiff", "info", lambda c: ["info", c.cp("huge.tif")], names="huge.tif", timeout=60)
simple("info-truncated-tile-table", "info", lambda c: ["info", c.cp("tiletable.tif")], names="tiletable.tif")
simple("info-float-nan-tiff", "info", lambda c: ["info", c.cp("nan.tif")], names="nan.tif")
simple("info-folder-as-slide", "info", lambda c: ["info", c.mkdir("folder.svs")], names="folder.svs")
simple("info-text-as-tif", "info", lambda c: ["info", c.write("notes.tif", "not a slide\n")], names="notes.tif")
simple("info-proc-file", "info", lambda c: ["info", "/proc/self/status"], names="status")
for _id, _o in [("patch-size-0", {"--patch-size": "0"}), ("min-tissue-nan", {"--min-tissue": "nan"}), ("min-tissue-2", {"--min-tissue": "2"}),
                ("target-mpp-0", {"--target-mpp": "0"}),
                ("target-mpp-nan", {"--target-mpp": "nan"}), ("level-99", {"--level": "99"}),
                ("stride-0", {"--stride": "0"})]:
    simple(f"info-{_id}", "info", lambda c, _o=_o: ["info", c.cp("slide.png")] + opts(_o))

# --- overview --------------------------------------------------------------------------------
simple("overview-ok", "overview", lambda c: ["overview", c.cp("slide.png"), "out.png"], "ok", check=image_ok("out.png"))
simple("overview-onto-input", "overview", lambda c: ["overview", c.cp("slide.png"), "slide.png"], names="slide.png")
simple("overview-out-exists", "overview",
       lambda c: ["overview", c.cp("slide.png"), c.write("old.png", b"an earlier overview")], names="old.png")
simple("overview-out-is-folder", "overview", lambda c: ["overview", c.cp("slide.png"), c.mkdir("out.png")], names="out.png")
destination_cases("overview-out", "overview", lambda c, out: ["overview", c.cp("slide.png"), out], suffix=".png",
                  kinds=DESTINATIONS[1:])
simple("overview-out-not-png", "overview", lambda c: ["overview", c.cp("slide.png"), "out.jpg"], names="out.jpg")
simple("overview-max-size-0", "overview", lambda c: ["overview", c.cp("slide.png"), "out.png", "--max-size", "0"])
simple("overview-max-size-negative", "overview", lambda c: ["overview", c.cp("slide.png"), "out.png", "--max-size", "-3"])
simple("overview-missing-slide", "overview", lambda c: ["overview", "never-scanned.svs", "out.png"], names="never-scanned.svs")
simple("overview-garbage-slide", "overview", lambda c: ["overview", c.garbage("garbage.svs"), "out.png"], names="garbage.svs")
simple("overview-huge-declared-tiff", "overview", lambda c: ["overview", c.cp("huge.tif"), "out.png"], names="huge.tif",
       timeout=60)
simple("overview-truncated-tile-table", "overview", lambda c: ["overview", c.cp("tiletable.tif"), "out.png"],
       names="tiletable.tif")

# --- make-patches ----------------------------------------------------------------------------
def _mp(c: Ctx, out: str | Path | None = "out", extra: list | None = None) -> list:
    return ["make-patches", c.cp("images"), c.cp("masks"), out, "--patch-size", "48"] + (extra or [])


simple("make-patches-ok", "make-patches", lambda c: _mp(c), "ok",
       check=_all(files_exist("out/patches.csv", "out/classes.json"), lambda c, o: None if list(c.p("out/train").glob("*.png")) else "no patches"))
simple("make-patches-out-is-images", "make-patches", lambda c: _mp(c, "images"))
simple("make-patches-out-inside-images", "make-patches", lambda c: _mp(c, "images/patches"))
simple("make-patches-out-is-masks", "make-patches", lambda c: _mp(c, "masks"))
simple("make-patches-out-not-empty", "make-patches", lambda c: [*_mp(c, c.write("out/keep.txt", "x").parent)], names="out")
destination_cases("make-patches-out", "make-patches", _mp)
simple("make-patches-images-missing", "make-patches", lambda c: ["make-patches", "nope", c.cp("masks"), "out"], names="nope")
simple("make-patches-masks-missing", "make-patches", lambda c: ["make-patches", c.cp("images"), "nope", "out"], names="nope")
simple("make-patches-images-empty", "make-patches", lambda c: ["make-patches", c.mkdir("empty"), c.cp("masks"), "out"],
       names="empty")


@case("make-patches-image-without-mask", "make-patches")
def _(c: Ctx) -> Spec:
    argv = _mp(c)
    c.cp("images/im0.png", "images/extra.png")
    return Spec(argv=argv, names="extra.png")


def _bad_file_in(folder: str, name: str, kind: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        target = c.p(f"{folder}/{name}")
        if kind == "garbage":
            c.garbage(f"{folder}/{name}")
        elif kind == "truncated":
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2])
        elif kind == "index9":
            import numpy as np
            from PIL import Image
            m = np.full((96, 96), 9, np.uint8)
            Image.fromarray(m, mode="L").save(target)
        elif kind == "small":
            import numpy as np
            from PIL import Image
            Image.fromarray(np.zeros((40, 40), np.uint8), mode="L").save(target)
    return make


for _id, _folder, _kind in [("garbage-image", "images", "garbage"), ("truncated-image", "images", "truncated"),
                            ("garbage-mask", "masks", "garbage"), ("mask-index-9", "masks", "index9"),
                            ("mask-size-mismatch", "masks", "small")]:
    def _make(c: Ctx, _folder=_folder, _kind=_kind) -> Spec:
        argv = _mp(c)
        _bad_file_in(_folder, "im1.png", _kind)(c)
        return Spec(argv=argv, names="im1.png")
    case(f"make-patches-{_id}", "make-patches")(_make)

for _id, _o in [("patch-size-0", ["--patch-size", "0"]), ("stride-0", ["--stride", "0"]), ("val-fraction-1.5", ["--val-fraction", "1.5"]),
                ("val-fraction-nan", ["--val-fraction", "nan"]), ("min-tissue-negative", ["--min-tissue", "-1"]),
                ("classes-unknown", ["--classes", "no-such-preset"])]:
    simple(f"make-patches-{_id}", "make-patches", lambda c, _o=_o: _mp(c, "out", _o))
simple("make-patches-classes-garbage-json", "make-patches",
       lambda c: _mp(c, "out", ["--classes", c.garbage("classes.json", 300)]), names="classes.json")

# --- train-cls -------------------------------------------------------------------------------
P, R = ("gen", "patches"), ("gen", "patches", "run")


def _tc(c: Ctx, dataset: str | Path | None = None, run: str | Path = "newrun", changes: dict | None = None,
        extra: Sequence = ()) -> list:
    ds = c.cp("patches") if dataset is None else dataset
    return ["train-cls", ds, run, *opts(CLS, changes), *extra]


simple("train-cls-ok", "train-cls", lambda c: _tc(c), "ok", P,
       check=_all(files_exist("newrun/checkpoints/best.pt", "newrun/config.json"), json_lines("newrun/metrics.jsonl", 1)))


@case("train-cls-resume-ok", "train-cls", "ok", R)
def _(c: Ctx) -> Spec:
    run = _cls_run(c, whole=True)
    return Spec(argv=["train-cls", c.cp("patches"), run, "--resume", *opts(CLS, {"--epochs": "2"})], may_change=(run,),
                check=json_lines("run/metrics.jsonl", 2))


simple("train-cls-existing-run-no-resume", "train-cls", lambda c: _tc(c, run=_cls_run(c, whole=True)), needs=R, names="run")
simple("train-cls-resume-empty-folder", "train-cls", lambda c: _tc(c, run=c.mkdir("empty"), extra=["--resume"]), needs=P,
       names="empty")
simple("train-cls-resume-missing-folder", "train-cls", lambda c: _tc(c, run="typo-run", extra=["--resume"]), needs=P,
       names="typo-run")
simple("train-cls-resume-other-dataset", "train-cls",
       lambda c: _tc(c, c.cp("patches2"), _cls_run(c, whole=True), {"--epochs": "2"}, ["--resume"]),
       needs=("gen", "patches2", "run"), names="run")
simple("train-cls-dataset-missing", "train-cls", lambda c: _tc(c, "no-dataset"), needs=(), names="no-dataset")
simple("train-cls-dataset-empty-folder", "train-cls", lambda c: _tc(c, c.mkdir("empty")), needs=(), names="empty")


def _corrupt_patch(c: Ctx, kind: str) -> Path:
    ds = c.cp("patches")
    victim = sorted((ds / "train").glob("*.png"))[3]
    if kind == "garbage":
        victim.write_bytes(random.Random(1).randbytes(2048))
    else:
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    return ds


simple("train-cls-garbage-patch", "train-cls", lambda c: _tc(c, _corrupt_patch(c, "garbage")), needs=P)
simple("train-cls-garbage-patch-num-workers-1", "train-cls",
       lambda c: _tc(c, _corrupt_patch(c, "garbage"), changes={"--num-workers": "1"}), needs=P)
simple("train-cls-truncated-patch", "train-cls", lambda c: _tc(c, _corrupt_patch(c, "truncated")), needs=P)
for _id, _o in [("epochs-0", {"--epochs": "0"}), ("epochs-nan", {"--epochs": "nan"}),
                ("batch-size-0", {"--batch-size": "0"}), ("lr-negative", {"--lr": "-1"}), ("lr-nan", {"--lr": "nan"}),
                ("patch-size-0", {"--patch-size": "0"}),
                ("backbone-unknown", {"--backbone": "vgg-1"}), ("output-stride-7", {"--output-stride": "7"}),
                ("device-cuda-99", {"--device": "cuda:99"}), ("num-workers-negative", {"--num-workers": "-1"}),
                ("val-fraction-2", {"--val-fraction": "2"}), ("max-steps-0", {"--max-steps-per-epoch": "0"}),
                ("method-unknown", {"--method": "mixup"}), ("weights-missing-file", {"--weights": "nope.pth"}),
                ("classes-mismatch", {"--classes": "luad-histoseg"})]:
    simple(f"train-cls-{_id}", "train-cls", lambda c, _o=_o: _tc(c, changes=_o), needs=P)
simple("train-cls-weights-garbage", "train-cls", lambda c: _tc(c, changes={"--weights": c.garbage("w.pth")}), needs=P,
       names="w.pth")
simple("train-cls-weights-foreign-torch", "train-cls", lambda c: _tc(c, changes={"--weights": c.cp("foreign.pt")}),
       needs=P + ("ckpts",), names="foreign.pt")
simple("train-cls-weights-crafted-pickle", "train-cls", lambda c: _tc(c, changes={"--weights": c.cp("pickle.pt")}),
       needs=P + ("ckpts",), names="pickle.pt", check=PWNED)
simple("train-cls-run-is-dataset", "train-cls", lambda c: _tc(c, run="patches"), needs=P)
simple("train-cls-run-inside-dataset", "train-cls", lambda c: _tc(c, run="patches/run"), needs=P)
destination_cases("train-cls-run", "train-cls", lambda c, run: _tc(c, run=run), name="run", needs=P)


@case("train-cls-disk-full-fresh", "train-cls", needs=P)
def _(c: Ctx) -> Spec:
    disk = c.tmpfs("disk", 2 * 1024 * 1024)
    return Spec(argv=_tc(c, run=disk / "run"))


@case("train-cls-disk-full-resume", "train-cls", needs=R)
def _(c: Ctx) -> Spec:
    """Resume a copied run on a disk with 1 MiB left: the new checkpoint cannot be written; the
    old one must stay whole and the error must be one line."""
    used = sum(p.stat().st_size for p in (c.fx / "run").rglob("*") if p.is_file())
    c.tmpfs("disk", used + 1024 * 1024)
    run = c.cp("run", "disk/run")
    old = (c.fx / "run" / "metrics.jsonl").read_text(encoding="utf-8")

    def history_kept(c: Ctx, o: Outcome) -> str | None:
        now = (run / "metrics.jsonl").read_text(encoding="utf-8") if (run / "metrics.jsonl").is_file() else ""
        return None if now.startswith(old) else "metrics.jsonl lost the epochs recorded before the resume"
    # a resume may rewrite its settings and add to its log; the checkpoints must stay whole
    return Spec(argv=_tc(c, run=run, changes={"--epochs": "2"}, extra=["--resume"]), check=history_kept,
                may_change=tuple(run / n for n in ("config.json", "dataset.json", "metrics.jsonl")))


simple("train-cls-project-traversal-id", "train-cls", lambda c: _tc(c, _traversal_project(c)), needs=("gen", "project"),
       names="../../x", check=nothing_new_outside("project"))

# --- pseudo-masks ----------------------------------------------------------------------------
def _pm(c: Ctx, out: str | Path = "out", run: str | Path | None = None, images: str | Path | None = None,
        extra: Sequence = ()) -> list:
    run = _cls_run(c) if run is None else run
    images = c.cp("images") if images is None else images
    return ["pseudo-masks", run, images, out, "--device", "cpu", *extra]


simple("pseudo-masks-ok", "pseudo-masks", lambda c: _pm(c), "ok", R, check=images_in("out", 6, (96, 96)))
simple("pseudo-masks-out-is-images", "pseudo-masks", lambda c: _pm(c, "images"), needs=R)
simple("pseudo-masks-out-inside-images", "pseudo-masks", lambda c: _pm(c, "images/pseudo"), needs=R)
simple("pseudo-masks-out-is-gt-labels", "pseudo-masks", lambda c: _pm(c, "masks", extra=["--labels", c.cp("masks")]),
       needs=R)


@case("pseudo-masks-out-exists-no-overwrite", "pseudo-masks", needs=R)
def _(c: Ctx) -> Spec:
    """An earlier result in OUT: replaced without --overwrite?"""
    c.write("out/im0.png", b"an earlier pseudo-mask")
    return Spec(argv=_pm(c, "out"), names="out")


destination_cases("pseudo-masks-out", "pseudo-masks", _pm, needs=R)
simple("pseudo-masks-cams-dir-is-file", "pseudo-masks", lambda c: _pm(c, extra=["--cams", c.write("cams", "a file")]),
       needs=R, names="cams")
simple("pseudo-masks-run-missing", "pseudo-masks", lambda c: _pm(c, run="no-run"), needs=("gen",), names="no-run")
simple("pseudo-masks-run-empty", "pseudo-masks", lambda c: _pm(c, run=c.mkdir("empty-run")), needs=("gen",),
       names="empty-run")


def _bad_ckpt(c: Ctx, run: Path, kind: str) -> Path:
    """Replace ``run``'s checkpoints/best.pt by a bad one."""
    best = run / "checkpoints" / "best.pt"
    if kind == "garbage":
        best.write_bytes(random.Random(2).randbytes(4096))
    elif kind == "truncated":
        data = best.read_bytes()
        best.write_bytes(data[: len(data) // 2])
    else:  # foreign.pt, statedict.pt, pickle.pt
        shutil.copyfile(c.fx / f"{kind}.pt", best)
    return run


for _kind in ("garbage", "truncated", "foreign", "pickle"):
    simple(f"pseudo-masks-checkpoint-{_kind}", "pseudo-masks", lambda c, _k=_kind: _pm(c, run=_bad_ckpt(c, _cls_run(c), _k)),
           needs=R + ("ckpts",), names="best.pt", check=PWNED)
simple("pseudo-masks-config-garbage", "pseudo-masks",
       lambda c: _pm(c, run=(lambda r: (c.garbage("run/config.json", 200), r)[1])(_cls_run(c))), needs=R, names="config.json")
simple("pseudo-masks-checkpoint-path-missing", "pseudo-masks", lambda c: _pm(c, extra=["--checkpoint", "nope.pt"]), needs=R,
       names="nope.pt")
simple("pseudo-masks-images-missing", "pseudo-masks", lambda c: _pm(c, images="no-images"), needs=R, names="no-images")
simple("pseudo-masks-images-empty", "pseudo-masks", lambda c: _pm(c, images=c.mkdir("empty")), needs=R, names="empty")
simple("pseudo-masks-garbage-image", "pseudo-masks",
       lambda c: _pm(c, images=(c.cp("images"), c.garbage("images/im2.png"))[0]), needs=R, names="im2.png")
simple("pseudo-masks-truncated-image", "pseudo-masks",
       lambda c: _pm(c, images=(c.cp("images"), c.truncated("images/im2.png", "images/im2.png"))[0]), needs=R,
       names="im2.png")
for _id, _o in [("tile-0", ["--tile", "0"]), ("prob-threshold-nan", ["--prob-threshold", "nan"]), ("prob-threshold-2", ["--prob-threshold", "2"]),
                ("bg-threshold-nan", ["--bg-threshold", "nan"]), ("labels-missing-folder", ["--labels", "no-masks"]),
                ("labels-names-without-labels", ["--labels", "names"]), ("device-cuda-99", ["--device", "cuda:99"])]:
    simple(f"pseudo-masks-{_id}", "pseudo-masks", lambda c, _o=_o: _pm(c, extra=_o), needs=R)

# --- evaluate --------------------------------------------------------------------------------
def _ev(c: Ctx, pred: str | Path | None = None, gt: str | Path | None = None, extra: Sequence = ()) -> list:
    pred = c.cp("masks", "pred") if pred is None else pred
    gt = c.cp("masks", "gt") if gt is None else gt
    return ["evaluate", pred, gt, *extra]


simple("evaluate-ok", "evaluate", lambda c: _ev(c), "ok", check=stdout_has("mIoU 1.0000"))
simple("evaluate-pred-missing", "evaluate", lambda c: _ev(c, pred="no-pred"), names="no-pred")
simple("evaluate-gt-missing", "evaluate", lambda c: _ev(c, gt="no-gt"), names="no-gt")
simple("evaluate-pred-empty", "evaluate", lambda c: _ev(c, pred=c.mkdir("empty")), names="empty")


@case("evaluate-no-common-names", "evaluate")
def _(c: Ctx) -> Spec:
    pred = c.cp("masks", "pred")
    for p in sorted(pred.glob("*.png")):
        p.rename(p.with_name("other-" + p.name))
    return Spec(argv=_ev(c, pred))


for _id, _kind in [("garbage-pred", "garbage"), ("truncated-pred", "truncated"), ("pred-index-9", "index9"),
                   ("pred-size-mismatch", "small")]:
    def _make(c: Ctx, _kind=_kind) -> Spec:
        argv = _ev(c)
        _bad_file_in("pred", "im1.png", _kind)(c)
        return Spec(argv=argv, names="im1.png")
    case(f"evaluate-{_id}", "evaluate")(_make)
for _id, _o in [("ignore-index-99", ["--ignore-index", "99"]), ("ignore-index-negative", ["--ignore-index", "-5"]),
                ("classes-unknown", ["--classes", "no-such-preset"])]:
    simple(f"evaluate-{_id}", "evaluate", lambda c, _o=_o: _ev(c, extra=_o))
simple("evaluate-classes-json-garbage", "evaluate", lambda c: _ev(c, gt=(c.cp("masks", "gt"), c.garbage("gt/classes.json", 300))[0]),
       names="classes.json")

# --- train-seg -------------------------------------------------------------------------------
S = ("gen", "patches", "run", "segrun")


def _ts(c: Ctx, run: str | Path | None = None, out: str | Path | None = "seg", changes: dict | None = None,
        extra: Sequence = ()) -> list:
    run = _cls_run(c) if run is None else run
    return ["train-seg", run, *(["--out", out] if out is not None else []), *opts(SEG, changes), *extra]


@case("train-seg-resume-ok", "train-seg", "ok", S)
def _(c: Ctx) -> Spec:
    seg = _seg_run(c, "seg", whole=True)
    return Spec(argv=_ts(c, changes={"--epochs": "2"}, extra=["--resume"]), may_change=(seg,),
                check=json_lines("seg/metrics.jsonl", 2))


simple("train-seg-existing-run-no-resume", "train-seg", lambda c: (_seg_run(c, "seg", whole=True), _ts(c))[1], needs=S,
       names="seg")
simple("train-seg-resume-empty-out", "train-seg", lambda c: _ts(c, out=c.mkdir("empty"), extra=["--resume"]), needs=R,
       names="empty")
simple("train-seg-resume-missing-out", "train-seg", lambda c: _ts(c, out="typo-seg", extra=["--resume"]), needs=R,
       names="typo-seg")
simple("train-seg-resume-other-dataset", "train-seg",
       lambda c: (_seg_run(c, "seg", whole=True),
                  _ts(c, changes={"--epochs": "2"}, extra=["--resume", "--dataset", c.cp("patches2")]))[1],
       needs=S + ("patches2",), names="seg")
simple("train-seg-run-missing", "train-seg", lambda c: _ts(c, run="no-run"), needs=(), names="no-run")
simple("train-seg-run-empty", "train-seg", lambda c: _ts(c, run=c.mkdir("empty-run")), needs=(), names="empty-run")
for _kind in ("garbage", "foreign", "pickle"):
    simple(f"train-seg-checkpoint-{_kind}", "train-seg", lambda c, _k=_kind: _ts(c, run=_bad_ckpt(c, _cls_run(c), _k)),
           needs=R + ("ckpts",), names="best.pt", check=PWNED)
for _id, _o in [("epochs-0", {"--epochs": "0"}), ("batch-size-0", {"--batch-size": "0"}), ("lr-negative", {"--lr": "-1"}),
                ("lr-nan", {"--lr": "nan"}), ("set-weights-garbage", {"--set-weights": "a,b"}),
                ("set-weights-negative", {"--set-weights": "-1,2"}), ("synthesis-unknown", {"--synthesis": "cutmix"}),
                ("pseudo-masks-missing", {"--pseudo-masks": "no-masks"})]:
    simple(f"train-seg-{_id}", "train-seg", lambda c, _o=_o: _ts(c, changes=_o), needs=R)
simple("train-seg-pseudo-masks-empty", "train-seg", lambda c: _ts(c, changes={"--pseudo-masks": c.mkdir("empty")}),
       needs=R, names="empty")


@case("train-seg-pseudo-masks-garbage", "train-seg", needs=R)
def _(c: Ctx) -> Spec:
    """A --pseudo-masks folder whose masks, named like the training patches, are garbage."""
    folder = c.mkdir("pm")
    for p in sorted((c.fx / "patches" / "train").glob("*.png")):
        c.garbage(f"pm/{p.name}", 512)
    return Spec(argv=_ts(c, changes={"--pseudo-masks": folder}))


simple("train-seg-out-is-stage-one-run", "train-seg", lambda c: _ts(c, run=_cls_run(c), out="run"), needs=R)
simple("train-seg-out-is-dataset", "train-seg",
       lambda c: _ts(c, out="patches", extra=["--dataset", c.cp("patches")]), needs=R)
destination_cases("train-seg-out", "train-seg", lambda c, out: _ts(c, out=out), name="seg", needs=R)


@case("train-seg-disk-full", "train-seg", needs=R)
def _(c: Ctx) -> Spec:
    disk = c.tmpfs("disk", 2 * 1024 * 1024)
    return Spec(argv=_ts(c, out=disk / "seg"))


# --- predict ---------------------------------------------------------------------------------
SR = ("gen", "patches", "run", "segrun")


def _pr(c: Ctx, inp: str | Path | None = None, out: str | Path = "out", run: str | Path | None = None,
        changes: dict | None = None, extra: Sequence = ()) -> list:
    run = _seg_run(c) if run is None else run
    inp = c.cp("images") if inp is None else inp
    return ["predict", run, inp, out, *opts(PRED, changes), *extra]


simple("predict-folder-ok", "predict", lambda c: _pr(c), "ok", SR, check=images_in("out", 6, (96, 96)))
simple("predict-slide-ok", "predict", lambda c: _pr(c, c.cp("slide.tif"), "out.ome.zarr"), "ok", SR,
       check=zarr_complete("out.ome.zarr"))


@case("predict-folder-overwrite-ok", "predict", "ok", SR)
def _(c: Ctx) -> Spec:
    out = c.mkdir("out")
    c.write("out/im0.png", b"an earlier prediction")
    return Spec(argv=_pr(c, out=out, extra=["--overwrite"]), may_change=(out,), check=images_in("out", 6, (96, 96)))


@case("predict-slide-overwrite-ok", "predict", "ok", SR + ("zarr",))
def _(c: Ctx) -> Spec:
    out = c.cp("pred.ome.zarr", "out.ome.zarr")
    return Spec(argv=_pr(c, c.cp("slide.tif"), out, extra=["--overwrite"]), may_change=(out,),
                check=zarr_complete("out.ome.zarr"))


simple("predict-gate-from-another-folder", "predict", lambda c: _pr(c, c.cp("slide.tif"), "out.ome.zarr", extra=["--gate"]),
       "ok", SR, check=zarr_complete("out.ome.zarr"))
simple("predict-out-is-input-folder", "predict", lambda c: _pr(c, c.cp("images"), "images"), needs=SR)
simple("predict-out-is-input-folder-overwrite", "predict", lambda c: _pr(c, c.cp("images"), "images", extra=["--overwrite"]),
       needs=SR)
simple("predict-out-inside-input", "predict", lambda c: _pr(c, c.cp("images"), "images/pred"), needs=SR)
simple("predict-out-is-ground-truth", "predict", lambda c: (c.cp("masks"), _pr(c, out="masks"))[1], needs=SR)


@case("predict-folder-out-exists-no-overwrite", "predict", needs=SR)
def _(c: Ctx) -> Spec:
    c.write("out/im0.png", b"an earlier prediction")
    return Spec(argv=_pr(c, out="out"), names="out")


simple("predict-slide-out-exists-no-overwrite", "predict",
       lambda c: _pr(c, c.cp("slide.tif"), c.cp("pred.ome.zarr", "out.ome.zarr")), needs=SR + ("zarr",), names="out.ome.zarr")
simple("predict-slide-onto-itself-overwrite", "predict", lambda c: _pr(c, c.cp("slide.tif"), "slide.tif", extra=["--overwrite"]),
       needs=SR)
simple("predict-folder-out-is-file", "predict", lambda c: _pr(c, out=c.write("out", "a file")), needs=SR, names="out")
simple("predict-folder-out-parent-is-file", "predict", lambda c: _pr(c, out=c.blocker() / "out"), needs=SR, names="blocker")
simple("predict-slide-out-parent-is-file", "predict", lambda c: _pr(c, c.cp("slide.tif"), c.blocker() / "o.ome.zarr"),
       needs=SR, names="blocker")
simple("predict-out-proc", "predict", lambda c: _pr(c, c.cp("slide.tif"), f"{PROC_DIR}/o.ome.zarr"), needs=SR)
simple("predict-out-name-too-long", "predict", lambda c: _pr(c, out=LONG_NAME), needs=SR)
simple("predict-run-missing", "predict", lambda c: _pr(c, run="no-run"), needs=("gen",), names="no-run")
simple("predict-run-empty", "predict", lambda c: _pr(c, run=c.mkdir("empty-run")), needs=("gen",), names="empty-run")
simple("predict-run-stage-one-only", "predict", lambda c: _pr(c, run=_cls_run(c)), needs=R, names="run")
for _kind in ("garbage", "truncated", "foreign", "statedict", "pickle"):
    simple(f"predict-checkpoint-{_kind}", "predict", lambda c, _k=_kind: _pr(c, run=_bad_ckpt(c, _seg_run(c), _k)),
           needs=SR + ("ckpts",), names="best.pt", check=PWNED)
simple("predict-input-missing", "predict", lambda c: _pr(c, "never-scanned.svs", "o.ome.zarr"), needs=SR,
       names="never-scanned.svs")
simple("predict-input-garbage-slide", "predict", lambda c: _pr(c, c.garbage("garbage.svs"), "o.ome.zarr"), needs=SR,
       names="garbage.svs")
simple("predict-input-huge-declared-tiff", "predict", lambda c: _pr(c, c.cp("huge.tif"), "o.ome.zarr"), needs=SR,
       names="huge.tif", timeout=60)
simple("predict-input-truncated-tile-table", "predict", lambda c: _pr(c, c.cp("tiletable.tif"), "o.ome.zarr"), needs=SR,
       names="tiletable.tif")
simple("predict-input-empty-folder", "predict", lambda c: _pr(c, c.mkdir("empty")), needs=SR, names="empty")
simple("predict-input-garbage-image", "predict", lambda c: _pr(c, (c.cp("images"), c.garbage("images/im4.png"))[0]),
       needs=SR, names="im4.png")
for _id, _o in [("tile-0", {"--tile": "0"}), ("overlap-negative", {"--overlap": "-1"}),
                ("overlap-ge-tile", {"--tile": "64", "--overlap": "64"}), ("batch-size-0", {"--batch-size": "0"}),
                ("target-mpp-0", {"--target-mpp": "0"}), ("downsample-0", {"--downsample": "0"}),
                ("downsample-nan", {"--downsample": "nan"}), ("device-cuda-99", {"--device": "cuda:99"})]:
    simple(f"predict-{_id}", "predict", lambda c, _o=_o: _pr(c, c.cp("slide.tif"), "o.ome.zarr", changes=_o), needs=SR)

# --- predict-many (never two at once: LocalCluster ports) -------------------------------------
def _pm_many(c: Ctx, slides: Sequence | None = None, out: str | Path = "out", run: str | Path | None = None,
             changes: dict | None = None) -> list:
    run = _seg_run(c) if run is None else run
    slides = [c.cp("slides")] if slides is None else list(slides)
    return ["predict-many", run, *slides, "--out", out, *opts(MANY, changes)]


def many(id: str, argv: Callable[[Ctx], list], expect: str = "refuse", needs: Sequence[str] = SR, **spec: object) -> None:
    simple(id, "predict-many", argv, expect, needs, group="dask", **spec)


many("predict-many-ok", lambda c: _pm_many(c), "ok", check=_all(zarr_complete("out/s1.ome.zarr"), zarr_complete("out/s2.ome.zarr")))
many("predict-many-scheduler-refused-port", lambda c: _pm_many(c, changes={"--scheduler": "tcp://127.0.0.1:1"}),
     names="127.0.0.1:1")
many("predict-many-scheduler-nonsense", lambda c: _pm_many(c, changes={"--scheduler": "nonsense"}), names="nonsense")
many("predict-many-missing-slide", lambda c: _pm_many(c, [c.cp("slides"), "never-scanned.svs"]), names="never-scanned")
many("predict-many-garbage-slide", lambda c: _pm_many(c, [c.cp("slides"), c.garbage("garbage.svs")]), names="garbage.svs")
many("predict-many-huge-declared-tiff", lambda c: _pm_many(c, [c.cp("huge.tif")]), names="huge.tif", timeout=60)
many("predict-many-empty-folder", lambda c: _pm_many(c, [c.mkdir("empty")]), names="empty")
many("predict-many-list-binary", lambda c: _pm_many(c, [c.garbage("list.txt")]), names="list.txt")
many("predict-many-out-is-slides-folder", lambda c: _pm_many(c, [c.cp("slides")], out="slides"))
destination_cases("predict-many-out", "predict-many", lambda c, out: _pm_many(c, out=out), needs=SR, group="dask")
many("predict-many-run-missing", lambda c: _pm_many(c, run="no-run"), needs=("gen",), names="no-run")
many("predict-many-checkpoint-garbage", lambda c: _pm_many(c, run=_bad_ckpt(c, _seg_run(c), "garbage")), names="best.pt")
many("predict-many-run-stage-one-only", lambda c: _pm_many(c, run=_cls_run(c)), needs=R, names="run")
for _id, _o in [("workers-0", {"--workers": "0"}), ("retries-negative", {"--retries": "-1"}), ("tile-0", {"--tile": "0"})]:
    many(f"predict-many-{_id}", lambda c, _o=_o: _pm_many(c, changes=_o))

# --- export ----------------------------------------------------------------------------------
Z, PJ = ("gen", "zarr"), ("gen", "project")
_FORMATS = {"geojson": geojson_ok, "png": image_ok, "tif": tiff_ok, "ome.zarr": zarr_complete}


def _ex(c: Ctx, out: str | Path, inp: str | Path | None = None, extra: Sequence = ()) -> list:
    inp = c.cp("mask.png") if inp is None else inp
    return ["export", inp, out, *extra]


for _ext, _chk in _FORMATS.items():
    simple(f"export-ok-{_ext}", "export", lambda c, _e=_ext: _ex(c, f"out.{_e}"), "ok", check=_chk(f"out.{_ext}"))
simple("export-ok-from-ome-zarr", "export", lambda c: _ex(c, "out.tif", c.cp("pred.ome.zarr")), "ok", Z, check=tiff_ok("out.tif"))
simple("export-ok-csv", "export", lambda c: _ex(c, "out.csv", c.cp("project")), "ok", PJ,
       check=lambda c, o: None if c.p("out.csv").is_file() and "slide_id" in c.p("out.csv").read_text() else "no CSV")
simple("export-ok-project-mask", "export", lambda c: _ex(c, "out.geojson", c.cp("project"), ["--slide", "slide", "--mask", "pseudo"]),
       "ok", PJ, check=geojson_ok("out.geojson"))


def _existing(c: Ctx, ext: str) -> tuple[Path, Path]:
    """(input, an existing output of that format) for export."""
    if ext == "csv":
        inp = c.cp("project")
    elif ext == "ome.zarr":
        inp = c.cp("mask.png")
        c.cp("pred.ome.zarr", "old.ome.zarr")
        return inp, c.p("old.ome.zarr")
    else:
        inp = c.cp("mask.png")
    return inp, c.write(f"old.{ext}", f"an earlier export ({ext})\n")


for _ext in ("geojson", "png", "tif", "csv", "ome.zarr"):
    _needs = PJ if _ext == "csv" else Z

    def _no(c: Ctx, _e=_ext) -> Spec:
        inp, out = _existing(c, _e)
        return Spec(argv=["export", inp, out], names=out.name)

    def _yes(c: Ctx, _e=_ext) -> Spec:
        inp, out = _existing(c, _e)
        checks = {"csv": lambda c, o: None if "slide_id" in c.p("old.csv").read_text() else "CSV not replaced",
                  "ome.zarr": zarr_complete("old.ome.zarr")}
        return Spec(argv=["export", inp, out, "--overwrite"], may_change=(out,),
                    check=checks.get(_e) or _FORMATS[_e](f"old.{_e}"))
    case(f"export-{_ext.replace('.', '-')}-exists", "export", needs=_needs)(_no)
    case(f"export-{_ext.replace('.', '-')}-exists-overwrite", "export", "ok", needs=_needs)(_yes)

simple("export-ome-zarr-onto-itself", "export", lambda c: ["export", c.cp("pred.ome.zarr"), "pred.ome.zarr"], needs=Z)
simple("export-ome-zarr-onto-itself-overwrite", "export",
       lambda c: ["export", c.cp("pred.ome.zarr"), "pred.ome.zarr", "--overwrite"], needs=Z)
simple("export-png-onto-input", "export", lambda c: ["export", c.cp("mask.png"), "mask.png"])
simple("export-png-onto-input-overwrite", "export", lambda c: ["export", c.cp("mask.png"), "mask.png", "--overwrite"])
simple("export-out-inside-zarr-input", "export", lambda c: ["export", c.cp("pred.ome.zarr"), "pred.ome.zarr/labels/x.tif"],
       needs=Z)
simple("export-csv-onto-project-labels", "export", lambda c: ["export", c.cp("project"), "project/labels.csv"], needs=PJ)
simple("export-geojson-onto-project-manifest", "export",
       lambda c: ["export", c.cp("project"), "project/project.json", "--slide", "slide", "--mask", "pseudo"], needs=PJ)
for _ext in ("geojson", "png", "tif", "ome.zarr", "csv"):
    simple(f"export-{_ext.replace('.', '-')}-out-parent-is-file", "export",
           lambda c, _e=_ext: _ex(c, c.blocker() / f"out.{_e}", c.cp("project") if _e == "csv" else None),
           needs=PJ, names="blocker")
simple("export-tif-out-proc", "export", lambda c: _ex(c, f"{PROC_DIR}/out.tif"))
simple("export-geojson-out-name-too-long", "export", lambda c: _ex(c, LONG_NAME + ".geojson"))
simple("export-png-out-is-folder", "export", lambda c: _ex(c, c.mkdir("out.png")), names="out.png")
simple("export-input-missing", "export", lambda c: _ex(c, "out.png", "no-mask.png"), names="no-mask.png")
simple("export-input-garbage-png", "export", lambda c: _ex(c, "out.png", c.garbage("garbage.png")), names="garbage.png")
simple("export-input-truncated-png", "export", lambda c: _ex(c, "out.png", c.truncated("mask.png", "cut.png")), names="cut.png")
simple("export-input-index-out-of-range", "export",
       lambda c: _ex(c, "out.png", (c.cp("mask.png"), _bad_file_in(".", "mask.png", "index9")(c))[0]), names="mask.png")
simple("export-input-garbage-zarr", "export",
       lambda c: _ex(c, "out.png", (c.write("bad.ome.zarr/.zgroup", b"\x00garbage"), c.p("bad.ome.zarr"))[1]),
       names="bad.ome.zarr")


@case("export-input-incomplete-zarr", "export", needs=Z)
def _(c: Ctx) -> Spec:
    z = c.cp("pred.ome.zarr")
    for meta in list(z.rglob(".zattrs")) + list(z.rglob("zarr.json")):
        text = meta.read_text(encoding="utf-8")
        if '"complete": true' in text:
            meta.write_text(text.replace('"complete": true', '"complete": false'), encoding="utf-8")
    return Spec(argv=_ex(c, "out.png", z), names="pred.ome.zarr")


simple("export-input-empty-folder", "export", lambda c: _ex(c, "out.png", c.mkdir("empty")), names="empty")
simple("export-unknown-extension", "export", lambda c: _ex(c, "out.xyz"), names="out.xyz")
simple("export-project-without-slide", "export", lambda c: _ex(c, "out.png", c.cp("project")), needs=PJ, names="project")
simple("export-project-unknown-slide", "export",
       lambda c: _ex(c, "out.png", c.cp("project"), ["--slide", "nope", "--mask", "pseudo"]), needs=PJ, names="nope")
simple("export-project-unknown-mask", "export",
       lambda c: _ex(c, "out.png", c.cp("project"), ["--slide", "slide", "--mask", "nope"]), needs=PJ, names="nope")
simple("export-project-slide-arg-traversal", "export",
       lambda c: _ex(c, "out.png", c.cp("project"), ["--slide", "../../x", "--mask", "pseudo"]), needs=PJ)
simple("export-project-mask-arg-traversal", "export",
       lambda c: _ex(c, "out.png", c.cp("project"), ["--slide", "slide", "--mask", "../../../x/pseudo"]), needs=PJ)
simple("export-project-traversal-id", "export",
       lambda c: _ex(c, "out.png", _traversal_project(c), ["--slide", "../../x", "--mask", "pseudo"]), needs=PJ,
       names="../../x", check=nothing_new_outside("project"))
simple("export-project-absolute-id", "export",
       lambda c: _ex(c, "out.png", _traversal_project(c, str(c.dir / "x")), ["--slide", str(c.dir / "x"), "--mask", "pseudo"]),
       needs=PJ, check=nothing_new_outside("project"))
simple("export-project-json-garbage", "export",
       lambda c: _ex(c, "out.csv", (c.cp("project"), c.garbage("project/project.json", 500))[0]), needs=PJ,
       names="project.json")
simple("export-project-labels-garbage", "export",
       lambda c: _ex(c, "out.csv", (c.cp("project"), c.garbage("project/labels.csv", 500))[0]), needs=PJ, names="labels.csv")


@case("export-project-newer-schema", "export", needs=PJ)
def _(c: Ctx) -> Spec:
    proj = c.cp("project")
    m = json.loads((proj / "project.json").read_text(encoding="utf-8"))
    m["schema_version"] = 99
    (proj / "project.json").write_text(json.dumps(m), encoding="utf-8")
    return Spec(argv=_ex(c, "out.csv", proj), names="project.json")


for _id, _o in [("max-side-0", ["--max-side", "0"]), ("min-area-nan", ["--min-area", "nan"]),
                ("downsample-0", ["--downsample", "0"])]:
    simple(f"export-{_id}", "export", lambda c, _o=_o: _ex(c, "out.geojson", extra=_o))
simple("export-format-csv-of-a-mask", "export", lambda c: _ex(c, "out.geojson", extra=["--format", "csv"]), names="mask.png")

# --- projects through the public API (python -c) ----------------------------------------------
def api(id: str, body: str, args: Callable[[Ctx], list], expect: str = "refuse", needs: Sequence[str] = PJ,
        **spec: object) -> None:
    case(id, "project-api", expect, needs)(lambda c: Spec(code=_api(body), args=args(c), **spec))


api("project-api-traversal-open", "Project.open(sys.argv[1])", lambda c: [_traversal_project(c)], names="../../x",
    check=nothing_new_outside("project"))
api("project-api-traversal-tissue", "Project.open(sys.argv[1]).tissue('../../x')", lambda c: [_traversal_project(c)],
    names="../../x", check=nothing_new_outside("project"))
api("project-api-traversal-write-mask",
    "Project.open(sys.argv[1]).write_mask('../../x', 'pseudo', np.zeros((8, 8), np.uint8), 4.0)",
    lambda c: [_traversal_project(c)], names="../../x", check=nothing_new_outside("project"))
api("project-api-absolute-id",
    "Project.open(sys.argv[1]).write_mask(sys.argv[2], 'pseudo', np.zeros((8, 8), np.uint8), 4.0)",
    lambda c: [_traversal_project(c, str(c.dir / "x")), str(c.dir / "x")], check=nothing_new_outside("project"))
api("project-api-mask-name-with-slash",
    "Project.open(sys.argv[1]).write_mask('slide', '../../../x/pseudo', np.zeros((8, 8), np.uint8), 4.0)",
    lambda c: [(c.write("x/pseudo/keep.txt", "someone else's data\n"), c.cp("project"))[1]],
    check=nothing_new_outside("project"))

_WRITER = """\
import sys
from pathlib import Path
from napari_histo_wsss.core.data.project import Project
root, tag, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = Project.open(root)
for i in range(n):
    p.set_patch_labels("slide", 64 * (1000 * tag + i), 640, 64, [1, 0, 1], who=f"writer{tag}")
Path(root, f".done-{tag}").touch()
"""
_OPENER = """\
import sys, time
from pathlib import Path
from napari_histo_wsss.core.data.project import Project
root = sys.argv[1]
t0 = time.monotonic()
while not Path(root, ".done-1").exists() and time.monotonic() - t0 < 60:
    Project.open(root).patch_labels()
"""
_COUNT = "import sys\nfrom napari_histo_wsss.core.data.project import Project\nprint(len(Project.open(sys.argv[1]).patch_labels()))"


def _concurrent(second: str) -> Callable[[Ctx, float], Outcome]:
    """Two processes on one project: writer 1 saves N labels; the second process is writer 2
    (``second == 'writer'``) or keeps reopening the project (``'opener'``). Rows missing at the
    end are data lost."""
    n = 25

    def runner(c: Ctx, timeout: float) -> Outcome:
        proj = c.dir / "project"
        env = _env()
        t0 = time.monotonic()
        argvs = [[sys.executable, "-c", _WRITER, str(proj), "1", str(n)]]
        argvs.append([sys.executable, "-c", _WRITER, str(proj), "2", str(n)] if second == "writer"
                     else [sys.executable, "-c", _OPENER, str(proj)])
        procs = [subprocess.Popen(a, cwd=c.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  errors="replace", start_new_session=True) for a in argvs]
        outs, timed_out = [], False
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0))))
            except subprocess.TimeoutExpired:
                _kill_group(p)
                outs.append(p.communicate())
                timed_out = True
        rc = next((p.returncode for p in procs if p.returncode != 0), 0)
        o = Outcome(rc, "".join(x[0] for x in outs), "".join(x[1] for x in outs), time.monotonic() - t0, timed_out)
        if not timed_out:
            count = run_process([sys.executable, "-c", _COUNT, str(proj)], c.dir, 60)
            expected = 3 + n * (2 if second == "writer" else 1)
            if count.rc != 0:
                o.stderr += count.stderr
                o.rc = o.rc or count.rc
            elif int(count.stdout.strip() or 0) < expected:
                o.lost.append(f"labels.csv: {count.stdout.strip()} of {expected} rows on disk after the saves "
                              f"(writers exited {[p.returncode for p in procs]})")
        return o
    return runner


case("project-concurrent-writers", "project-api", "ok", PJ)(
    lambda c: Spec(runner=_concurrent("writer"), may_change=(c.cp("project"),)))
case("project-open-while-saving", "project-api", "ok", PJ)(
    lambda c: Spec(runner=_concurrent("opener"), may_change=(c.cp("project"),)))


# ---------------------------------------------------------------------------------------------
# running and classifying
# ---------------------------------------------------------------------------------------------
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def error_lines(stderr: str) -> tuple[list[str], int]:
    """(error lines, number of Python warnings) of a stderr text; see the module docstring."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    if lines and lines[0].startswith("usage:"):
        for i, ln in enumerate(lines):
            if ": error: " in ln:
                lines = lines[i:]
                break
    errors, warnings, source_next = [], 0, False
    for ln in lines:
        if source_next and ln[:1].isspace():
            source_next = False
            continue
        source_next = False
        if _WARNING.match(ln):
            warnings += 1
            source_next = True
            continue
        errors.append(ln)
    return errors, warnings


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (symlinks: their target)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
                continue
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = h.hexdigest()
            except OSError as e:
                out[rel] = f"unreadable: {e.strerror}"
    return out


def _lost(c: Ctx, spec: Spec) -> list[str]:
    allowed = [os.path.relpath(Path(p), c.dir) for p in spec.may_change]

    def ok(rel: str) -> bool:
        return any(rel == a or rel.startswith(a + os.sep) for a in allowed)
    lost = [f"{rel} removed" if rel not in c.after else f"{rel} changed"
            for rel, digest in c.before.items() if c.after.get(rel) != digest and not ok(rel)]
    return sorted(lost)


def _shown(errors: list[str], stdout: str) -> str:
    """The line for the table: the first error line, or a traceback's exception line (runs of
    one character, like the too-long names, shortened)."""
    if not errors:
        line = next((ln.strip() for ln in stdout.splitlines() if ln.strip()), "")
    elif errors[0].startswith("Traceback"):
        line = [ln for ln in errors if not ln.startswith(" ")][-1]
    else:
        line = errors[0]
    return re.sub(r"(.)\1{15,}", lambda m: m.group(1) * 3 + "...", line)[:200]


def classify(case: Case, spec: Spec, c: Ctx, o: Outcome, timeout: float) -> Result:
    errors, warnings = error_lines(o.stderr)
    lost = _lost(c, spec) + o.lost
    r = Result(case.id, case.command, case.expect, "clean", o.rc, round(o.seconds, 2), _shown(errors, o.stdout),
               error_lines=len(errors), warnings=warnings)
    traceback = "Traceback (most recent call last)" in o.stderr
    if lost:
        r.cls, r.detail = "data lost", "; ".join(lost[:4]) + (f" (+{len(lost) - 4} more)" if len(lost) > 4 else "")
    elif o.timed_out:
        r.cls, r.detail = "hung", f"still running after {timeout:g} s"
    elif traceback:
        r.cls = "traceback"
    elif o.rc is not None and o.rc < 0:
        r.cls, r.detail = "traceback", f"killed by signal {-o.rc}"
    else:
        problem = spec.check(c, o) if spec.check else None
        if case.expect == "refuse":
            if o.rc == 0:
                r.cls, r.detail = "wrong", "exit 0: should have refused" + (f"; {problem}" if problem else "")
            elif not errors:
                r.cls, r.detail = "wrong", f"exit {o.rc} without a message"
            elif len(errors) > 1:
                r.cls, r.detail = "traceback", f"{len(errors)} error lines"
            elif problem:
                r.cls, r.detail = "wrong", problem
            elif spec.names:
                r.names_file = spec.names in errors[0]
        else:
            if o.rc != 0:
                r.cls = "traceback" if len(errors) > 1 else "wrong"
                r.detail = f"exit {o.rc}: refused a valid request"
            elif problem:
                r.cls, r.detail = "wrong", problem
    return r


def run_case(case: Case, fx: Fixtures, work: Path, timeout: float, keep: bool = False) -> Result:
    """Build the case's folder, run it, classify it, remove the folder (unless ``keep``)."""
    limit = case.timeout or timeout
    problem = fx.ensure(case.needs)
    if problem:
        return Result(case.id, case.command, case.expect, "skipped", detail=problem)
    folder = work / case.id
    folder.mkdir(parents=True)
    c = Ctx(folder, fx.root)
    try:
        try:
            spec = case.make(c)
            spec = Spec(argv=spec) if isinstance(spec, list) else spec
        except Skip as e:
            return Result(case.id, case.command, case.expect, "skipped", detail=str(e))
        c.before = snapshot(folder)
        if spec.runner is not None:
            o = spec.runner(c, limit)
        elif spec.code is not None:
            o = run_process([sys.executable, "-c", spec.code, *map(str, spec.args or [])], folder, limit)
        else:
            argv = [os.path.relpath(a, folder) if isinstance(a, Path) and a.is_absolute() and folder in a.parents
                    else str(a) for a in spec.argv]
            o = run_process(CLI + argv, folder, limit)
        c.after = snapshot(folder)
        return classify(case, spec, c, o, limit)
    finally:
        for undo in reversed(c.cleanups):
            undo()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def select(patterns: Sequence[str] | None) -> list[Case]:
    """Cases whose id matches any pattern (a glob if it has * ? [, else a substring)."""
    if not patterns:
        return list(CASES)
    out = []
    for c in CASES:
        for pat in patterns:
            if (fnmatch.fnmatch(c.id, pat) if any(ch in pat for ch in "*?[") else pat in c.id):
                out.append(c)
                break
    return out


def run_cases(cases: Sequence[Case | str], work: Path, jobs: int = 2, timeout: float = DEFAULT_TIMEOUT,
              keep: bool = False, progress: bool = True) -> list[Result]:
    """Run ``cases`` (Case objects or ids) with ``jobs`` at a time; results in the given order.
    Fixtures are built in ``work/fixtures`` first (only those the cases need)."""
    by_id = {c.id: c for c in CASES}
    todo = [by_id[c] if isinstance(c, str) else c for c in cases]
    work.mkdir(parents=True, exist_ok=True)
    fx = Fixtures(work / "fixtures")
    fx.root.mkdir(exist_ok=True)
    fx.ensure(sorted({n for c in todo for n in c.needs}, key=list(Fixtures.DEPENDS).index))
    fixtures_before = snapshot(fx.root)
    cases_dir = work / "cases"
    groups: dict[str, threading.Lock] = {}
    for c in todo:
        if c.group:
            groups.setdefault(c.group, threading.Lock())
    done = [0]
    lock = threading.Lock()

    def one(c: Case) -> Result:
        if c.group:
            with groups[c.group]:
                r = run_case(c, fx, cases_dir, timeout, keep)
        else:
            r = run_case(c, fx, cases_dir, timeout, keep)
        if progress:
            with lock:
                done[0] += 1
                print(f"[{done[0]}/{len(todo)}] {c.id}: {r.cls} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, todo))
    fixtures_after = snapshot(fx.root)
    changed = [rel for rel, d in fixtures_before.items() if fixtures_after.get(rel) != d]
    if changed:
        print(f"WARNING: shared fixtures changed during the bench: {', '.join(changed[:5])}", file=sys.stderr)
    return results


def summary(results: Sequence[Result]) -> dict:
    tried = [r for r in results if r.cls != "skipped"]
    counts = {k: sum(r.cls == k for r in tried) for k in CLASSES}
    per_command = {}
    for cmd in COMMANDS:
        rs = [r for r in tried if r.command == cmd]
        if rs:
            per_command[cmd] = {"tried": len(rs), **{k: sum(r.cls == k for r in rs) for k in CLASSES}}
    unnamed = [r.id for r in tried if r.cls == "clean" and r.names_file is False]
    return {"tried": len(tried), **counts, "skipped": len(results) - len(tried), "per_command": per_command,
            "clean_without_the_file_name": unnamed}


def report(results: Sequence[Result], seconds: float) -> str:
    s = summary(results)
    out = [f"fault-injection bench: {s['tried']} cases tried in {seconds:.0f} s"
           + (f" ({s['skipped']} skipped)" if s["skipped"] else ""), ""]
    out.append("| cases tried | clean | tracebacks | wrong | data lost | hung |")
    out.append("|---|---|---|---|---|---|")
    out.append(f"| {s['tried']} | {s['clean']} | {s['traceback']} | {s['wrong']} | {s['data lost']} | {s['hung']} |")
    out += ["", "| command | tried | clean | traceback | wrong | data lost | hung |", "|---|---|---|---|---|---|---|"]
    for cmd, row in s["per_command"].items():
        out.append(f"| {cmd} | {row['tried']} | " + " | ".join(str(row[k]) for k in CLASSES) + " |")
    bad = [r for r in results if r.cls not in ("clean", "skipped")]
    if bad:
        out += ["", f"non-clean cases ({len(bad)}): case id | class | first error line (tracebacks: the exception) | what was wrong"]
        order = {k: i for i, k in enumerate(("data lost", "hung", "traceback", "wrong"))}
        for r in sorted(bad, key=lambda r: (order[r.cls], r.command, r.id)):
            out.append(f"{r.id} | {r.cls} | {r.first_line}" + (f" | {r.detail}" if r.detail else ""))
    if s["clean_without_the_file_name"]:
        out += ["", "clean, but the error line does not name the culprit: " + ", ".join(s["clean_without_the_file_name"])]
    skipped = [r for r in results if r.cls == "skipped"]
    if skipped:
        out += ["", "skipped:"] + [f"{r.id} | {r.detail}" for r in skipped]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="PATTERN",
                    help="run the cases whose id matches (glob, or substring); repeatable")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--json", metavar="OUT", help="write the per-case results and the totals as JSON")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at the same time (default 2)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case before it counts as hung")
    ap.add_argument("--workdir", default=None, help="folder for fixtures and case folders (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the case folders (to look at what a command did)")
    args = ap.parse_args(argv)
    cases = select(args.only)
    if args.list:
        for c in cases:
            print(f"{c.id:48s} {c.command:13s} {c.expect}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print("no case matches", file=sys.stderr)
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="histo-wsss-fault-inject-"))
    t0 = time.monotonic()
    try:
        results = run_cases(cases, work, jobs=args.jobs, timeout=args.timeout, keep=args.keep)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - t0
    print(report(results, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary(results), "seconds": round(seconds, 1),
                                               "results": [asdict(r) for r in results]}, indent=1) + "\n",
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
