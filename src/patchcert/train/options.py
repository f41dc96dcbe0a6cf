"""What every :class:`~patchcert.train.TrainConfig` field means (``patchcert train --print-config``).

Extending a finished training: a finished run resumes only with its own config (the cosine
schedule depends on ``epochs``, so ``--resume`` with more epochs is refused: the resumed run
would no longer be bit-identical to an uninterrupted one). To train longer, start a *new* run
from its weights -- a warm restart with a fresh schedule and optimiser::

    patchcert train --config SAME.toml --out runs/leg2 --epochs N \\
        --set init_from=runs/leg1/model.safetensors [--lr ...]
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from typing import Any

__all__ = ["FIELD_HELP", "describe_config", "EXTEND_HINT"]

EXTEND_HINT = ("to train longer, start a new run from its weights (a warm restart, fresh schedule): "
               "patchcert train --config ... --out NEW --epochs N --set init_from=RUN/model.safetensors")

FIELD_HELP: dict[str, str] = {
    "model": "registered model name (patchcert models)",
    "model_cfg": "the model factory's options, e.g. {rf = 7, width = 64}",
    "dataset": "cifar10 | imagenette | imagenet | imagefolder:PATH | synthetic",
    "data_dir": "data folder (default: $PATCHCERT_DATA)",
    "objective": "bagcert | patchguard | ce | ds | mask_cutout (the training loss)",
    "objective_cfg": "the objective's options (e.g. bagcert: margin, sigma; mask_cutout: k, patch, fill)",
    "epochs": "training epochs (the cosine schedule spans them)",
    "batch_size": "global batch size (split over torchrun processes)",
    "lr": "peak learning rate (linear warm-up, then cosine decay to 0)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "weight_decay": "weight decay",
    "augment": "random crop + flip (CIFAR: pad-4 crop; folders: random 224 crop of the rescaled image)",
    "seed": "seed of initialisation, data order, augmentation and objective randomness",
    "device": "cpu | cuda | cuda:N",
    "bf16": "bfloat16 autocast for the training forward pass",
    "channels_last": "channels-last memory format (faster convolutions on CPU/GPU)",
    "num_threads": "torch CPU threads (default: torch's)",
    "max_train_examples": "train on the first N training examples only",
    "eval_examples": "test examples certified after every epoch (0: none)",
    "eval_patch": "patch of the per-epoch certification (e.g. 5x5)",
    "eval_batch_size": "batch size of the per-epoch evaluation",
    "out_dir": "run directory (checkpoints, per-epoch CSV, state for --resume)",
    "optimizer": "adam | adamw | sgd",
    "momentum": "SGD momentum",
    "sync_bn": "DDP: BatchNorm statistics over the global batch",
    "eval_defense": "defense of the per-epoch evaluation, {name = ..., **options} (default: the objective's)",
    "dataset_cfg": "extra load_dataset options (e.g. image folder size/resize)",
    "nesterov": "SGD with Nesterov momentum",
    "loader": "auto | memory | stream (how batches are read; see the README, Data)",
    "data_workers": "DataLoader worker processes when streaming (default: min(4, cpus) for folders)",
    "tf32": "allow TF32 while training (CUDA; evaluation always runs with TF32 off)",
    "cudnn_benchmark": "cuDNN autotuning while training (CUDA; may change float rounding)",
    "compile": "torch.compile the trained module (may change float rounding)",
    "init_from": "start a new run from a checkpoint's matching tensors (fine-tuning, a converted BagNet, or "
                 "training a finished run longer)",
    "ema_decay": "exponential moving average of the weights (e.g. 0.999; the averaged model is evaluated and saved)",
    "eval_every": "evaluate after every Nth epoch and the last (may change on --resume: evaluation never alters training)",
}


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    name = getattr(base, "__name__", str(base))
    return f"{name} | None" if type(None) in typing.get_args(hint) else name


def describe_config() -> list[dict[str, Any]]:
    """Every TrainConfig field: ``{"name", "type", "default", "help"}`` in declaration order."""
    from .loop import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                    "help": FIELD_HELP.get(f.name, "")})
    return out
