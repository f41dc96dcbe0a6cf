"""Training: objectives, the loop (resumable, atomic checkpoints), DDP via torchrun."""

from .objectives import (
    OBJECTIVES,
    Objective,
    bagcert_loss,
    create_objective,
    cross_entropy_map,
    heaviside_ste,
    one_hot_penalty,
    patchguard_loss,
    register_objective,
    strongest_window_mask,
)
from .loop import TrainConfig, convert_sync_batchnorm, default_eval_defense, evaluate, lr_at, train

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "lr_at",
    "default_eval_defense",
    "convert_sync_batchnorm",
    "OBJECTIVES",
    "Objective",
    "create_objective",
    "register_objective",
    "bagcert_loss",
    "patchguard_loss",
    "strongest_window_mask",
    "cross_entropy_map",
    "heaviside_ste",
    "one_hot_penalty",
]
