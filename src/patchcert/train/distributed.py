"""DDP helpers: process-group start, rank info, cross-rank BatchNorm (also on CPU with gloo) and
broadcasting rank 0's state."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

__all__ = ["sync_batchnorm", "convert_sync_batchnorm"]


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        torch.distributed.all_reduce(g)
        return g


class _SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's share (two all-reduces).

    Same parameters and buffers as ``nn.BatchNorm2d`` (checkpoints are unchanged). Unlike
    ``nn.SyncBatchNorm`` it works on CPU with gloo (the all-reduces are differentiable:
    :class:`_AllReduceSum`). Outside an
    initialised process group, or in eval mode, it is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x.float()
        c = x.shape[1]
        n_local = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
        s = torch.cat([xf.sum((0, 2, 3)), n_local])
        s = all_reduce(s)
        count = s[-1]
        mean = s[:c] / count
        sq = all_reduce(((xf - mean[None, :, None, None]) ** 2).sum((0, 2, 3)))
        var = sq / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Cross-rank BatchNorm statistics: ``nn.SyncBatchNorm`` on CUDA (NCCL), the gloo-compatible
    :class:`_SyncBatchNorm` elsewhere. Returns the module to train (BatchNorm layers replaced)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    convert_sync_batchnorm(module)
    return module


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Switch every ``nn.BatchNorm2d`` in ``module`` to cross-rank statistics in place; returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _SyncBatchNorm
            n += 1
    return n


def _broadcast_state(module: nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's (e.g. BN running stats)."""
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src=0)
