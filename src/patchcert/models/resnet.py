"""Standard (global-receptive-field) ResNet backbones.

They are ordinary classifiers: global average pooling, one logit vector per image, so
their score map is ``[N, K, 1, 1]`` and their geometry is global on both axes (a patch
anywhere touches the single cell). Their use here is as De-randomized smoothing's base
classifier (``in_chans=6`` for the ablation encoding, see :mod:`patchcert.models.ds`)
and as undefended baselines.

* ``resnet18_cifar``: the usual CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, basic
  blocks 2/2/2/2, widths 64/128/256/512 x ``width/64``).
* ``resnet18``: the ImageNet ResNet-18 layout (7x7 stride-2 stem + max-pool).
* ``resnet_small``: He et al.'s CIFAR ResNet-(6n+2) (three stages of ``blocks`` basic
  blocks, widths ``width`` x 1/2/4). At 32 px with 6 input channels ``width=16, blocks=1``
  costs 12.9M multiply-adds against ResNet-18's 557M (1/43), so DS, which runs the base
  once per band (32 times per CIFAR image for columns), is affordable on a CPU; for
  compute matched to ``bagcert_cifar`` width 64 (137M per image) take ``width`` ~9.
  ``stem="imagenet"`` for 224 px inputs.

Normalisation (inside the model, inputs in [0, 1]): ``norm="auto"`` uses the CIFAR-10
statistics for a CIFAR stem and ImageNet's for an ImageNet stem when ``in_chans == 3``,
and maps every channel from [0, 1] to [-1, 1] otherwise (DS's encoded inputs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..geometry import Geometry
from .base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ScoreMapModel
from .registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18_cifar", "resnet18", "resnet_small"]

NORMS = ("auto", "cifar10", "imagenet", "half", "none")
STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _norm_stats(norm: str, stem: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if norm == "auto":
        norm = ("cifar10" if stem == "cifar" else "imagenet") if in_chans == 3 else "half"
    if norm in ("cifar10", "imagenet"):
        if in_chans != 3:
            raise PatchcertError(f"norm={norm!r} is for 3-channel images, the model takes {in_chans}")
        return (CIFAR10_MEAN, CIFAR10_STD) if norm == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)
    if norm == "half":
        return (0.5,) * in_chans, (0.5,) * in_chans
    return (0.0,) * in_chans, (1.0,) * in_chans


class ResNet(ScoreMapModel):
    """Stem + stages of basic blocks + global average pooling + fc.

    Images ``[N, in_chans, H, W]`` in [0, 1] -> score map ``[N, K, 1, 1]`` (the logits).
    """

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], strides: Sequence[int], *,
                 num_classes: int, in_chans: int, stem: str, norm: str, arch: str, config: dict) -> None:
        mean, std = _norm_stats(norm, stem, in_chans)
        super().__init__(mean, std)
        self.arch, self.config, self.num_classes, self.in_chans = arch, dict(config), num_classes, in_chans
        w0 = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w0, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        layers: list[nn.Module] = []
        cin = w0
        for n, w, s in zip(blocks, widths, strides):
            for j in range(n):
                layers.append(BasicBlock(cin, w, s if j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.geometry = Geometry(rf=(None, None), stride=(1, 1), offset=(0, 0), wrap=False, input_size=None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> pooled features ``[N, C, 1, 1]``."""
        return self.layers(self.stem(x)).mean(dim=(2, 3), keepdim=True)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, C, 1, 1]`` -> logits as a map ``[N, K, 1, 1]``."""
        return self.fc(f.flatten(1))[:, :, None, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits ``[N, K]``."""
        return self.score_map(x).flatten(1)


def _check(name: str, in_chans: int, width: int, stem: str, norm: str, blocks: int = 1) -> None:
    for key, v in (("in_chans", in_chans), ("width", width), ("blocks", blocks)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PatchcertError(f"{name}: {key} must be a positive int, got {v!r}")
    if stem not in STEMS:
        raise PatchcertError(f"{name}: stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if norm not in NORMS:
        raise PatchcertError(f"{name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3, width: int = 64, norm: str = "auto") -> ResNet:
    """CIFAR ResNet-18 (3x3 stem, global pooling); DS's CIFAR base classifier (in_chans=6)."""
    _check("resnet18_cifar", in_chans, width, "cifar", norm)
    cfg = {"in_chans": in_chans, "width": width, "norm": norm}
    return ResNet((2, 2, 2, 2), tuple(width * m for m in (1, 2, 4, 8)), (1, 2, 2, 2), num_classes=num_classes,
                  in_chans=in_chans, stem="cifar", norm=norm, arch="resnet18_cifar", config=cfg)


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, width: int = 64, norm: str = "auto") -> ResNet:
    """ImageNet ResNet-18 (7x7/2 stem + max-pool, global pooling); base classifier for 224 px DS."""
    _check("resnet18", in_chans, width, "imagenet", norm)
    cfg = {"in_chans": in_chans, "width": width, "norm": norm}
    return ResNet((2, 2, 2, 2), tuple(width * m for m in (1, 2, 4, 8)), (1, 2, 2, 2), num_classes=num_classes,
                  in_chans=in_chans, stem="imagenet", norm=norm, arch="resnet18", config=cfg)


@register_model
def resnet_small(num_classes: int = 10, in_chans: int = 3, width: int = 16, blocks: int = 1,
                 stem: str = "cifar", norm: str = "auto") -> ResNet:
    """Small CIFAR ResNet-(6*blocks+2) (widths width x 1/2/4, global pooling): a cheap DS base."""
    _check("resnet_small", in_chans, width, stem, norm, blocks)
    cfg = {"in_chans": in_chans, "width": width, "blocks": blocks, "stem": stem, "norm": norm}
    return ResNet((blocks,) * 3, (width, 2 * width, 4 * width), (1, 2, 2), num_classes=num_classes,
                  in_chans=in_chans, stem=stem, norm=norm, arch="resnet_small", config=cfg)
