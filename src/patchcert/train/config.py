"""Training configuration: :class:`TrainConfig` (field names are part of the run format), its
validation, reading it from TOML/JSON, and which of its options must match on resume."""

from __future__ import annotations

import json
import math
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import PatchcertError
from ..rundir import config_diff
from ..runtime import check_seed
from .objectives import OBJECTIVES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

__all__ = ["TrainConfig", "OPTIMIZERS", "LOADERS"]

OPTIMIZERS = ("adam", "adamw", "sgd")
LOADERS = ("auto", "memory", "stream")


@dataclass
class TrainConfig:
    """Everything that determines a training run (field names are part of the run format)."""

    model: str = "bagcert_cifar"
    model_cfg: dict = field(default_factory=lambda: {"rf": 7, "width": 64})
    dataset: str = "cifar10"
    data_dir: str | None = None
    objective: str = "bagcert"  # bagcert | patchguard | ce | ds (see OBJECTIVES)
    objective_cfg: dict = field(default_factory=lambda: {"margin": 0.5, "sigma": 0.0})
    epochs: int = 30
    batch_size: int = 96  # the global batch (split over DDP ranks)
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    channels_last: bool = False
    num_threads: int | None = None
    max_train_examples: int | None = None
    eval_examples: int = 1000
    eval_patch: str = "5x5"
    eval_batch_size: int = 250
    out_dir: str = "runs/train"
    # -- added after the first shipped run: defaults keep older runs resumable --------------
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    sync_bn: bool = False  # DDP: BatchNorm statistics over the global batch
    eval_defense: dict | None = None  # {"name": ..., **kwargs}; None: the objective's default
    dataset_cfg: dict = field(default_factory=dict)  # extra load_dataset options (e.g. ImageFolder size)
    nesterov: bool = False  # sgd only
    # -- issue 10: streaming data and GPU options -----------------------------------------------
    loader: str = "auto"  # auto | memory | stream (see the module docstring)
    data_workers: int | None = None  # DataLoader worker processes (stream); None: 0 in memory, else min(4, cpus)
    tf32: bool = False  # allow TF32 matmuls/convolutions while training (CUDA; evaluation stays TF32-off)
    cudnn_benchmark: bool = False  # cuDNN autotuning while training (CUDA; may change float rounding)
    compile: bool = False  # torch.compile the trained module (may change float rounding)
    init_from: str | None = None  # start from a checkpoint's weights (e.g. `patchcert convert` of a published BagNet)
    # exponential moving average of the weights and BatchNorm statistics (None: off); when on, the
    # averaged model is the one evaluated each epoch and saved as model.safetensors
    ema_decay: float | None = None
    # evaluate after every Nth epoch and after the last (1: every epoch); evaluation never changes
    # training (it runs on a forked RNG), so this may change when a run is resumed
    eval_every: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys and values of the wrong type are one-line errors."""
        if not isinstance(d, dict):
            raise PatchcertError(f"a training config must be a table/object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PatchcertError(f"unknown training option(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            _check_type(k, v, hints[k])
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a TOML (``.toml``) or JSON config file."""
        p = Path(path)
        if not p.is_file():
            raise PatchcertError(f"config file {str(p)!r} does not exist")
        try:
            d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PatchcertError(f"{p}: cannot parse config ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        """Range checks (types are checked by ``from_dict``); raises a one-line ``PatchcertError``."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.epochs < 1:
            raise PatchcertError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise PatchcertError(f"batch_size must be positive, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise PatchcertError(f"lr must be positive, got {self.lr}")
        check_seed(self.seed, "seed")
        bad = [f.name for f in fields(self) if isinstance(getattr(self, f.name), float)
               and not math.isfinite(getattr(self, f.name))]
        if bad:
            raise PatchcertError(f"training option {bad[0]} must be a finite number, got {getattr(self, bad[0])}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise PatchcertError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise PatchcertError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eval_examples < 0 or self.eval_batch_size < 1:
            raise PatchcertError("eval_examples must be >= 0 and eval_batch_size positive")
        if self.eval_every < 1:
            raise PatchcertError(f"eval_every must be positive, got {self.eval_every}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise PatchcertError(f"max_train_examples must be positive, got {self.max_train_examples}")
        if self.num_threads is not None and self.num_threads < 1:
            raise PatchcertError(f"num_threads must be positive, got {self.num_threads}")
        if self.objective not in OBJECTIVES:
            raise PatchcertError(f"unknown objective {self.objective!r}; known: {', '.join(sorted(OBJECTIVES))}")
        if self.optimizer not in OPTIMIZERS:
            raise PatchcertError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise PatchcertError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.loader not in LOADERS:
            raise PatchcertError(f"unknown loader {self.loader!r}; known: {', '.join(LOADERS)}")
        if self.data_workers is not None and self.data_workers < 0:
            raise PatchcertError(f"data_workers must be >= 0, got {self.data_workers}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise PatchcertError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.eval_defense is not None and not isinstance(self.eval_defense.get("name"), str):
            raise PatchcertError("eval_defense must be a table with a 'name' (e.g. {name = \"voting\", binarize = \"sign\"})")


def _check_type(name: str, v: Any, hint: Any) -> None:
    """One-line error unless ``v`` fits the field's annotation (ints are accepted for floats)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
    ok = {
        bool: lambda x: isinstance(x, bool),
        int: lambda x: isinstance(x, int) and not isinstance(x, bool),
        float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        str: lambda x: isinstance(x, str),
        dict: lambda x: isinstance(x, dict),
    }[hint](v)
    if not ok:
        raise PatchcertError(f"training option {name} must be {hint.__name__}, got {v!r}")


def _defaults() -> dict[str, Any]:
    out = {}
    for f in fields(TrainConfig):
        out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
    return out


_NOT_COMPARED = ("device", "num_threads", "out_dir", "data_dir", "eval_batch_size", "data_workers", "compile",
                 "cudnn_benchmark", "init_from", "eval_every")
# init_from: a resumed run restores its own weights; eval_every: evaluation does not touch training


def _comparable(cfg: dict) -> dict:
    """Options that must match between a run and its resumption (missing keys: their defaults)."""
    full = {**_defaults(), **cfg}
    return {k: v for k, v in full.items() if k not in _NOT_COMPARED}


def _config_diff(saved: dict, now: dict) -> list[str]:
    return config_diff(_comparable(saved), _comparable(now))
