"""The training state of a run folder: optimizer and RNG states in ``state.safetensors``, the
per-epoch log and model checkpoint, and restoring all of it on resume (see :mod:`.loop`)."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import load_tensors, atomic_write_text, save_checkpoint, save_tensors
from ..data import ImageSource
from ..errors import CheckpointError, PatchcertError
from .config import TrainConfig, _config_diff
from .ema import WeightEma
from .objectives import Objective

log = logging.getLogger(__name__)

__all__ = ["init_weights"]


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
        from .options import EXTEND_HINT

        hint = f"; {EXTEND_HINT}" if diff == ["epochs"] else ""
        raise PatchcertError(f"cannot resume {out}: config differs from the saved run in {', '.join(diff)}{hint}")
    return saved


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
