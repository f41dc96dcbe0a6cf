"""A fast global-receptive-field CIFAR classifier for model-agnostic defenses (double masking).

``fastnet_cifar`` follows the layout of the fast-CIFAR-training line of work (Page's
ResNet-9 for DAWNBench, Keller Jordan's airbench): a 3x3 stem, three conv groups
(conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU) at widths
``widths`` (default 64/256/256), a global max-pool and a linear head scaled by
``head_scale``. Like every patchcert model it takes images in [0, 1] and normalises
inside; its score map is ``[N, K, 1, 1]`` (global geometry), so score-map defenses
certify nothing with it, and double masking (:mod:`patchcert.defenses.double_masking`)
is the defense it is made for.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..geometry import Geometry
from .base import CIFAR10_MEAN, CIFAR10_STD, ScoreMapModel
from .registry import register_model

__all__ = ["FastNet", "fastnet_cifar"]


class _ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
        )


class FastNet(ScoreMapModel):
    """Stem + three conv groups + global max-pool + scaled linear head -> ``[N, K, 1, 1]``."""

    def __init__(self, widths: Sequence[int], stem: int, num_classes: int, head_scale: float, config: dict) -> None:
        super().__init__(CIFAR10_MEAN, CIFAR10_STD)
        self.arch, self.config, self.num_classes = "fastnet_cifar", dict(config), num_classes
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.GELU())
        groups, cin = [], stem
        for w in widths:
            groups.append(_ConvGroup(cin, w))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        self.head_scale = float(head_scale)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.geometry = Geometry(rf=(None, None), stride=(1, 1), offset=(0, 0), wrap=False, input_size=None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.groups(self.stem(x)), dim=(2, 3), keepdim=True)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return (self.fc(f.flatten(1)) * self.head_scale)[:, :, None, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits ``[N, K]``."""
        return self.score_map(x).flatten(1)


@register_model
def fastnet_cifar(num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), stem: int = 32,
                  head_scale: float = 1 / 9) -> FastNet:
    """Fast CIFAR classifier (ResNet-9 / airbench layout, global max-pool); double masking's base model."""
    ws = list(widths) if isinstance(widths, (list, tuple)) else widths
    if not isinstance(ws, list) or not ws or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 8192
                                                  for w in ws):
        raise PatchcertError(f"fastnet_cifar: widths must be a non-empty list of ints in [1, 8192], got {widths!r}")
    if isinstance(stem, bool) or not isinstance(stem, int) or not 1 <= stem <= 8192:
        raise PatchcertError(f"fastnet_cifar: stem must be an int in [1, 8192], got {stem!r}")
    if isinstance(head_scale, bool) or not isinstance(head_scale, (int, float)) or not head_scale > 0:
        raise PatchcertError(f"fastnet_cifar: head_scale must be a positive number, got {head_scale!r}")
    cfg = {"widths": ws, "stem": stem, "head_scale": float(head_scale)}
    return FastNet(ws, stem, num_classes, float(head_scale), cfg)
