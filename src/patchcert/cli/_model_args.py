"""The user's own classifier on the command line (``patchcert certify`` / ``attack``).

``--model FILE.py:FACTORY`` (a file of the user's), ``--model package.module:FACTORY`` (an
importable module), ``--model torchvision:NAME`` / ``--model timm:NAME`` (when those packages
are installed; never downloads weights) build an ``nn.Module`` mapping float images in
[0, 1] to logits ``[N, K]`` by calling ``FACTORY(**model_cfg)``; ``--weights FILE`` loads its
state dict (``.safetensors``, or a ``torch.load(weights_only=True)`` file; a pickled model is
refused); ``--mean``/``--std`` (numbers or a preset: ``imagenet``, ``cifar10``, ``none``) set
the normalisation applied in front of it. The number of classes comes from its output, the
input size from the data. ``--indices`` / ``--subset`` select the examples
(:mod:`patchcert.selection`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, PatchcertError, not_found

log = logging.getLogger("patchcert.cli")

__all__ = ["add_user_model_arguments", "is_user_model", "build_user_model", "load_user_model_and_data",
           "selection_kwargs"]

_SPEC = re.compile(r"^(?P<src>.+\.py|[A-Za-z_][\w.]*):(?P<fn>[A-Za-z_][\w.]*)$")
_HUBS = ("torchvision", "timm")


def add_user_model_arguments(g) -> None:
    g.add_argument("--weights", metavar="FILE", help="weights of a --model FILE.py:FACTORY / module:FACTORY / "
                                                     "torchvision:NAME / timm:NAME model (.safetensors, or a state "
                                                     "dict read with torch.load(weights_only=True))")
    g.add_argument("--mean", metavar="M", help="normalisation in front of such a model: 'imagenet', 'cifar10', "
                                               "'none' or per-channel numbers '0.5,0.5,0.5' (default: none; "
                                               "imagenet for torchvision:/timm:)")
    g.add_argument("--std", metavar="S", help="per-channel std '0.25,0.25,0.25' (with numeric --mean)")
    g.add_argument("--indices", metavar="I,J,...", help="certify these dataset examples (e.g. '3,17,40-49')")
    g.add_argument("--subset", metavar="random:N", help="N distinct examples drawn with --seed (sorted; recorded in "
                                                        "the run, so --resume takes the same)")


def is_user_model(name: str | None) -> bool:
    if not name:
        return False
    hub = name.split(":", 1)[0]
    return hub in _HUBS and ":" in name or _SPEC.match(name) is not None


def _norm_arg(v: str | None, flag: str) -> Any:
    if v is None:
        return None
    v = v.strip()
    if re.fullmatch(r"[A-Za-z][\w-]*", v):
        return v
    try:
        return [float(a) for a in v.split(",")]
    except ValueError:
        raise PatchcertError(f"{flag} must be a preset (imagenet, cifar10, none) or numbers like "
                             f"'0.5,0.5,0.5', got {v!r}") from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise PatchcertError("--model: " + not_found("file", path, folder=False))
    name = f"patchcert_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PatchcertError(f"--model: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # the user's file may import its neighbours
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's code: any error becomes one line
        raise PatchcertError(f"--model: importing {path} failed ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return mod


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _factory(spec: str) -> tuple[Any, str]:
    """The callable a ``--model`` spec names, and a label for messages."""
    hub, _, rest = spec.partition(":")
    if hub == "torchvision":
        try:
            import torchvision  # noqa: F401
            from torchvision.models import get_model, list_models
        except Exception as e:  # ImportError, or a torchvision built for another torch
            raise PatchcertError(f"--model {spec}: torchvision is not usable here ({_first_line(e)}); see the README "
                                 "(Certify your own model) for an install that matches torch") from None
        if rest not in list_models():
            raise PatchcertError(f"--model {spec}: torchvision has no model {rest!r}")
        return (lambda **kw: get_model(rest, weights=None, **kw)), spec
    if hub == "timm":
        try:
            import timm
        except Exception as e:
            raise PatchcertError(f"--model {spec}: timm is not usable here ({_first_line(e)}); pip install timm "
                                 "(see the README, Certify your own model)") from None
        if not timm.is_model(rest):
            raise PatchcertError(f"--model {spec}: timm has no model {rest!r}")
        return (lambda **kw: timm.create_model(rest, pretrained=False, **kw)), spec
    m = _SPEC.match(spec)
    assert m is not None
    src, fn = m.group("src"), m.group("fn")
    if src.endswith(".py"):
        mod = _import_file(Path(src))
    else:
        try:
            mod = importlib.import_module(src)
        except Exception as e:
            raise PatchcertError(f"--model {spec}: cannot import {src} ({type(e).__name__}: {_first_line(e)})") from None
    obj: Any = mod
    for part in fn.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(mod) if callable(getattr(mod, n)) and not n.startswith("_"))
            raise PatchcertError(f"--model {spec}: {src} defines no {fn!r} (callables: {', '.join(names) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PatchcertError(f"--model {spec}: {fn!r} is not callable")
    return obj, spec


def load_weights(module: Any, path: str) -> str:
    """Load ``path`` (safetensors, or a state dict via ``torch.load(weights_only=True)``) into
    ``module`` (strict); returns the file's sha256."""
    import torch

    from ..checkpoint import check_readable, file_sha256, torch_load_weights

    p = check_readable(path, what="--weights file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except Exception as e:  # SafetensorError and friends
            raise CheckpointError(f"--weights {path}: not a valid safetensors file ({_first_line(e)})") from None
    else:
        try:  # one line for a corrupt file or a pickled model (nothing in it runs), without torch's warnings
            sd = torch_load_weights(p)
        except CheckpointError as e:
            raise CheckpointError(f"--weights: {e}; save model.state_dict(), or use safetensors.torch.save_file") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"--weights {path}: expected a state dict (name -> tensor)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(f"--weights {path} does not match the model: " + "; ".join(parts))
    module.load_state_dict(sd, strict=True)
    return file_sha256(p)


def build_user_model(spec: str, weights: str | None, mean: str | None, std: str | None,
                     model_cfg: dict[str, Any]) -> Any:
    """The ``--model`` spec's module, with its weights, wrapped for patchcert."""
    import torch.nn as nn

    from ..models.classifier import wrap_classifier

    fn, label = _factory(spec)
    try:
        module = fn(**model_cfg)
    except PatchcertError:
        raise
    except Exception as e:  # the user's factory
        raise PatchcertError(f"--model {label}: calling the factory failed ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(module, nn.Module):
        raise PatchcertError(f"--model {label}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    cfg: dict[str, Any] = {"source": spec, "model_cfg": model_cfg}
    if weights:
        cfg["weights"] = str(weights)
        cfg["weights_sha256"] = load_weights(module, weights)
    else:
        log.warning("--model %s has no --weights: it is randomly initialised, and its certificates say nothing "
                    "about a trained model", label)
    m, s = _norm_arg(mean, "--mean"), _norm_arg(std, "--std")
    if m is None and s is None and spec.split(":", 1)[0] in _HUBS:
        m = "imagenet"
        log.info("%s: normalising with the ImageNet mean/std (--mean none to switch off)", label)
    clf = wrap_classifier(module, mean=m, std=s, name=label)
    clf.config.update(cfg)
    return clf


def load_user_model_and_data(args: argparse.Namespace, device: Any, load_data: Any) -> tuple[Any, Any]:
    """``(model, data)`` for a user model: the data first (``--dataset``, default cifar10), then
    the module's number of classes from its output on the data's image size."""
    from .certify import _json_object

    cfg = _json_object(args.model_cfg, "--model-cfg")
    model = build_user_model(args.model, args.weights, args.mean, args.std, cfg)
    data = load_data(args.dataset or "cifar10", args, None, None)
    model.to(device)
    model.infer_num_classes(data.image_size)
    return model, data


def check_user_model_args(args: argparse.Namespace) -> None:
    """--weights/--mean/--std belong to a user model."""
    if not is_user_model(getattr(args, "model", None)):
        for flag in ("weights", "mean", "std"):
            if getattr(args, flag, None) is not None:
                raise PatchcertError(f"--{flag} applies to --model FILE.py:FACTORY, module:FACTORY, torchvision:NAME "
                                     "or timm:NAME (a patchcert checkpoint carries its own)")


def selection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``indices``/``subset`` for certify_dataset / attack_dataset from the options."""
    if getattr(args, "indices", None) and getattr(args, "subset", None):
        raise PatchcertError("give --indices or --subset, not both")
    return {"indices": getattr(args, "indices", None), "subset": getattr(args, "subset", None)}
