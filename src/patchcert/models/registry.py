"""timm-style model registry: ``@register_model`` + ``create_model(name, **cfg)``."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, PatchcertError

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint", "count_parameters", "load_model"]

log = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise RuntimeError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise PatchcertError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, num_classes: int | None = None, **cfg) -> nn.Module:
    """Build a registered model. ``cfg`` are the factory's keyword arguments.

    ``num_classes=None`` keeps the factory's default (10 for CIFAR models, 1000 for ImageNet ones).
    """
    fn = model_entrypoint(name)
    if num_classes is None:
        default = inspect.signature(fn).parameters.get("num_classes")
        num_classes = default.default if default is not None and default.default is not inspect.Parameter.empty else 10
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise PatchcertError(f"num_classes must be a positive int, got {num_classes!r}")
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        unknown = [k for k in cfg if k not in params]
        if unknown:
            raise PatchcertError(
                f"model {name!r} does not take option(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(p for p in params if p != 'num_classes')}"
            )
    try:
        _check_size(name, fn, num_classes, cfg)
        return fn(num_classes=num_classes, **cfg)
    except PatchcertError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # an option of the wrong type, deep in a factory
        opts = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        raise PatchcertError(f"model {name!r} cannot be built from its options ({opts}): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _memory_bytes() -> int:
    """Physical memory of this machine (64 GiB if it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 64 << 30


def count_parameters(name: str, num_classes: int, **cfg: Any) -> int | None:
    """Parameters + buffers of ``create_model(name, num_classes, **cfg)``, counted on the meta
    device (nothing is allocated). None when the factory cannot run on the meta device."""
    fn = model_entrypoint(name)
    try:
        with torch.device("meta"):
            m = fn(num_classes=num_classes, **cfg)
    except (RuntimeError, NotImplementedError) as e:  # e.g. an op without a meta kernel
        log.debug("cannot size %s on the meta device (%s)", name, e)
        return None
    return sum(t.numel() for t in m.parameters()) + sum(t.numel() for t in m.buffers())


def _check_size(name: str, fn: Callable[..., nn.Module], num_classes: int, cfg: dict[str, Any]) -> None:
    """Refuse, before allocating anything, a model whose float32 weights alone exceed the memory."""
    n = count_parameters(name, num_classes, **cfg)
    if n is None:
        return
    need, have = 4 * n, _memory_bytes()
    if need > have:
        opts = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        raise PatchcertError(f"model {name!r}{f' ({opts})' if opts else ''} would have {n:.3g} parameters "
                             f"({need / 2**30:.3g} GiB in float32), more than this machine's "
                             f"{have / 2**30:.3g} GiB of memory; choose a smaller model")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a registered model from a patchcert checkpoint, in eval mode."""
    state, meta = load_checkpoint(path)
    arch = meta.get("arch")
    if not arch:
        raise CheckpointError(f"{path}: checkpoint metadata names no architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: checkpoint metadata 'arch' must be a model name, got {arch!r:.60}")
    cfg = meta.get("config") or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: checkpoint config is not an object")
    try:  # create_model checks num_classes (a positive int) and the options
        model = create_model(arch, num_classes=meta.get("num_classes", 10), **cfg)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build {arch!r} from its metadata ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not match {arch!r} ({first[1].strip() if len(first) > 1 else first[0]})") from None
    model.checkpoint_meta = meta  # type: ignore[attr-defined]
    model.checkpoint_path = str(path)  # type: ignore[attr-defined]
    return model.to(device).eval()
