"""The training loop: one config -> a run directory, resumable, atomic, DDP-aware.

Run directory::

    config.json          the resolved TrainConfig (+ versions)
    log.csv              one row per epoch (loss, lr, throughput, eval accuracies)
    state.safetensors    model + optimizer + RNG state after the last finished epoch (resume)
    model.safetensors    the model after the last finished epoch (+ model.json metadata)

``state.safetensors`` holds tensors ``model.*`` (state dict), ``opt.<param>.<key>``
(optimizer state), ``rng.data`` (the data generator: shuffling, augmentation, DS
ablations) and ``rng.torch`` (the global CPU generator: initialisation, shake-shake),
plus ``rng.cuda`` on CUDA; its JSON metadata has ``config``, ``epoch``, ``history``,
``optimizer`` (param groups + non-tensor state) and ``world_size``. Every file is written
atomically (temporary file + rename) and the state last, so it always names a finished epoch.

Resuming (``resume=True``) continues after the last finished epoch with the same RNG
state, so an interrupted run ends with the same weights as an uninterrupted one. The
saved config must match (options that cannot change the result -- device, threads,
output/data folders, eval batch size -- may differ; options added to ``TrainConfig``
after the run was written take their defaults).

Under ``torchrun`` (``WORLD_SIZE > 1``) the loop initialises the process group (gloo on
CPU, nccl on CUDA) and wraps the trained module in DistributedDataParallel. Every rank
draws the same shuffled order, augmentation and ablations for the *global* batch
(``batch_size``) and takes its share ``batch[rank::world]``; the loss is weighted so that
the averaged gradient is that of the global batch mean even when the shares differ in
size. BatchNorm statistics are per rank unless ``sync_bn=True`` (a differentiable
all-reduce that works with any backend, CPU included), with which a run on ``W``
processes computes the same function as a single process up to float rounding.
Evaluation is sharded over the ranks; rank 0 alone writes files.

Two data paths (``loader``):

* ``"memory"`` -- the first loop's path, kept bit-identical for in-memory data (CIFAR-10,
  synthetic): one generator (``rng.data``) draws the shuffled order, the batched augmentation
  and the objective's randomness for the global batch on the main thread; every rank draws
  the whole global batch and keeps its share.
* ``"stream"`` -- ``torch.utils.data`` (:mod:`patchcert.loader`): a ``DataLoader`` with
  ``data_workers`` processes decodes and augments while the model trains (pinned memory and
  non-blocking copies on CUDA); the order of epoch ``e`` and example ``i``'s augmentation and
  objective randomness (DS ablations, mask cut-outs) come from generators seeded by ``(seed, e)``
  and ``(seed, e, i)``, and each rank reads only its share ``batch[rank::world]`` of each global
  batch. Resume is bit-identical (nothing but the epoch needs restoring), whatever the number of
  workers, and a ``W``-process run sees the same augmented global batches as one process.
* ``"auto"`` (default): ``stream`` for data that is decoded on access (image folders),
  ``memory`` for data already in memory.

GPU options (thin; documented in ``TrainConfig``): ``tf32`` allows TF32 inside training only
(evaluation and certification run with TF32 off; the previous global flags are restored when
``train`` returns); ``cudnn_benchmark``; ``compile`` (``torch.compile`` of the trained module,
after DDP wrapping); ``sync_bn`` uses ``nn.SyncBatchNorm`` on CUDA and the gloo-compatible
:class:`_SyncBatchNorm` on CPU; ``bf16`` autocasts on CUDA as on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import time
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint import atomic_write_text, load_tensors, save_checkpoint, save_tensors, versions
from ..data import ImageDataset, ImageSource, iterate_batches, load_dataset, to_float, train_batch
from ..errors import CheckpointError, PatchcertError
from ..geometry import patch_windows
from ..loader import (STREAM_OBJECTIVE, EpochBatchSampler, TrainView, default_workers, example_generator,
                      load_batches, make_loader)
from ..models import create_model
from ..runtime import math_mode, precise_math
from ..rundir import config_diff, hold_for_job
from .objectives import OBJECTIVES, Objective, create_objective

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "lr_at", "evaluate", "default_eval_defense", "OBJECTIVES", "convert_sync_batchnorm",
           "sync_batchnorm", "autocast", "init_weights", "LOADERS"]

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
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise PatchcertError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise PatchcertError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eval_examples < 0 or self.eval_batch_size < 1:
            raise PatchcertError("eval_examples must be >= 0 and eval_batch_size positive")
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


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to 0 (per optimiser step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))


# -- evaluation ---------------------------------------------------------------------------------

def default_eval_defense(objective: str, cfg: dict | None = None,
                         windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The defense a model trained with ``objective`` is evaluated (and deployed) with.

    ``windows``: the evaluation threat's feature windows (PatchGuard's mask window covers
    them all). BagCert: sign voting, Condition 3.2; PatchGuard: robust masking of clipped
    logits (T = 0); DS: voting with softmax threshold 0.3 on wrap-around bands; CE: voting
    on the local argmax.
    """
    if objective not in OBJECTIVES:
        raise PatchcertError(f"unknown objective {objective!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[objective].eval_defense(cfg or {}, windows)


def _make_defense(spec: dict[str, Any], model: Any, patch: str, image_size: tuple[int, int]):
    """The evaluation defense and patch threat, built as ``certify`` builds them for the model."""
    from ..certify import DefenseSpec, plan_threat

    kw = dict(spec)
    name = kw.pop("name", None)
    if not isinstance(name, str):
        raise PatchcertError(f"eval_defense needs a 'name', got {spec!r}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    try:
        dps, pps = plan_threat([DefenseSpec(name, kw, name)], [patch], model.geometry, tuple(image_size))
    except PatchcertError as e:
        raise PatchcertError(f"eval_defense: {e}") from None
    return dps[0].defense, pps[0]


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` (CPU or CUDA alike)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSource, patch: str, device: torch.device, batch_size: int = 250,
             bf16: bool = False, defense: dict[str, Any] | None = None,
             num_workers: int | None = None) -> dict[str, float]:
    """Clean and certified accuracy of ``defense`` (default: sign voting, Condition 3.2) on ``data``.

    Under an initialised process group each rank evaluates ``data[rank::world]`` and the
    counts are summed, so every rank returns the accuracies on the whole set. A defense with an
    expensive pass (``eval_images``, e.g. double masking) is evaluated on that many images spread
    evenly over ``data`` (its early exit keeps it cheap). Images are read
    through :func:`patchcert.loader.load_batches` (``num_workers``); TF32 is off inside.
    """
    d, threat = _make_defense(defense or {"name": "voting", "binarize": "sign", "condition": "3.2"}, model, patch,
                              data.image_size)
    was = model.training
    model.eval()
    rank, world = _dist_info()
    n_eval = min(len(data), d.eval_images or len(data))  # an expensive defense evaluates a spread sample
    picked = torch.arange(len(data)) if n_eval == len(data) else torch.linspace(0, len(data) - 1, n_eval).round().long()
    share = picked[rank::world]
    counts = torch.zeros(2, dtype=torch.float64)
    batches = [share[idx] for idx in iterate_batches(len(share), batch_size, shuffle=False)]
    cuda = device.type == "cuda"
    with precise_math():
        for xb, yb, _ in load_batches(data, batches, num_workers, pin_memory=cuda):
            x = to_float(xb.to(device, non_blocking=cuda))
            y = yb.to(device, non_blocking=cuda)
            s = None
            if d.evidence_source == "scores":
                with autocast(device, bf16):
                    s = model.score_map(x).float()
            ev = d.compute_evidence(model, x, s, y)
            counts[0] += int((d.predict_evidence(ev).to(y.device) == y).sum())
            counts[1] += int(d.certify_threat(ev, y, threat).certified.sum())
    if world > 1:
        torch.distributed.all_reduce(counts)
    model.train(was)
    n = max(1, n_eval)
    return {"clean_acc": float(counts[0]) / n, "cert_acc": float(counts[1]) / n}


# -- distributed ------------------------------------------------------------------------------

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


# -- optimizer state <-> safetensors -------------------------------------------------------------

def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in info.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


_NOT_COMPARED = ("device", "num_threads", "out_dir", "data_dir", "eval_batch_size", "data_workers", "compile",
                 "cudnn_benchmark", "init_from")  # init_from: a resumed run restores its own weights


def _comparable(cfg: dict) -> dict:
    """Options that must match between a run and its resumption (missing keys: their defaults)."""
    full = {**_defaults(), **cfg}
    return {k: v for k, v in full.items() if k not in _NOT_COMPARED}


def _config_diff(saved: dict, now: dict) -> list[str]:
    return config_diff(_comparable(saved), _comparable(now))


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_tensors(path)
    missing = [k for k in ("config", "epoch", "optimizer") if k not in meta]
    if missing or "rng.data" not in tensors or "rng.torch" not in tensors:
        raise CheckpointError(f"{path}: not a training state (missing {', '.join(missing) or 'rng state'})")
    return tensors, meta


def init_weights(model: nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Copy every tensor of the checkpoint at ``path`` whose name and shape match ``model``'s state
    into it (fine-tuning: e.g. an ImageNet BagNet's trunk for a 10-class task, whose differently
    shaped head keeps its fresh initialisation). Returns (loaded, kept) state names; an
    architecture that shares no tensor with the checkpoint is a one-line error."""
    tensors, _ = load_tensors(path)
    tensors = {k[6:] if k.startswith("model.") else k: v for k, v in tensors.items()}  # a training state works too
    own = model.state_dict()
    loaded = [k for k, v in own.items() if k in tensors and tuple(tensors[k].shape) == tuple(v.shape)]
    kept = [k for k in own if k not in loaded]
    if not loaded:
        raise PatchcertError(f"init_from {str(path)!r}: no tensor matches the model ({len(tensors)} tensors, e.g. "
                             f"{next(iter(tensors), '-')!r}); is it the same architecture?")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(tensors[k].to(own[k].dtype))
    log.info("init_from %s: %d tensors loaded, %d kept fresh (%s)", path, len(loaded), len(kept),
             ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else ""))
    return loaded, kept


def _same_images(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two datasets read the same images: the same folder, and for CIFAR-10 (whose
    train and test batches share one folder) the same split."""
    if not a.get("root") or a.get("root") != b.get("root"):
        return False
    return a.get("dataset") != "cifar10" or a.get("split") == b.get("split")


# -- the loop -----------------------------------------------------------------------------------

def _saved_state(out: Path, state_path: Path, resolved: dict[str, Any],
                 resume: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The run folder's saved training state (``resume`` with the same config), or None for a
    new run. Checked on every rank (same file system): a rank that raised alone would hang the others."""
    if not state_path.exists():
        if resume:
            log.warning("no training state in %s: starting a new run", out)
        return None
    if not resume:
        raise PatchcertError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    saved = _load_state(state_path)
    diff = _config_diff(saved[1]["config"], resolved)
    if diff:
        raise PatchcertError(f"cannot resume {out}: config differs from the saved run in {', '.join(diff)}")
    return saved


def _datasets(cfg: TrainConfig) -> tuple[ImageSource, ImageSource, bool, int, int]:
    """Training and evaluation sets, whether to stream the training set, and the loader workers."""
    ds_kw = dict(cfg.dataset_cfg)
    train_set: ImageSource = load_dataset(cfg.dataset, cfg.data_dir, train=True, train_view=True, **ds_kw)
    eval_set = load_dataset(cfg.dataset, cfg.data_dir, train=False, **ds_kw)
    if cfg.max_train_examples:
        train_set = train_set.subset(cfg.max_train_examples)
    # in-memory splits (CIFAR, synthetic) are shuffled: their first examples; image folders are
    # sorted by class: examples spread over the folder so that every class is evaluated
    eval_set = eval_set.subset(cfg.eval_examples) if eval_set.in_memory else eval_set.spread(cfg.eval_examples)
    stream = cfg.loader == "stream" or (cfg.loader == "auto" and not train_set.in_memory)
    if not stream and not isinstance(train_set, ImageDataset):
        train_set = train_set.load()  # type: ignore[attr-defined]  # loader = "memory": decode everything now
    workers = cfg.data_workers if cfg.data_workers is not None else default_workers(train_set)
    eval_workers = cfg.data_workers if cfg.data_workers is not None else default_workers(eval_set)
    if _same_images(train_set.info, eval_set.info):
        log.warning("training and evaluating on the same images (%s)", train_set.info["root"])
    return train_set, eval_set, stream, workers, eval_workers


def _restore(saved: tuple[dict[str, torch.Tensor], dict[str, Any]], state_path: Path, model: nn.Module,
             opt: torch.optim.Optimizer, gen: torch.Generator, device: torch.device, world: int) -> tuple[int, list]:
    """Model, optimizer and RNG states of the last finished epoch: ``(epoch, history)``."""
    tensors, meta = saved
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(opt, tensors, meta["optimizer"])
        gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{state_path}: cannot restore the training state ({str(e).splitlines()[0]})") from None
    if int(meta.get("world_size", world)) != world:
        log.warning("resuming a run trained on %s process(es) with %d: BatchNorm statistics per rank differ",
                    meta.get("world_size"), world)
    log.info("resuming %s after epoch %d", state_path.parent, int(meta["epoch"]))
    return int(meta["epoch"]), list(meta.get("history", []))


def _build(cfg: TrainConfig, train_set: ImageSource, eval_set: ImageSource, device: torch.device, fresh: bool):
    """Model (``fresh``: a new run, initialised from ``init_from`` if given), objective, the
    trained module, optimizer and the evaluation defense (validated now, not after the first epoch)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=train_set.num_classes, **cfg.model_cfg).to(device)
    if cfg.init_from and fresh:
        init_weights(model, cfg.init_from)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    crop = train_set.info.get("crop")
    image_size = (int(crop), int(crop)) if crop else train_set.image_size  # what the model sees
    objective: Objective = create_objective(cfg.objective, model, image_size, **cfg.objective_cfg)
    module = objective.trainable(model)
    if cfg.sync_bn:
        module = sync_batchnorm(module, device)
    opt = _make_optimizer(cfg, module.parameters())
    try:
        eval_windows = patch_windows(model, cfg.eval_patch, eval_set.image_size)
    except ValueError as e:
        raise PatchcertError(f"eval_patch: {e}") from None
    eval_defense = cfg.eval_defense or default_eval_defense(cfg.objective, cfg.objective_cfg, eval_windows)
    _make_defense(eval_defense, model, cfg.eval_patch, eval_set.image_size)
    return model, objective, module, opt, eval_defense


def _save_epoch(cfg: TrainConfig, out: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                device: torch.device, objective: Objective, train_set: ImageSource, eval_set: ImageSource,
                resolved: dict[str, Any], history: list[dict], world: int, eval_defense: dict[str, Any],
                ema: WeightEma | None = None) -> None:
    """Rank 0, after an epoch: the log, the model checkpoint (the weight average if ``ema``), then
    the training state (last: the state names a finished epoch)."""
    row = history[-1]
    epoch = int(row["epoch"])
    _write_csv(out / "log.csv", history)
    opt_tensors, opt_info = _optimizer_tensors(opt)
    meta = {"config": resolved, "epoch": epoch, "history": history, "optimizer": opt_info,
            "world_size": world, "objective": objective.describe(), "eval_defense": eval_defense}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update(ema.state_tensors())
        meta["ema_updates"] = ema.updates
    tensors.update(opt_tensors)
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_checkpoint(out / "model.safetensors", ema.model if ema is not None else model, classes=list(train_set.classes),
                    data=train_set.info, epoch=epoch, metrics=row, train_config=resolved,
                    objective=objective.describe(),
                    eval={"examples": len(eval_set), "patch": cfg.eval_patch, "defense": eval_defense})
    save_tensors(out / "state.safetensors", tensors, meta)


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


def train(cfg: TrainConfig, resume: bool = False,
          on_step: Callable[[int, int, float], None] | None = None,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the last epoch's metrics. ``on_step(done, total, loss)`` reports progress (rank 0).

    ``resume``: continue the run in ``cfg.out_dir`` after its last finished epoch (a fresh
    start if it holds none). ``stop_after_epoch`` ends the call after that epoch (used to test
    resumption and to split long runs).
    """
    cfg.validate()
    from ..runtime import resolve_device

    device = resolve_device(cfg.device)
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PatchcertError(f"bf16 autocast is not supported on {torch.cuda.get_device_name(device)}; set bf16 = false")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with math_mode(tf32=cfg.tf32, cudnn_benchmark=cfg.cudnn_benchmark):
        return _train(cfg, device, resume, on_step, stop_after_epoch)


def _train(cfg: TrainConfig, device: torch.device, resume: bool,
           on_step: Callable[[int, int, float], None] | None, stop_after_epoch: int | None) -> dict[str, Any]:
    started_dist = _maybe_init_distributed(device)
    rank, world = _dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out = Path(cfg.out_dir)
    held = contextlib.ExitStack()
    try:
        held.enter_context(hold_for_job(out))  # one process (or one torchrun job) per run folder
        state_path = out / "state.safetensors"
        resolved = asdict(cfg)
        saved = _saved_state(out, state_path, resolved, resume)
        train_set, eval_set, stream, workers, eval_workers = _datasets(cfg)

        model, objective, module, opt, eval_defense = _build(cfg, train_set, eval_set, device, fresh=saved is None)
        gen = torch.Generator().manual_seed(cfg.seed)
        start_epoch, history = 0, []
        ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay else None
        if saved is not None:
            start_epoch, history = _restore(saved, state_path, model, opt, gen, device, world)
            if ema is not None:
                try:
                    ema.load_state_tensors(saved[0], saved[1]["ema_updates"])
                except (RuntimeError, KeyError) as e:
                    raise CheckpointError(f"{state_path}: cannot restore the weight average ({str(e).splitlines()[0]})") from None
            del saved

        net: nn.Module = module
        if world > 1:
            net = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)  # the saved state dicts are the uncompiled module's (same tensors)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps({**resolved, "versions": versions()}, indent=2) + "\n")

        n = len(train_set)
        steps_per_epoch = n // cfg.batch_size  # drop_last: every step sees a full batch
        if steps_per_epoch < 1:
            raise PatchcertError(f"batch size {cfg.batch_size} is larger than the training set ({n})")
        if cfg.batch_size < world:
            raise PatchcertError(f"batch size {cfg.batch_size} is smaller than the number of processes ({world})")
        total = steps_per_epoch * cfg.epochs
        warm = int(round(cfg.warmup_epochs * steps_per_epoch))
        cuda = device.type == "cuda"
        sampler = loader = None
        if stream:
            sampler = EpochBatchSampler(n, cfg.batch_size, cfg.seed, rank, world)
            loader = make_loader(TrainView(train_set, cfg.augment, cfg.seed), sampler, workers, pin_memory=cuda,
                                 persistent=workers > 0)
            log.info("streaming %d training images with %d worker(s)", n, workers)
        metrics: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of per-example losses, examples] on this rank
            if sampler is not None:
                sampler.set_epoch(epoch)
                batches: Any = loader
            else:
                batches = iterate_batches(n, cfg.batch_size, shuffle=True, generator=gen, drop_last=True)
            for it, item in enumerate(batches):
                step = epoch * steps_per_epoch + it
                lr = lr_at(step, total, warm, cfg.lr)
                for gp in opt.param_groups:
                    gp["lr"] = lr
                objective.set_progress(step / total)
                if stream:  # this rank's share, augmented per example in the workers
                    xb, yb, ib = item
                    if objective.uses_generator:  # per-example randomness: (seed, epoch, index)
                        xf = to_float(xb)
                        x = torch.cat([objective.prepare(xf[k:k + 1], example_generator(
                            cfg.seed, epoch, int(ib[k]), STREAM_OBJECTIVE)) for k in range(len(ib))]).to(device)
                    else:
                        x = objective.prepare(to_float(xb.to(device, non_blocking=cuda)), None)
                    yb = yb.to(device, non_blocking=cuda)
                    global_batch = cfg.batch_size
                else:
                    idx = item
                    xb = train_batch(train_set, idx, cfg.augment, gen)  # type: ignore[arg-type]  # CIFAR: pad-4 crop + flip
                    if objective.uses_generator:  # e.g. DS ablation: drawn for the global batch, then shared out
                        x = objective.prepare(to_float(xb), gen)[rank::world].to(device)
                    else:
                        x = objective.prepare(to_float(xb[rank::world]), None).to(device)
                    yb = train_set.labels[idx][rank::world].to(device)
                    global_batch = len(idx)
                if objective.refines:  # e.g. Greedy Cutout: worst-case masks found with the current model
                    clean = to_float(xb if stream else xb[rank::world]).to(device)
                    x = objective.refine(clean, x, yb, module, lambda t: autocast(device, cfg.bf16))
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, cfg.bf16):
                    out_ = net(x)
                loss = objective.loss(out_, yb)
                # DDP averages gradients over ranks: weight each rank's mean by its share of the batch
                scaled = loss * (len(yb) * world / global_batch) if world > 1 else loss
                opt.zero_grad(set_to_none=True)
                scaled.backward()
                opt.step()
                if ema is not None:
                    ema.update()
                lval = loss.detach().item()
                loss_sum[0] += lval * len(yb)
                loss_sum[1] += len(yb)
                if on_step is not None and rank == 0:
                    on_step(step + 1 - start_epoch * steps_per_epoch, total - start_epoch * steps_per_epoch, lval)
            dt = time.perf_counter() - t0
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
                _broadcast_state(module)  # rank 0's BN running stats everywhere: the model we save is the one evaluated
                if ema is not None:
                    _broadcast_state(ema.model)  # its BN averages followed each rank's own statistics
            row = {"epoch": epoch + 1, "loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), "lr": lr,
                   "train_img_per_s": float(loss_sum[1]) / dt, "epoch_seconds": dt}
            ev = evaluate(ema.model if ema is not None else model, eval_set, cfg.eval_patch, device, cfg.eval_batch_size, cfg.bf16, eval_defense,
                          num_workers=eval_workers)
            row.update({f"eval_{k}": v for k, v in ev.items()})
            history.append(row)
            metrics = row
            if rank == 0:
                _save_epoch(cfg, out, model, opt, gen, device, objective, train_set, eval_set, resolved, history,
                            world, eval_defense, ema)
                log.info("epoch %d/%d loss %.4f clean %.3f cert %.3f (%.0f img/s)", epoch + 1, cfg.epochs,
                         row["loss"], row["eval_clean_acc"], row["eval_cert_acc"], row["train_img_per_s"])
            if world > 1:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        return metrics
    finally:
        held.close()
        if started_dist:
            torch.distributed.destroy_process_group()


_CSV_FIRST = ("epoch", "loss", "lr", "train_img_per_s", "epoch_seconds", "eval_clean_acc", "eval_cert_acc")


def _write_csv(path: Path, rows: list[dict]) -> None:
    """One row per epoch; the standard columns first in a fixed order (also after a resume,
    whose history comes back from JSON with sorted keys), then any others."""
    keys: list[str] = [k for k in _CSV_FIRST if any(k in r for r in rows)]
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
