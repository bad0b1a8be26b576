"""napari dock widgets of the plugin (contributed in ``napari.yaml``; open them from Plugins > Histo WSSS).

The widgets of one viewer share a :class:`~._state.Session` (project, current slide, patch grid,
background jobs) and otherwise never talk to each other. They are thin: every computation is a
function of ``core/`` run in a background thread; the durable state lives in the project folder.

* :class:`ProjectWidget` - create/open a project, classes, slides, tissue detection and patch grid.
* :class:`LabellingWidget` - select patches on the grid, number keys toggle classes, undo, autosave.
* :class:`TrainingWidget` - train the CAM classifier in the background: progress, ETA, live plot,
  cancel, resume.
* :class:`ReviewWidget` - CAM layers per class, live pseudo-mask thresholds, corrections with
  napari's brush/fill/eraser, corrected flag, reviewed regions, autosave.
* :class:`Stage2Widget` - train the segmenter on (corrected) pseudo-masks, predict the slide.
* :class:`ExportWidget` - export a label layer (OME-Zarr, TIFF, palette PNG, QuPath GeoJSON) and
  per-class IoU against a ground-truth layer or mask file.
"""

from napari_histo_wsss.widgets.export import ExportWidget
from napari_histo_wsss.widgets.labelling import LabellingWidget
from napari_histo_wsss.widgets.project import ProjectWidget
from napari_histo_wsss.widgets.review import ReviewWidget
from napari_histo_wsss.widgets.stage1 import TrainingWidget
from napari_histo_wsss.widgets.stage2 import Stage2Widget

__all__ = ["ProjectWidget", "LabellingWidget", "TrainingWidget", "ReviewWidget", "Stage2Widget", "ExportWidget"]
