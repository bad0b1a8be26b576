"""``histo-wsss gui [SLIDE|PROJECT]``: open napari with the plugin's panels docked.

A project folder (one holding ``project.json``) is opened in the Project panel and its first slide
shown; a slide file is opened lazily through the plugin's reader, ready for "Add open slide".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_histo_wsss.core.errors import HistoWSSSError

PLUGIN = "napari-histo-wsss"
#: Dock widgets in the order of the workflow (display names of napari.yaml).
PANELS = ["Project", "Patch labelling", "Training", "Review and correct", "Segmenter", "Export and metrics"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gui", help="open napari with the plugin's panels docked",
        description="Open the napari viewer with the Project, Patch labelling, Training, Review, Segmenter and "
                    "Export panels docked (tabbed on the right). PATH may be a slide file or a project folder.",
    )
    p.add_argument("path", nargs="?", help="a slide file (opened lazily) or a project folder (opened in the Project panel)")
    p.set_defaults(func=run_gui)


def open_gui(path: str | Path | None = None, show: bool = True, viewer: Any = None) -> tuple[Any, dict[str, Any]]:
    """Create (or use) a viewer, dock every panel, open ``path``; returns (viewer, {panel name: widget})."""
    import napari

    if path is not None and not Path(path).expanduser().exists():
        raise HistoWSSSError(f"{path}: no such slide file or project folder")
    viewer = viewer if viewer is not None else napari.Viewer(title="napari-histo-wsss", show=show)
    widgets: dict[str, Any] = {}
    docks = []
    for i, name in enumerate(PANELS):
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=i > 0)
        widgets[name] = widget
        docks.append(dock)
    docks[0].raise_()  # the tab group opens on the Project panel
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir() and (p / "project.json").is_file() or p.name == "project.json":
            project_panel = widgets["Project"]
            project_panel.open_project(p.parent if p.name == "project.json" else p)  # with its first slide and grid
        else:
            try:
                viewer.open(str(p), plugin=PLUGIN)
            except Exception as e:  # noqa: BLE001 - napari wraps reader errors; report the cause in one line
                cause = e.__cause__ if isinstance(e.__cause__, HistoWSSSError) else e
                raise HistoWSSSError(f"{p}: cannot be opened as a slide: {cause}") from e
    return viewer, widgets


def run_gui(args: argparse.Namespace) -> int:
    import napari

    from napari_histo_wsss.core.device import apply_thread_policy

    apply_thread_policy(gui=True)  # leave a core to the viewer (background jobs apply it again in their thread)
    open_gui(args.path)
    napari.run()
    return 0
