"""The backbone registry (core/models/backbones.py ``BACKBONE_REGISTRY``): one list of backbones
with each one's input normalisation and feature channels, used by the factory, the data pipeline,
inference, the widgets and old checkpoints."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.data import datasets
from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models import (
    BACKBONE_REGISTRY,
    BACKBONES,
    DEFAULT_BACKBONE,
    CAMClassifier,
    backbone_spec,
    build_backbone,
    load_model,
    save_model,
)
from napari_histo_wsss.core.models import backbones as bb
from napari_histo_wsss.core.stage2 import infer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(BACKBONE_REGISTRY))
def test_every_registered_backbone_builds_as_registered(name):
    spec = BACKBONE_REGISTRY[name]
    model = build_backbone(name, weights="none", output_stride=16).eval()
    assert model.name == name
    assert tuple(model.channels) == spec.channels
    with torch.no_grad():
        feats = model(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(spec.channels)
    assert [64 // f.shape[-1] for f in feats] == model.strides == [4, 8, 16, 16]


def test_registry_is_the_one_list():
    assert tuple(BACKBONE_REGISTRY) == BACKBONES and DEFAULT_BACKBONE in BACKBONE_REGISTRY
    with pytest.raises(HistoWSSSError, match="unknown backbone 'vgg16'; choose one of efficientnet-lite0"):
        build_backbone("vgg16", weights="none")


def test_normalisation_lives_with_the_models_and_matches_the_data_pipeline():
    """Every backbone records the normalisation it takes; the data pipeline's ``to_tensor`` (one
    for all backbones) and inference's de-normalisation use exactly those constants."""
    for name, spec in BACKBONE_REGISTRY.items():
        assert len(spec.mean) == len(spec.std) == 3, name
        assert all(0 < m < 1 for m in spec.mean) and all(0 < s < 1 for s in spec.std), name
        assert (spec.mean, spec.std) == (bb.IMAGENET_MEAN, bb.IMAGENET_STD), f"{name}: to_tensor would feed it wrongly normalised input"
    assert datasets.IMAGENET_MEAN is bb.IMAGENET_MEAN and datasets.IMAGENET_STD is bb.IMAGENET_STD
    assert infer.IMAGENET_MEAN is bb.IMAGENET_MEAN and infer.IMAGENET_STD is bb.IMAGENET_STD
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    expected = (rgb.transpose(2, 0, 1) / 255.0 - np.array(bb.IMAGENET_MEAN)[:, None, None]) / np.array(bb.IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(datasets.to_tensor(rgb).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_models_do_not_import_the_datasets_module():
    """models/ sits below datasets (datasets imports the normalisation from models), not above it."""
    code = ("import sys, napari_histo_wsss.core.models as m; m.build_backbone('efficientnet-lite0', 'none'); "
            "print('napari_histo_wsss.core.data.datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("spelling", ["EfficientNet_Lite0", " resnet18 "])
def test_checkpoints_recording_a_backbone_name_still_load(tmp_path, spelling):
    """A checkpoint records the backbone name as given (``arch["backbone"]``); older runs and
    configs spell it in any case or with underscores, and it still rebuilds and loads."""
    key, _spec = backbone_spec(spelling)
    classes = get_preset("wsss4luad")
    torch.manual_seed(0)
    model = CAMClassifier(classes.num_classes, spelling, weights="none", output_stride=32).eval()
    assert model.arch["backbone"] == spelling
    save_model(tmp_path / "m.pt", model, {"classes": classes})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta["arch"]["backbone"] == spelling and loaded.backbone.name == key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_training_panel_lists_the_registry(make_napari_viewer):
    """The Training panel's backbone choice offers exactly the registry (taken from core, not a copy)."""
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QComboBox

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-histo-wsss", "Training")
    lists = [[box.itemText(i) for i in range(box.count())] for box in widget.findChildren(QComboBox)]
    backbone_lists = [items for items in lists if DEFAULT_BACKBONE in items]
    assert backbone_lists == [list(BACKBONE_REGISTRY)]
