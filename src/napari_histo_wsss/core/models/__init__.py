"""Networks of napari-histo-wsss: plain-torch backbones (EfficientNet-Lite0/1/2 with the names of
their ImageNet checkpoints, ResNet-18/34/50 with torchvision's names), the stage-one CAM
classifier, the stage-two DeepLabV3+ segmenter and self-describing checkpoints."""

from napari_histo_wsss.core.models.backbones import (
    BACKBONE_REGISTRY,
    BACKBONES,
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    backbone_spec,
    build_backbone,
    load_weights,
    parameter_groups,
)
from napari_histo_wsss.core.models.checkpoint import check_classes, load_checkpoint, load_model, save_model
from napari_histo_wsss.core.models.classifier import (
    CAM_MODES,
    CAMClassifier,
    normalize_cams,
    pda_threshold_at,
    progressive_dropout_attention,
)
from napari_histo_wsss.core.models.segmenter import Segmenter

__all__ = [
    "BACKBONE_REGISTRY",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneSpec",
    "backbone_spec",
    "build_backbone",
    "load_weights",
    "parameter_groups",
    "CAMClassifier",
    "CAM_MODES",
    "normalize_cams",
    "progressive_dropout_attention",
    "pda_threshold_at",
    "Segmenter",
    "save_model",
    "load_model",
    "load_checkpoint",
    "check_classes",
]
