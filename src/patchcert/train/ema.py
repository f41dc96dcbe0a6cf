"""An exponential moving average of the weights (and BatchNorm statistics)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["WeightEma"]


class WeightEma:
    """Exponential moving average of a model's floating-point state (weights and BatchNorm
    statistics; integer buffers are copied), updated after every optimiser step.

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates (as timm's
    ``ModelEmaV2`` users do for short runs), so early, random weights fade fast. ``model`` is a
    deep copy in eval mode that never trains.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        src = model.state_dict(keep_vars=True)
        for k, v in self.model.state_dict(keep_vars=True).items():
            (self._pairs if v.dtype.is_floating_point else self._copies).append((v.data, src[k].data))

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        if self._pairs:
            torch._foreach_lerp_([a for a, _ in self._pairs], [b for _, b in self._pairs], 1.0 - d)
        for a, b in self._copies:
            a.copy_(b)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.updates = int(updates)
