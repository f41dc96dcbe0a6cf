"""Training: objectives, the loop (resumable, atomic checkpoints), DDP via torchrun."""

from .objectives import bagcert_loss, cross_entropy_map, heaviside_ste, one_hot_penalty
from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train", "bagcert_loss", "cross_entropy_map", "heaviside_ste", "one_hot_penalty"]
