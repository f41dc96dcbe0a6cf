"""BagCert region scorers (Metzen & Yatsura, ICLR 2021, Appendix A.1).

A 3x3 stem and 8 residual blocks, each of kernel size 1 or 3 (the paper's tables choose
the receptive field), no global pooling, and a 1x1 convolution to K class scores at
every location. With ``shake=True`` every block has two residual paths combined by
batch-wise shake-shake; in kernel-3 blocks one path is 3x3-then-1x1 and the other
1x1-then-3x3 (same receptive field, more diverse paths).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import PatchcertError
from .base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ScoreMapModel, trace_geometry
from .registry import register_model

__all__ = ["BagCertNet", "CIFAR_KERNELS", "CIFAR_S2_KERNELS", "IMAGENET_KERNELS", "bagcert_cifar", "bagcert_cifar_s2",
           "bagcert_imagenet"]

# receptive field -> kernel sizes of (stem, b1..b8)
CIFAR_KERNELS: dict[int, tuple[int, ...]] = {
    5: (3, 3, 1, 1, 1, 1, 1, 1, 1),
    7: (3, 3, 1, 3, 1, 1, 1, 1, 1),
    9: (3, 3, 1, 3, 1, 3, 1, 1, 1),
    11: (3, 3, 1, 3, 1, 3, 1, 3, 1),
    13: (3, 3, 3, 3, 1, 3, 1, 3, 1),
}
# stride-2 CIFAR nets: a 2x2 stride-2 stem (RF 2, a 16x16 map), then 3x3 blocks add 4 pixels each
CIFAR_S2_KERNELS: dict[int, tuple[int, ...]] = {
    6: (2, 3, 1, 1, 1, 1, 1, 1, 1),
    10: (2, 3, 1, 3, 1, 1, 1, 1, 1),
    14: (2, 3, 1, 3, 1, 3, 1, 1, 1),
}
IMAGENET_KERNELS: dict[int, tuple[int, ...]] = {
    17: (3, 3, 1, 3, 1, 3, 1, 1, 1),
    25: (3, 3, 1, 3, 1, 3, 1, 3, 1),
    29: (3, 3, 3, 3, 1, 3, 1, 3, 1),
}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    # "same" padding for odd kernels; none for even ones (a 2x2 stride-2 stem tiles the image)
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False), nn.BatchNorm2d(cout)]


def _path(cin: int, cout: int, k1: int, k2: int, stride: int) -> nn.Sequential:
    # the stride sits on the 3x3 convolution (on the first conv if both are 1x1)
    s1, s2 = (stride, 1) if (k1 >= k2) else (1, stride)
    return nn.Sequential(*_conv_bn(cin, cout, k1, s1), nn.ReLU(inplace=True), *_conv_bn(cout, cout, k2, s2))


class _ShakeShake(torch.autograd.Function):
    """Batch-wise shake-shake: forward mixes with alpha, backward with an independent beta."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(beta)
        return alpha * a + (1 - alpha) * b

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (beta,) = ctx.saved_tensors
        return beta * g, (1 - beta) * g, None, None


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, shake: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.shake = kernel, stride, shake
        self.path1 = _path(cin, cout, kernel, 1, stride)
        self.path2 = _path(cin, cout, 1, kernel, stride) if shake else None
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.path1(x)
        if self.path2 is not None:
            r2 = self.path2(x)
            if self.training:
                alpha = torch.rand((), device=x.device, dtype=r.dtype)
                beta = torch.rand((), device=x.device, dtype=r.dtype)
                r = _ShakeShake.apply(r, r2, alpha, beta)
            else:
                r = 0.5 * (r + r2)
        return self.relu(self.shortcut(x) + r)


class BagCertNet(ScoreMapModel):
    """Stem + 8 residual blocks + 1x1 head; no pooling. Output ``[N, K, h, w]``."""

    def __init__(
        self,
        kernels: tuple[int, ...],
        widths: tuple[int, ...],
        strides: tuple[int, ...],
        num_classes: int,
        shake: bool,
        mean,
        std,
        input_size: tuple[int, int] | None,
        arch: str,
        config: dict,
        in_chans: int = 3,
    ) -> None:
        super().__init__(mean, std)
        assert len(kernels) == 9 and len(widths) == 9 and len(strides) == 9
        self.arch, self.config, self.num_classes = arch, dict(config), num_classes
        self.stem = nn.Sequential(*_conv_bn(in_chans, widths[0], kernels[0], strides[0]), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            *[Block(widths[i - 1], widths[i], kernels[i], strides[i], shake) for i in range(1, 9)]
        )
        self.head = nn.Conv2d(widths[-1], num_classes, 1)
        layers = [(k, s, (k - 1) // 2) for k, s in zip(kernels, strides)]
        self.geometry = trace_geometry(layers, input_size=input_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)


def _norm(in_chans: int, mean, std):
    """Dataset statistics for RGB input; [0, 1] -> [-1, 1] for other channel counts (e.g. DS's 6)."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise PatchcertError(f"in_chans must be a positive int, got {in_chans!r}")
    return (mean, std) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)


def _cifar_net(arch: str, table: dict[int, tuple[int, ...]], strides: tuple[int, ...], num_classes: int, rf: int,
               width: int, shake: bool, in_chans: int) -> BagCertNet:
    """A CIFAR net of constant ``width`` whose kernels ``table[rf]`` chooses (options validated here)."""
    if rf not in table:
        raise PatchcertError(f"{arch}: rf must be one of {sorted(table)}, got {rf!r}")
    if not isinstance(width, int) or width < 1:
        raise PatchcertError(f"{arch}: width must be a positive int, got {width!r}")
    cfg = {"rf": rf, "width": width, "shake": bool(shake)}
    if in_chans != 3:
        cfg["in_chans"] = in_chans
    mean, std = _norm(in_chans, CIFAR10_MEAN, CIFAR10_STD)
    return BagCertNet(table[rf], (width,) * 9, strides, num_classes, bool(shake), mean, std, (32, 32), arch, cfg,
                      in_chans)


@register_model
def bagcert_cifar(num_classes: int = 10, rf: int = 7, width: int = 64, shake: bool = False,
                  in_chans: int = 3) -> BagCertNet:
    """BagCert CIFAR-10 net (32x32 in, 32x32 map, stride 1). Paper: width 768, shake-shake."""
    return _cifar_net("bagcert_cifar", CIFAR_KERNELS, (1,) * 9, num_classes, rf, width, shake, in_chans)


@register_model
def bagcert_cifar_s2(num_classes: int = 10, rf: int = 6, width: int = 128, shake: bool = False,
                     in_chans: int = 3) -> BagCertNet:
    """Stride-2 BagCert-style CIFAR net (32x32 in, 16x16 map): a 2x2 stride-2 stem, then the
    8 residual blocks at stride 1 on the coarse grid (RF 6: one 3x3 block, seven 1x1 blocks).

    About 4-5x fewer FLOPs per image than :func:`bagcert_cifar` at the same width, and a
    5x5 patch touches at most 5x5 of its 256 cells (9.8%) against 11x11 of 1024 (11.8%) for RF 7.
    Not in the paper: patchcert's CPU-budget variant (issue 9).
    """
    return _cifar_net("bagcert_cifar_s2", CIFAR_S2_KERNELS, (2,) + (1,) * 8, num_classes, rf, width, shake, in_chans)


@register_model
def bagcert_imagenet(num_classes: int = 1000, rf: int = 17, width: int = 64, shake: bool = False,
                     in_chans: int = 3) -> BagCertNet:
    """BagCert ImageNet net (224 in, stride 2 in blocks 1 and 3 -> 56x56 map).

    Widths are ``width`` x (1, 1, 1, 2, 2, 4, 4, 8, 8) (the paper: width=64).
    """
    if rf not in IMAGENET_KERNELS:
        raise PatchcertError(f"bagcert_imagenet: rf must be one of {sorted(IMAGENET_KERNELS)}, got {rf!r}")
    if not isinstance(width, int) or width < 1:
        raise PatchcertError(f"bagcert_imagenet: width must be a positive int, got {width!r}")
    cfg = {"rf": rf, "width": width, "shake": bool(shake)}
    if in_chans != 3:
        cfg["in_chans"] = in_chans
    mean, std = _norm(in_chans, IMAGENET_MEAN, IMAGENET_STD)
    mult = (1, 1, 1, 2, 2, 4, 4, 8, 8)
    strides = (1, 2, 1, 2, 1, 1, 1, 1, 1)
    return BagCertNet(
        IMAGENET_KERNELS[rf], tuple(width * m for m in mult), strides, num_classes, bool(shake),
        mean, std, None, "bagcert_imagenet", cfg, in_chans,
    )
