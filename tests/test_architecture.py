"""The core never imports napari or Qt: checked in a fresh interpreter after importing every module."""

import pkgutil
import subprocess
import sys

import napari_histo_wsss.core as core


def test_core_imports_no_napari_or_qt():
    mods = [m.name for m in pkgutil.walk_packages(core.__path__, prefix="napari_histo_wsss.core.")]
    assert len(mods) >= 3
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'vispy'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "napari_histo_wsss", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "histo-wsss" in r.stdout
