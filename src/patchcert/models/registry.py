"""timm-style model registry: ``@register_model`` + ``create_model(name, **cfg)``."""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ..errors import PatchcertError

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint"]

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
    return fn(num_classes=num_classes, **cfg)
