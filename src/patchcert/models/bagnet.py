"""BagNets (Brendel & Bethge, ICLR 2019): ResNet-50 with small receptive fields.

The ResNet-50 layout (bottleneck blocks, stages of 3/4/6/3 blocks, widths 64..512 x 4)
where most 3x3 convolutions are replaced by 1x1 ones and the remaining 3x3s have **no
padding**. Only the first block of a stage may keep its 3x3 convolution; the stage
strides are 2/2/2/1, so the feature stride is 8 and the receptive field is

* BagNet-9: 3x3 in stages 1-2 (plus the stem 3x3)            -> 9 px,
* BagNet-17: 3x3 in stages 1-3                               -> 17 px,
* BagNet-33: 3x3 in stages 1-4                               -> 33 px.

Without padding, an ``n x n`` image gives a ``floor((n - r) / 8) + 1`` square map
(224 px: 27 / 26 / 24 for BagNet-9 / 17 / 33), cell ``i`` seeing pixels
``[8 i, 8 i + r - 1]`` (offset 0). In a block whose 3x3 shrinks the map, the shortcut
is cropped to the main path's size keeping its top-left part (what the reference does),
so the shortcut of cell ``i`` reads a pixel inside the main path's field.

Parameter names follow the public reference implementation (``conv1``, ``conv2``,
``bn1``, ``layer1`` .. ``layer4`` of bottlenecks with ``conv1/bn1/conv2/bn2/conv3/bn3``
and ``downsample``, ``fc``), so the published ImageNet weights (``bagnet8/16/32`` there,
named after ``r - 1``) import with ``patchcert convert``. The score map applies ``fc`` at
every location (a 1x1 convolution with fc's weights); its spatial mean equals
``fc(avgpool(features))``, the BagNet's ordinary logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PatchcertError
from .base import IMAGENET_MEAN, IMAGENET_STD, ScoreMapModel, trace_geometry
from .registry import register_model

__all__ = ["Bottleneck", "BagNet", "BAGNET_KERNEL3", "bagnet9", "bagnet17", "bagnet33"]

#: number of leading blocks per stage that keep a 3x3 convolution (0 or 1 in the BagNets)
BAGNET_KERNEL3: dict[str, tuple[int, int, int, int]] = {
    "bagnet9": (1, 1, 0, 0),
    "bagnet17": (1, 1, 1, 0),
    "bagnet33": (1, 1, 1, 1),
}
_STAGE_BLOCKS = (3, 4, 6, 3)
_STAGE_STRIDES = (2, 2, 2, 1)


class Bottleneck(nn.Module):
    """1x1 -> kxk (stride, no padding) -> 1x1 (x4 channels), plus a shortcut.

    Input ``[N, cin, h, w]`` -> ``[N, 4 planes, h', w']`` with ``h' = (h - k) // stride + 1``.
    The shortcut (identity or ``downsample`` = strided 1x1 conv + BN) is cropped to
    ``h' x w'`` from the top-left.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, kernel: int = 1, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel, stride=stride, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = x if self.downsample is None else self.downsample(x)
        short = short[..., : out.shape[-2], : out.shape[-1]]
        return self.relu(out + short)


class BagNet(ScoreMapModel):
    """BagNet region scorer: images ``[N, 3, H, W]`` in [0, 1] -> ``[N, K, h, w]`` logits.

    ``kernel3[i]`` leading blocks of stage ``i`` use a 3x3 convolution; ``width`` scales
    every channel count (64 = the published models; smaller widths for tests).
    """

    def __init__(self, kernel3: Sequence[int], num_classes: int, width: int, arch: str, config: dict,
                 blocks: Sequence[int] = _STAGE_BLOCKS, strides: Sequence[int] = _STAGE_STRIDES) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.arch, self.config, self.num_classes = arch, dict(config), num_classes
        self.conv1 = nn.Conv2d(3, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=0.001)  # as the reference (matters only when training)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        stages = []
        for i, (n, s, k3) in enumerate(zip(blocks, strides, kernel3)):
            planes = width * (2 ** i)
            stage, inplanes = self._make_stage(inplanes, planes, n, s, k3)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.geometry = trace_geometry(self.traced_layers(), input_size=None)

    @staticmethod
    def _make_stage(inplanes: int, planes: int, n: int, stride: int, kernel3: int) -> tuple[nn.Sequential, int]:
        out = planes * Bottleneck.expansion
        down = None
        if stride != 1 or inplanes != out:
            down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        blocks = [Bottleneck(inplanes, planes, 3 if kernel3 > 0 else 1, stride, down)]
        blocks += [Bottleneck(out, planes, 3 if j < kernel3 else 1) for j in range(1, n)]
        return nn.Sequential(*blocks), out

    def traced_layers(self) -> list[tuple[int, int, int]]:
        """``(kernel, stride, padding)`` of the main path, read off the built convolutions."""
        convs = [self.conv1, self.conv2]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                convs += [blk.conv1, blk.conv2, blk.conv3]
        out = []
        for c in convs:
            kh, kw = c.kernel_size
            sh, sw = c.stride
            ph, pw = c.padding  # type: ignore[misc]
            assert kh == kw and sh == sw and ph == pw, "BagNet convolutions are square"
            out.append((kh, sh, ph))
        return out

    @property
    def min_input_size(self) -> int:
        """Smallest image side that yields a non-empty map (= the receptive field)."""
        return int(self.geometry.rf[0])  # type: ignore[arg-type]

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        m = self.min_input_size
        if x.shape[-2] < m or x.shape[-1] < m:
            raise PatchcertError(f"{self.arch}: images must be at least {m}x{m}, got {x.shape[-2]}x{x.shape[-1]}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[N, 3, H, W]`` -> features ``[N, 32 width, h, w]``."""
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Features ``[N, C, h, w]`` -> per-location logits ``[N, K, h, w]`` (fc as a 1x1 conv)."""
        return F.conv2d(f, self.fc.weight[:, :, None, None], self.fc.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The BagNet's ordinary logits ``[N, K]`` (average pool + fc = mean of the score map)."""
        return self.score_map(x).mean(dim=(2, 3))


def _build(name: str, num_classes: int, width: int) -> BagNet:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise PatchcertError(f"{name}: width must be a positive int, got {width!r}")
    return BagNet(BAGNET_KERNEL3[name], num_classes, width, name, {"width": width})


@register_model
def bagnet9(num_classes: int = 1000, width: int = 64) -> BagNet:
    """BagNet-9 (Brendel & Bethge): ResNet-50 bottlenecks, RF 9, stride 8; 224 px -> 27x27 map."""
    return _build("bagnet9", num_classes, width)


@register_model
def bagnet17(num_classes: int = 1000, width: int = 64) -> BagNet:
    """BagNet-17 (Brendel & Bethge; PatchGuard's BagNet): RF 17, stride 8; 224 px -> 26x26 map."""
    return _build("bagnet17", num_classes, width)


@register_model
def bagnet33(num_classes: int = 1000, width: int = 64) -> BagNet:
    """BagNet-33 (Brendel & Bethge): ResNet-50 bottlenecks, RF 33, stride 8; 224 px -> 24x24 map."""
    return _build("bagnet33", num_classes, width)
