"""ResNet-18/34/50 in plain torch with torchvision's parameter names.

Names (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``) match torchvision, so its ImageNet
checkpoints and most pathology checkpoints published for torchvision ResNets (self-supervised
or supervised, often wrapped as ``module.``/``backbone.``) load with strict key matching.
``"imagenet"`` downloads torchvision's official IMAGENET1K_V1 files once into the torch hub
cache. Output stride 16/8 replaces the stride of ``layer4``/``layer3`` by dilation, as
torchvision's ``replace_stride_with_dilation`` does (also for the basic blocks of 18/34).
"""

from __future__ import annotations

from torch import Tensor, nn

from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.models.backbones import Backbone, state_dict_from_url

__all__ = ["ResNet", "RESNET_URLS"]

# torchvision's IMAGENET1K_V1 weights; the 8 hex digits are the start of the file's SHA-256.
RESNET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
_LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """ResNet-18/34/50 backbone returning ``layer1..layer4`` outputs (strides 4, 8, 16, os)."""

    classifier_prefixes = ("fc.",)

    def __init__(self, name: str = "resnet18", output_stride: int = 32):
        super().__init__()
        if name not in _LAYOUT:
            raise HistoWSSSError(f"unknown ResNet {name!r}; choose one of {', '.join(_LAYOUT)}")
        if output_stride not in (8, 16, 32):
            raise HistoWSSSError(f"output stride must be 8, 16 or 32, got {output_stride!r}")
        kind, depths = _LAYOUT[name]
        block = _BasicBlock if kind == "basic" else _Bottleneck
        self.name = name
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin, self._stride, self._dilation = 64, 4, 1
        self.channels, self.strides = [], []
        self.layer1 = self._make_layer(block, 64, depths[0], 1)
        self.layer2 = self._make_layer(block, 128, depths[1], 2)
        self.layer3 = self._make_layer(block, 256, depths[2], 2)
        self.layer4 = self._make_layer(block, 512, depths[3], 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: blocks start as identities (Goyal et al.),
        # which trains better from scratch; pretrained weights overwrite it.
        for m in self.modules():
            if isinstance(m, _Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, _BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[_BasicBlock] | type[_Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        previous_dilation = self._dilation
        if stride > 1 and self._stride * stride > self.output_stride:
            self._dilation *= stride
            stride = 1
        else:
            self._stride *= stride
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or self._cin != cout:
            downsample = nn.Sequential(nn.Conv2d(self._cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        layers = [block(self._cin, planes, stride, previous_dilation, downsample)]
        self._cin = cout
        layers += [block(cout, planes, 1, self._dilation, None) for _ in range(1, blocks)]
        self.channels.append(cout)
        self.strides.append(self._stride)
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        return state_dict_from_url(RESNET_URLS[self.name], check_hash=True)
