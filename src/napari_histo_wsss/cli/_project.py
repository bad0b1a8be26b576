"""Opening a project from a command that writes into it (``cams``, ``suggest``, ``demo``)."""

from __future__ import annotations

import os
import sys
from typing import Any


def open_project_for_writing(path: str | os.PathLike) -> Any:
    """:meth:`~..core.data.project.Project.open`, with the warning the GUI shows when another
    window has the project open, as one ``warning:`` line on stderr (saves from both merge, but
    that window does not show what this command writes until it reopens the project)."""
    from napari_histo_wsss.core.data.project import Project

    project = Project.open(path)
    if project.open_elsewhere is not None:
        print(f"histo-wsss: warning: {project.open_elsewhere.message(project.root)}", file=sys.stderr, flush=True)
    return project
