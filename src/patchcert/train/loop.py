"""The training loop: one config -> a run directory, resumable, atomic, DDP-aware.

Run directory::

    config.json          the resolved TrainConfig (+ versions)
    log.csv              one row per epoch (loss, lr, throughput, eval accuracies)
    state.safetensors    model + optimizer + RNG state after the last finished epoch (resume)
    model.safetensors    the model after the last finished epoch (+ model.json metadata)

Resuming (``resume=True``) continues after the last finished epoch with the same RNG
state, so an interrupted run ends with the same weights as an uninterrupted one.
Under ``torchrun`` every rank sees the same shuffled order and takes its share of each
global batch; rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint import atomic_write_text, load_tensors, save_checkpoint, save_tensors, versions
from ..data import ImageDataset, augment_crop_flip, iterate_batches, load_dataset, to_float
from ..errors import PatchcertError
from ..geometry import patch_windows
from ..models import create_model
from .objectives import bagcert_loss, cross_entropy_map

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "lr_at", "evaluate", "OBJECTIVES"]


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    model: str = "bagcert_cifar"
    model_cfg: dict = field(default_factory=lambda: {"rf": 7, "width": 64})
    dataset: str = "cifar10"
    data_dir: str | None = None
    objective: str = "bagcert"  # bagcert | ce | (more registered in OBJECTIVES)
    objective_cfg: dict = field(default_factory=lambda: {"margin": 0.5, "sigma": 0.0})
    epochs: int = 30
    batch_size: int = 96
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PatchcertError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        import tomllib

        p = Path(path)
        if not p.is_file():
            raise PatchcertError(f"config file {str(p)!r} does not exist")
        try:
            d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise PatchcertError(f"{p}: cannot parse config ({e})") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise PatchcertError("epochs, batch_size and lr must be positive")
        if self.objective not in OBJECTIVES:
            raise PatchcertError(f"unknown objective {self.objective!r}; known: {', '.join(sorted(OBJECTIVES))}")


# objective name -> fn(scores, labels, model, **cfg) -> loss
def _obj_bagcert(scores, labels, model, margin: float = 0.5, sigma: float = 0.0):
    return bagcert_loss(scores, labels, margin=margin, sigma=sigma)


def _obj_ce(scores, labels, model):
    return cross_entropy_map(scores, labels)


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {"bagcert": _obj_bagcert, "ce": _obj_ce}


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to 0 (per optimiser step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, patch: str, device: torch.device, batch_size: int = 250,
             bf16: bool = False) -> dict[str, float]:
    """Clean and Condition-3.2 certified accuracy of sign-voting on ``data``."""
    from ..defenses import create_defense

    was = model.training
    model.eval()
    windows = patch_windows(model, patch, data.image_size)
    d = create_defense("voting", binarize="sign", condition="3.2")
    clean = cert = 0
    for idx in iterate_batches(len(data), batch_size, shuffle=False):
        x = to_float(data.images[idx]).to(device)
        y = data.labels[idx].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            s = model.score_map(x)
        s = s.float()
        clean += int((d.predict(s) == y).sum())
        cert += int(d.certify(s, y, windows).sum())
    model.train(was)
    n = max(1, len(data))
    return {"clean_acc": clean / n, "cert_acc": cert / n}


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


def _comparable(cfg: dict) -> dict:
    # options that may change between a run and its resumption without changing the result
    return {k: v for k, v in cfg.items() if k not in ("device", "num_threads", "out_dir", "data_dir", "eval_batch_size")}


def train(cfg: TrainConfig, resume: bool = False,
          on_step: Callable[[int, int, float], None] | None = None,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the final metrics. ``on_step(done, total, loss)`` reports progress.

    ``stop_after_epoch`` ends the call after that epoch (used to test resumption).
    """
    cfg.validate()
    device = torch.device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    started_dist = _maybe_init_distributed(device)
    rank, world = _dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(cfg.out_dir)
    try:
        train_set = load_dataset(cfg.dataset, cfg.data_dir, train=True)
        eval_set = load_dataset(cfg.dataset, cfg.data_dir, train=False)
        if cfg.max_train_examples:
            train_set = train_set.subset(cfg.max_train_examples)
        eval_set = eval_set.subset(cfg.eval_examples)

        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=train_set.num_classes, **cfg.model_cfg).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        start_epoch = 0
        history: list[dict] = []
        resolved = asdict(cfg)
        state_path = out / "state.safetensors"
        if resume and state_path.exists():
            tensors, meta = load_tensors(state_path)
            if _comparable(meta["config"]) != _comparable(resolved):
                diff = sorted(k for k in set(_comparable(resolved)) | set(_comparable(meta["config"]))
                              if _comparable(resolved).get(k) != _comparable(meta["config"]).get(k))
                raise PatchcertError(f"cannot resume {out}: config differs from the saved run in {', '.join(diff)}")
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            _restore_optimizer(opt, tensors, meta["optimizer"])
            gen.set_state(tensors["rng.data"])
            torch.set_rng_state(tensors["rng.torch"])
            start_epoch = int(meta["epoch"])
            history = list(meta.get("history", []))
            log.info("resuming %s after epoch %d", out, start_epoch)
        elif state_path.exists() and rank == 0:
            raise PatchcertError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps({**resolved, "versions": versions()}, indent=2) + "\n")

        n = len(train_set)
        steps_per_epoch = n // cfg.batch_size  # drop_last: every step sees a full batch
        if steps_per_epoch < 1:
            raise PatchcertError(f"batch size {cfg.batch_size} is larger than the training set ({n})")
        total = steps_per_epoch * cfg.epochs
        warm = int(round(cfg.warmup_epochs * steps_per_epoch))
        objective = OBJECTIVES[cfg.objective]
        metrics: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            t0 = time.perf_counter()
            loss_sum, seen = 0.0, 0
            for it, idx in enumerate(iterate_batches(n, cfg.batch_size, shuffle=True, generator=gen, drop_last=True)):
                step = epoch * steps_per_epoch + it
                lr = lr_at(step, total, warm, cfg.lr)
                for gp in opt.param_groups:
                    gp["lr"] = lr
                xb = train_set.images[idx]
                if cfg.augment:
                    xb = augment_crop_flip(xb, 4, generator=gen)
                xb = xb[rank::world]
                yb = train_set.labels[idx][rank::world].to(device)
                x = to_float(xb).to(device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    scores = net(x)
                loss = objective(scores, yb, model, **cfg.objective_cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().item() * len(yb)
                seen += len(yb)
                if on_step is not None and rank == 0:
                    on_step(step + 1 - start_epoch * steps_per_epoch, total - start_epoch * steps_per_epoch, loss.detach().item())
            dt = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "lr": lr,
                   "train_img_per_s": seen * world / dt, "epoch_seconds": dt}
            if rank == 0:
                ev = evaluate(model, eval_set, cfg.eval_patch, device, cfg.eval_batch_size, cfg.bf16)
                row.update({f"eval_{k}": v for k, v in ev.items()})
                history.append(row)
                metrics = row
                _write_csv(out / "log.csv", history)
                meta = {"config": resolved, "epoch": epoch + 1, "history": history,
                        "optimizer": _optimizer_tensors(opt)[1]}
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                tensors.update(_optimizer_tensors(opt)[0])
                tensors["rng.data"] = gen.get_state()
                tensors["rng.torch"] = torch.get_rng_state()
                save_checkpoint(out / "model.safetensors", model, classes=list(train_set.classes),
                                data=train_set.info, epoch=epoch + 1, metrics=row,
                                train_config=resolved, eval={"examples": len(eval_set), "patch": cfg.eval_patch})
                save_tensors(state_path, tensors, meta)  # last: the state names a finished epoch
                log.info("epoch %d/%d loss %.4f clean %.3f cert %.3f (%.0f img/s)", epoch + 1, cfg.epochs,
                         row["loss"], row.get("eval_clean_acc", float("nan")), row.get("eval_cert_acc", float("nan")),
                         row["train_img_per_s"])
            if world > 1:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        return metrics
    finally:
        if started_dist:
            torch.distributed.destroy_process_group()


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
