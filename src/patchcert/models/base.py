"""Base class of every region scorer: images in [0, 1] -> score map ``[N, K, h, w]``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..geometry import Geometry

__all__ = ["ScoreMapModel", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "trace_geometry",
           "check_pixel_range"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def trace_geometry(
    layers: Sequence[tuple[int, int, int]],
    input_size: tuple[int, int] | None = None,
    wrap: bool = False,
) -> Geometry:
    """Geometry of a chain of convolutions given as ``(kernel, stride, padding)``.

    Cell ``i`` of the output sees input pixels ``[i*S - O, i*S - O + R - 1]`` with
    ``R = 1 + sum (k-1) J``, ``S = prod s`` and ``O = sum p J`` (``J`` the product of the
    strides before the layer). Residual shortcuts must lie inside the main path's field.
    """
    r, j, o = 1, 1, 0
    for k, s, p in layers:
        r += (k - 1) * j
        o += p * j
        j *= s
    return Geometry(rf=(r, r), stride=(j, j), offset=(o, o), wrap=wrap, input_size=input_size)


def check_pixel_range(x: torch.Tensor, what: str) -> None:
    """Refuse images that are not float in [0, 1] (uint8, or floats in 0..255), naming the fix."""
    if not x.is_floating_point():
        raise PatchcertError(f"{what}: images are {str(x.dtype).replace('torch.', '')}; models take float images in "
                             "[0, 1]: convert with x.float() / 255 (patchcert.data.to_float)")
    if x.numel() and not x.requires_grad and x.device.type != "meta":
        lo, hi = torch.aminmax(x.detach())
        lo_f, hi_f = float(lo), float(hi)
        if not (lo_f >= 0.0 and hi_f <= 1.0):  # NaN fails too
            fix = "divide by 255" if hi_f > 1.0 and hi_f <= 255.0 and lo_f >= 0.0 else "clamp or rescale them"
            raise PatchcertError(f"{what}: images must be float in [0, 1], got values in [{lo_f:.4g}, {hi_f:.4g}]; "
                                 f"{fix}")


class ScoreMapModel(nn.Module):
    """A small-receptive-field classifier that exposes its score map.

    Subclasses implement ``forward_features`` (normalised images -> features) and
    ``forward_head`` (features -> ``[N, K, h, w]`` scores), and set ``geometry``,
    ``num_classes``, ``arch`` and ``config`` (the factory kwargs, for checkpoints).
    """

    geometry: Geometry
    num_classes: int
    arch: str
    config: dict[str, Any]

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    # -- input checking --------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PatchcertError(f"{self.arch}: expected images [N, C, H, W], got {shape}")
        check_pixel_range(x, self.arch)
        if x.shape[1] != self.mean.shape[1]:
            raise PatchcertError(f"{self.arch}: expected {self.mean.shape[1]} channels, got {x.shape[1]}")
        exp = self.geometry.input_size
        if exp is not None and tuple(x.shape[-2:]) != tuple(exp):
            raise PatchcertError(
                f"{self.arch}: expected {exp[0]}x{exp[1]} images, got {x.shape[-2]}x{x.shape[-1]}"
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    # -- the pipeline ----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``[N, C, H, W]`` -> score map ``[N, K, h, w]``."""
        self.check_input(x)
        return self.forward_head(self.forward_features(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_map(x)

    def map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Score-map size for an image size, by a dry run on the meta device."""
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                dev = next(self.parameters()).device
            except StopIteration:
                dev = torch.device("cpu")
            out = self.score_map(torch.zeros(1, self.mean.shape[1], *image_size, device=dev))
            self.train(was)
        return (out.shape[-2], out.shape[-1])
