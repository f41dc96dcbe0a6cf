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
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint import atomic_write_text, versions
from ..data import ImageDataset, ImageSource, iterate_batches, load_dataset, to_float, train_batch
from ..errors import CheckpointError, PatchcertError
from ..geometry import patch_windows
from ..loader import (STREAM_OBJECTIVE, EpochBatchSampler, TrainView, default_workers, example_generator,
                      make_loader)
from ..models import create_model
from ..runtime import math_mode
from ..rundir import check_training_folder, hold_for_job
from .config import LOADERS, TrainConfig, _comparable  # noqa: F401  (_comparable: re-exported)
from .distributed import (_broadcast_state, _dist_info, _maybe_init_distributed, _SyncBatchNorm,  # noqa: F401
                          convert_sync_batchnorm, sync_batchnorm)
from .ema import WeightEma
from .evaluation import _make_defense, autocast, default_eval_defense, evaluate
from .objectives import OBJECTIVES, Objective, create_objective
from .optim import lr_at, make_optimizer
from .state import _restore, _save_epoch, _saved_state, init_weights

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "lr_at", "evaluate", "default_eval_defense", "OBJECTIVES", "convert_sync_batchnorm",
           "sync_batchnorm", "autocast", "init_weights", "LOADERS"]


def _same_images(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two datasets read the same images: the same folder, and for CIFAR-10 (whose
    train and test batches share one folder) the same split."""
    if not a.get("root") or a.get("root") != b.get("root"):
        return False
    return a.get("dataset") != "cifar10" or a.get("split") == b.get("split")


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
    opt = make_optimizer(cfg, module.parameters())
    try:
        eval_windows = patch_windows(model, cfg.eval_patch, eval_set.image_size)
    except ValueError as e:
        raise PatchcertError(f"eval_patch: {e}") from None
    eval_defense = cfg.eval_defense or objective.eval_defense(cfg.objective_cfg, eval_windows)  # the objective's own
    _make_defense(eval_defense, model, cfg.eval_patch, eval_set.image_size)
    return model, objective, module, opt, eval_defense


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


@dataclass
class _Run:
    """What one training call holds: built by :func:`_setup`, read by the epoch functions."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    out: Path
    resolved: dict[str, Any]
    train_set: ImageSource
    eval_set: ImageSource
    eval_workers: int
    model: nn.Module
    objective: Objective
    module: nn.Module  # the trained module (the objective's choice; BatchNorm possibly synced)
    net: nn.Module  # what the loop runs: ``module``, DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    gen: torch.Generator  # the data generator (rng.data)
    ema: WeightEma | None
    eval_defense: dict[str, Any]
    start_epoch: int
    history: list[dict]
    steps_per_epoch: int
    total: int  # optimiser steps of the whole run
    warm: int  # warm-up steps
    loader: Any = None  # stream: the DataLoader (None: batches drawn in memory from ``gen``)
    sampler: EpochBatchSampler | None = None


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
        check_training_folder(out)  # before anything is written: a certify run or a user's folder is refused
        held.enter_context(hold_for_job(out))  # one process (or one torchrun job) per run folder
        run = _setup(cfg, device, out, resume, rank, world)
        metrics: dict[str, Any] = run.history[-1] if run.history else {}
        for epoch in range(run.start_epoch, cfg.epochs):
            metrics = _end_epoch(run, epoch, *_train_epoch(run, epoch, on_step))
            if world > 1:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        return metrics
    finally:
        held.close()
        if started_dist:
            torch.distributed.destroy_process_group()


def _setup(cfg: TrainConfig, device: torch.device, out: Path, resume: bool, rank: int, world: int) -> _Run:
    """Data, model, objective, optimizer and (on resume) the saved state; the run's config.json."""
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
    run = _Run(cfg, device, rank, world, out, resolved, train_set, eval_set, eval_workers, model, objective, module,
               net, opt, gen, ema, eval_defense, start_epoch, history, steps_per_epoch,
               total=steps_per_epoch * cfg.epochs, warm=int(round(cfg.warmup_epochs * steps_per_epoch)))
    if stream:
        run.sampler = EpochBatchSampler(n, cfg.batch_size, cfg.seed, rank, world)
        run.loader = make_loader(TrainView(train_set, cfg.augment, cfg.seed), run.sampler, workers,
                                 pin_memory=device.type == "cuda", persistent=workers > 0)
        log.info("streaming %d training images with %d worker(s)", n, workers)
    return run


def _train_epoch(run: _Run, epoch: int, on_step: Callable[[int, int, float], None] | None
                 ) -> tuple[torch.Tensor, float, float]:
    """One epoch of optimiser steps: ``(loss_sum, last lr, seconds)``; ``loss_sum`` is
    ``[sum of per-example losses, examples]`` on this rank."""
    cfg, objective = run.cfg, run.objective
    run.net.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros(2, dtype=torch.float64)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
        batches: Any = run.loader
    else:
        batches = iterate_batches(len(run.train_set), cfg.batch_size, shuffle=True, generator=run.gen, drop_last=True)
    lr = cfg.lr
    for it, item in enumerate(batches):
        step = epoch * run.steps_per_epoch + it
        lr = lr_at(step, run.total, run.warm, cfg.lr)
        for gp in run.opt.param_groups:
            gp["lr"] = lr
        objective.set_progress(step / run.total)
        x, yb, global_batch, clean = _batch_inputs(run, epoch, item)
        if objective.refines:  # e.g. Greedy Cutout: worst-case masks found with the current model
            x = objective.refine(clean().to(run.device), x, yb, run.module, lambda t: autocast(run.device, cfg.bf16))
        lval = _step(run, x, yb, global_batch)
        loss_sum[0] += lval * len(yb)
        loss_sum[1] += len(yb)
        if on_step is not None and run.rank == 0:
            done = run.start_epoch * run.steps_per_epoch
            on_step(step + 1 - done, run.total - done, lval)
    return loss_sum, lr, time.perf_counter() - t0


def _batch_inputs(run: _Run, epoch: int, item: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, int, Callable[[], torch.Tensor]]:
    """This rank's network input and labels for one batch, the global batch size, and a function
    giving this rank's clean float images (for ``Objective.refine``)."""
    cfg, objective, rank, world = run.cfg, run.objective, run.rank, run.world
    cuda = run.device.type == "cuda"
    if run.sampler is not None:  # this rank's share, augmented per example in the workers
        xb, yb, ib = item
        if objective.uses_generator:  # per-example randomness: (seed, epoch, index)
            xf = to_float(xb)
            x = torch.cat([objective.prepare(xf[k:k + 1], example_generator(
                cfg.seed, epoch, int(ib[k]), STREAM_OBJECTIVE)) for k in range(len(ib))]).to(run.device)
        else:
            x = objective.prepare(to_float(xb.to(run.device, non_blocking=cuda)), None)
        return x, yb.to(run.device, non_blocking=cuda), cfg.batch_size, lambda: to_float(xb)
    idx = item
    xb = train_batch(run.train_set, idx, cfg.augment, run.gen)  # type: ignore[arg-type]  # CIFAR: pad-4 crop + flip
    if objective.uses_generator:  # e.g. DS ablation: drawn for the global batch, then shared out
        x = objective.prepare(to_float(xb), run.gen)[rank::world].to(run.device)
    else:
        x = objective.prepare(to_float(xb[rank::world]), None).to(run.device)
    yb = run.train_set.labels[idx][rank::world].to(run.device)
    return x, yb, len(idx), lambda: to_float(xb[rank::world])


def _step(run: _Run, x: torch.Tensor, yb: torch.Tensor, global_batch: int) -> float:
    """One optimiser step on this rank's share; returns the share's mean loss."""
    if run.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(run.device, run.cfg.bf16):
        out_ = run.net(x)
    loss = run.objective.loss(out_, yb)
    # DDP averages gradients over ranks: weight each rank's mean by its share of the batch
    scaled = loss * (len(yb) * run.world / global_batch) if run.world > 1 else loss
    run.opt.zero_grad(set_to_none=True)
    scaled.backward()
    run.opt.step()
    if run.ema is not None:
        run.ema.update()
    return loss.detach().item()


def _end_epoch(run: _Run, epoch: int, loss_sum: torch.Tensor, lr: float, dt: float) -> dict[str, Any]:
    """After an epoch: reduce the loss over ranks, evaluate, log and (rank 0) save; returns the log row."""
    cfg, ema = run.cfg, run.ema
    if run.world > 1:
        torch.distributed.all_reduce(loss_sum)
        _broadcast_state(run.module)  # rank 0's BN running stats everywhere: the model we save is the one evaluated
        if ema is not None:
            _broadcast_state(ema.model)  # its BN averages followed each rank's own statistics
    row = {"epoch": epoch + 1, "loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), "lr": lr,
           "train_img_per_s": float(loss_sum[1]) / dt, "epoch_seconds": dt}
    if _evaluates(cfg, epoch):
        # on a forked RNG: an evaluation (its data loader draws a seed) never changes the training
        # that follows, so eval_every may change between a run and its resumption
        cuda = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            ev = evaluate(ema.model if ema is not None else run.model, run.eval_set, cfg.eval_patch, run.device,
                          cfg.eval_batch_size, cfg.bf16, run.eval_defense, num_workers=run.eval_workers)
        row.update({f"eval_{k}": v for k, v in ev.items()})
    run.history.append(row)
    if run.rank == 0:
        _save_epoch(cfg, run.out, run.model, run.opt, run.gen, run.device, run.objective, run.train_set,
                    run.eval_set, run.resolved, run.history, run.world, run.eval_defense, ema)
        evaluated = (f" clean {row['eval_clean_acc']:.3f} cert {row['eval_cert_acc']:.3f}"
                     if "eval_cert_acc" in row else "")
        log.info("epoch %d/%d loss %.4f%s (%.0f img/s)", epoch + 1, cfg.epochs, row["loss"], evaluated,
                 row["train_img_per_s"])
    return row


def _evaluates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the 0-based ``epoch`` ends with an evaluation: every ``eval_every``-th and the last."""
    return cfg.eval_examples > 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
