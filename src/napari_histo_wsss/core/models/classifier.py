"""Stage one: the multi-label CAM classifier and its activation maps.

``backbone -> 1x1 conv per class (no bias) -> global average pooling -> logits``. Because the
head is linear and has no bias, the class activation map (the head applied at every location)
averages exactly to the logit, which is what makes CAMs faithful. The training loop applies the
multi-label soft-margin loss; this module only computes.

Maps (:meth:`CAMClassifier.cams`), all per-class max-normalised to [0, 1] at input size:
  ``"last"``: ReLU of the head on the last feature map (classic CAM);
  ``"multi"``: the last-stage CAM fused with LayerCAM maps at the stride-16 and stride-8 stages
  (MLPS uses Grad-CAM at three depths; LayerCAM weights each location by its own positive
  gradient, which keeps shallow-layer maps sharp instead of washing them out with one
  channel-wide weight). The separate maps are available from :meth:`CAMClassifier.layer_cams`
  for multi-layer pseudo-supervision.

Training options the loop can switch on:
  Progressive Dropout Attention (MLPS): ``forward(x, pda_threshold=t)`` weights the head's
  input map, before pooling, by a soft attention made of every class's CAM with each class's
  peaks (above ``t`` times its maximum) dropped, so the classifier must find evidence beyond the
  most discriminative spots (``t`` decays over the run, see :func:`pda_threshold_at`);
  a PSCL-style projection head: :meth:`CAMClassifier.embed` maps features to L2-normalised
  embeddings for a supervised contrastive term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models.backbones import DEFAULT_BACKBONE, build_backbone

__all__ = ["CAMClassifier", "normalize_cams", "progressive_dropout_attention", "pda_threshold_at", "CAM_MODES",
           "HEADS"]

CAM_MODES = ("last", "multi")
#: ``"last"``: the head reads the last feature map; ``"fused"``: the last map upsampled to the
#: stride of the third map and concatenated with it (OEEM's stride-16 + stride-32 fusion), so the
#: CAMs are twice as fine as the last map without dilating the backbone.
HEADS = ("last", "fused")
_EPS = 1e-5


def normalize_cams(cams: Tensor) -> Tensor:
    """Per image and class, divide a non-negative (B, C, H, W) map by its maximum, giving values
    in [0, 1] with the peak at exactly 1 (all-zero maps stay zero)."""
    peak = cams.flatten(2).amax(dim=2)[:, :, None, None]
    return cams / peak.clamp_min(_EPS)


def progressive_dropout_attention(features: Tensor, cam: Tensor, threshold: float) -> Tensor:
    """MLPS Progressive Dropout Attention: ``features`` (B, D, h, w) times a soft attention map.

    ``cam`` (B, C, h, w) is the head applied to ``features``. For every class (all of them: MLPS
    does not gate by the labels), the locations of its ReLU'd CAM above ``threshold`` times that
    class's maximum in the image are dropped (set to 0) and the rest keep their CAM value; the
    attention is the sum of these maps over the classes divided by the number of classes
    (``tool/ADL_module.py`` of MLPS). Like MLPS, the attention is not detached: the gradient flows
    through it into the head and the backbone. The attention replaces the features' scale by the
    CAMs' (it is not a 0/1 mask), so it changes the logits at any threshold.
    """
    cams = F.relu(cam)
    peak = cams.flatten(2).amax(dim=2)[:, :, None, None]
    kept = torch.where(cams > peak * threshold, torch.zeros_like(cams), cams)
    attention = kept.sum(dim=1, keepdim=True) / cams.shape[1]
    return features * attention.to(features.dtype)


#: MLPS's schedule (``1_train_stage1.py``: 20 epochs, PDA from the fourth, i.e. ``ep > 2``, the
#: threshold ``gama`` starting at 1 and multiplied by 0.98 after every epoch while above 0.65), in
#: fractions of a run: one MLPS epoch is a twentieth of the run.
PDA_REF_EPOCHS = 20
PDA_START = 3 / PDA_REF_EPOCHS
PDA_FLOOR = 0.65


def pda_threshold_at(progress: float, start: float = PDA_START, decay: float = 0.98, initial: float = 1.0,
                     ref_epochs: int = PDA_REF_EPOCHS, floor: float = PDA_FLOOR) -> float | None:
    """MLPS schedule scaled to a run of any length: ``progress`` is the share of the run done
    (0 at the first step, 1 at the end). PDA is off (``None``) before ``start``; from there the
    threshold is ``initial * decay ** (progress * ref_epochs)``, never below ``floor`` (MLPS: 0.94
    in its fourth of 20 epochs, about 0.67 in its last). It decays per step, smoothly, rather than
    per epoch, so short runs of few epochs follow the same curve."""
    if progress < start:
        return None
    return float(max(floor, initial * decay ** (progress * ref_epochs)))


class CAMClassifier(nn.Module):
    """Multi-label patch classifier whose 1x1 head gives class activation maps.

    ``num_classes``: tissue classes (background excluded); ``backbone``/``weights``/
    ``output_stride``: see :func:`build_backbone`; ``embed_dim``: size of the contrastive
    projection; ``cam_weights``: weights of the (last, stride-16, stride-8) maps in ``"multi"``.
    ``arch`` holds the constructor arguments that rebuild the network (saved in checkpoints).
    """

    kind = "classifier"

    def __init__(self, num_classes: int, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = "imagenet",
                 output_stride: int = 16, embed_dim: int = 128, cam_weights: Sequence[float] = (0.5, 0.25, 0.25),
                 head: str = "last"):
        super().__init__()
        if head not in HEADS:
            raise HistoWSSSError(f"unknown classifier head {head!r}; choose one of {', '.join(HEADS)}")
        if int(num_classes) < 1:
            raise HistoWSSSError(f"a classifier needs at least one class, got num_classes={num_classes}")
        if len(cam_weights) != 3 or min(cam_weights) < 0 or sum(cam_weights) <= 0:
            raise HistoWSSSError(f"cam_weights must be three non-negative weights (last, stride 16, stride 8), got {list(cam_weights)}")
        self.arch = {"num_classes": int(num_classes), "backbone": str(backbone), "output_stride": int(output_stride),
                     "embed_dim": int(embed_dim), "cam_weights": [float(w) for w in cam_weights]}
        if head != "last":  # older checkpoints record no head: they rebuild with the default
            self.arch["head"] = head
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(backbone, weights, output_stride)
        self.fused = head == "fused" and self.backbone.strides[2] < self.backbone.strides[3]
        dim = self.backbone.channels[-1]
        head_dim = dim + (self.backbone.channels[2] if self.fused else 0)
        self.head = nn.Conv2d(head_dim, self.num_classes, 1, bias=False)
        # names of the modules kept in eval mode while training (freeze()): names, not the modules,
        # because data-parallel training swaps batch norms for synchronised ones in place
        self._frozen: list[str] = []
        nn.init.xavier_uniform_(self.head.weight)
        hidden = min(dim, 512)
        self.projector = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, int(embed_dim), 1))

    # -- freezing (training of small label sets) -----------------------------------------------
    def freeze(self, batchnorm: bool = False, stages: int = 0) -> None:
        """Freeze for training: ``stages`` (0-3) first backbone stages get no gradient (their
        backward pass is skipped, so steps are cheaper) and, with ``batchnorm``, every BatchNorm
        of the backbone keeps its ImageNet statistics and affine parameters (eval mode and no
        gradient, also after ``train()``): a batch of 16 patches of one slide estimates them
        badly."""
        if not 0 <= int(stages) <= 3:
            raise HistoWSSSError(f"frozen stages must be 0 to 3, got {stages}")
        frozen: list[nn.Module] = []
        for m in _early_modules(self.backbone, int(stages)):
            for p in m.parameters():
                p.requires_grad_(False)
            frozen.append(m)
        if batchnorm:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)
                    frozen.append(m)
        ids = {id(m) for m in frozen}
        self._frozen = [name for name, m in self.named_modules() if id(m) in ids]
        self.train(self.training)

    def train(self, mode: bool = True) -> CAMClassifier:
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        return self

    def head_input(self, feats: Sequence[Tensor]) -> Tensor:
        """The map the 1x1 head reads: the last feature map, or (fused head) the last map
        upsampled bilinearly to the third map's size and concatenated with it."""
        if not self.fused:
            return feats[-1]
        low = feats[2]
        up = F.interpolate(feats[-1], size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([up, low], dim=1)

    # -- training-time computation ---------------------------------------------------------
    def forward_features(self, x: Tensor, pda_threshold: float | None = None, embed: bool = False) -> dict:
        """One pass: ``logits`` (B, C), ``cam`` (B, C, h, w) = head on its input map (raw,
        before ReLU), ``features`` (the backbone's four maps). With ``pda_threshold`` the logits
        come from the head's input map weighted by :func:`progressive_dropout_attention` (``cam``
        does not).
        ``embed=True`` adds ``embedding`` (:meth:`embed` of the last map) computed in the same
        call, so that data-parallel training synchronises the projector's gradients too."""
        feats = self.backbone(x)
        fmap = self.head_input(feats)
        cam = self.head(fmap)
        if pda_threshold is None:
            logits = cam.mean(dim=(2, 3))
        else:
            erased = progressive_dropout_attention(fmap, cam, pda_threshold)
            logits = self.head(erased.mean(dim=(2, 3), keepdim=True)).flatten(1)
        out = {"logits": logits, "cam": cam, "features": feats}
        if embed:
            out["embedding"] = self.embed(feats)
        return out

    def forward(self, x: Tensor, pda_threshold: float | None = None) -> Tensor:
        """Logits (B, C) for the multi-label soft-margin loss."""
        return self.forward_features(x, pda_threshold)["logits"]

    def embed(self, features: Tensor | Sequence[Tensor]) -> Tensor:
        """Projection for a supervised contrastive (PSCL) term: the last feature map (or a map
        given directly) -> (B, embed_dim, h, w), L2-normalised along the channel axis."""
        fmap = features[-1] if isinstance(features, (list, tuple)) else features
        return F.normalize(self.projector(fmap), dim=1)

    # -- activation maps ----------------------------------------------------------------------
    def cams(self, x: Tensor, mode: str = "multi", weights: Sequence[float] | None = None) -> Tensor:
        """Class activation maps (B, C, H, W) in [0, 1] at the input size, each per-class
        max-normalised. Call in eval mode (BatchNorm statistics would otherwise change).
        ``weights`` overrides ``arch["cam_weights"]`` for ``"multi"``."""
        if mode not in CAM_MODES:
            raise HistoWSSSError(f"unknown CAM mode {mode!r}; choose one of {', '.join(CAM_MODES)}")
        if mode == "last":
            with torch.no_grad():
                cam = F.relu(self.forward_features(x)["cam"].float())
                return normalize_cams(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
        w = list(weights) if weights is not None else self.arch["cam_weights"]
        if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
            raise HistoWSSSError(f"CAM weights must be three non-negative numbers, got {w}")
        maps = self.layer_cams(x)
        fused = sum(wi * m for wi, m in zip(w, maps) if wi > 0)
        return normalize_cams(fused)

    def layer_cams(self, x: Tensor) -> list[Tensor]:
        """The maps fused by ``cams(x, "multi")``, each (B, C, H, W) in [0, 1] at input size:
        ``[last-stage CAM, LayerCAM at the stride-16 stage, LayerCAM at the stride-8 stage]``.

        Gradients are taken with :func:`torch.autograd.grad` with respect to the feature maps
        only, so no parameter ``.grad`` is touched; works under ``torch.no_grad`` and
        ``torch.inference_mode`` callers too.
        """
        size = x.shape[-2:]
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone()  # a normal tensor even if the caller made it in inference mode
            feats = self.backbone(x)
            targets = [feats[2], feats[1]]
            cam = self.head(self.head_input(feats))
            logits = cam.mean(dim=(2, 3))
            per_layer: list[list[Tensor]] = [[] for _ in targets]
            for c in range(self.num_classes):
                grads = torch.autograd.grad(logits[:, c].sum(), targets, retain_graph=c < self.num_classes - 1)
                for acc, act, g in zip(per_layer, targets, grads):
                    acc.append(F.relu((F.relu(g) * act).sum(dim=1)).detach())
        out = [F.relu(cam.detach().float())] + [torch.stack(acc, dim=1).float() for acc in per_layer]
        return [normalize_cams(F.interpolate(m, size=size, mode="bilinear", align_corners=False)) for m in out]


def _early_modules(backbone: nn.Module, stages: int) -> list[nn.Module]:
    """The modules of a backbone that compute its first ``stages`` feature maps (stem included)."""
    if stages == 0:
        return []
    if hasattr(backbone, "_blocks") and hasattr(backbone, "_taps"):  # EfficientNet-Lite
        last = backbone._taps[stages - 1]
        return [backbone._conv_stem, backbone._bn0, *list(backbone._blocks)[: last + 1]]
    if hasattr(backbone, "layer1"):  # ResNet
        return [backbone.conv1, backbone.bn1, *[getattr(backbone, f"layer{i}") for i in range(1, stages + 1)]]
    raise HistoWSSSError(f"freezing stages is not supported for the backbone {getattr(backbone, 'name', backbone)!r}")
