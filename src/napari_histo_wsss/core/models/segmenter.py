"""Stage two: DeepLabV3+ on the plain-torch backbones.

Atrous spatial pyramid pooling on the last feature map (rates 6/12/18 at output stride 16,
doubled at 8, halved at 32), a decoder that fuses it with the stride-4 features (projected to 48
channels) through two 3x3 convolutions, and logits upsampled to the input size. As in the
DeepLabV3+ paper, the atrous and decoder 3x3 convolutions are depthwise-separable, which keeps
the network light enough for CPUs. The image-pooling branch has no BatchNorm so that training
with batches of one works.

An optional image-level head (``aux_head=True``) gives the class activation map and its
average-pooled logits on the backbone's last features, for HisynSeg's consistency loss
between the segmentation output and the CAM on real unlabelled patches.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models.backbones import DEFAULT_BACKBONE, build_backbone

__all__ = ["Segmenter", "ASPP_RATES"]

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}
_LOW_LEVEL_CHANNELS = 48


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (dilated) + BN + ReLU, then pointwise + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        _conv_bn_relu(cin, cout),
    )


class _ImagePooling(nn.Module):
    """Global context branch of ASPP: average pool, 1x1 conv (+bias, no BN), broadcast back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class _ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout)] + [_separable(cin, cout, r) for r in rates] + [_ImagePooling(cin, cout)])
        self.project = nn.Sequential(_conv_bn_relu(cout * len(self.branches), cout), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class Segmenter(nn.Module):
    """DeepLabV3+ segmenter: ``forward(x)`` -> logits (B, num_classes, H, W) at input size.

    ``forward(x, return_aux=True)`` (needs ``aux_head=True``) -> ``(logits, aux_logits (B, C),
    cam (B, C, h, w))`` with ``cam`` the raw image-level head on the last feature map at the
    output stride (resize it to compare with the logits). ``arch`` holds the constructor
    arguments that rebuild the network (saved in checkpoints).
    """

    kind = "segmenter"

    def __init__(self, num_classes: int, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = "imagenet",
                 output_stride: int = 16, aux_head: bool = False, decoder_channels: int = 256):
        super().__init__()
        if int(num_classes) < 1:
            raise HistoWSSSError(f"a segmenter needs at least one class, got num_classes={num_classes}")
        self.arch = {"num_classes": int(num_classes), "backbone": str(backbone), "output_stride": int(output_stride),
                     "aux_head": bool(aux_head), "decoder_channels": int(decoder_channels)}
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(backbone, weights, output_stride)
        ch = self.backbone.channels
        self.aspp = _ASPP(ch[-1], decoder_channels, ASPP_RATES[int(output_stride)])
        self.low_level = _conv_bn_relu(ch[0], _LOW_LEVEL_CHANNELS)
        self.decoder = nn.Sequential(
            _separable(decoder_channels + _LOW_LEVEL_CHANNELS, decoder_channels),
            _separable(decoder_channels, decoder_channels),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(decoder_channels, self.num_classes, 1)
        self.aux = nn.Conv2d(ch[-1], self.num_classes, 1, bias=False) if aux_head else None

    def forward(self, x: Tensor, return_aux: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        feats = self.backbone(x)
        low = self.low_level(feats[0])
        y = F.interpolate(self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(torch.cat([y, low], dim=1)))
        logits = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not return_aux:
            return logits
        if self.aux is None:
            raise HistoWSSSError("this segmenter was built without the image-level head (aux_head=False)")
        cam = self.aux(feats[-1])
        return logits, cam.mean(dim=(2, 3)), cam
