"""Shipped pretrained weights: ``src/patchcert/weights/<name>.safetensors`` (+ ``<name>.json``).

Each shipped model is a patchcert checkpoint (safetensors with its JSON metadata in the
header; the ``.json`` beside it is a human-readable copy and may add ``sha256``, the file's
digest, which is then verified on load). The folder can be overridden with the
``PATCHCERT_WEIGHTS_DIR`` environment variable or the ``weights_dir`` argument.

    >>> from patchcert.pretrained import list_pretrained, load_pretrained
    >>> [m["name"] for m in list_pretrained()]          # doctest: +SKIP
    >>> model = load_pretrained()                        # the default CIFAR-10 model  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PatchcertError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "WEIGHTS_ENV", "weights_dir", "list_pretrained", "pretrained_path", "load_pretrained"]

#: The model ``patchcert certify`` uses when no ``--model`` is given.
DEFAULT_MODEL = "bagcert_cifar10_s2_rf6_w192"
#: Environment variable that points the registry at another weights folder.
WEIGHTS_ENV = "PATCHCERT_WEIGHTS_DIR"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The weights folder: the argument, else ``$PATCHCERT_WEIGHTS_DIR``, else the package's own."""
    if path is not None:
        return Path(path)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent / "weights"


def _sidecar(p: Path) -> dict[str, Any]:
    j = p.with_suffix(".json")
    if not j.is_file():
        return {}
    try:
        d = json.loads(j.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        log.warning("%s: unreadable metadata (%s)", j, e)
        return {}
    return d if isinstance(d, dict) else {}


def list_pretrained(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every shipped model: ``{"name", "path", "default", **metadata from <name>.json}``, by name."""
    d = weights_dir(directory)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.safetensors")):
        meta = _sidecar(p)
        out.append({**meta, "name": p.stem, "path": str(p), "default": p.stem == DEFAULT_MODEL})
    return out


def pretrained_path(name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Path of a shipped model's weights (the default model when ``name`` is None).

    Raises a one-line PatchcertError when the name is malformed or the file is not shipped.
    """
    name = DEFAULT_MODEL if name is None else name
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".safetensors"):
        raise PatchcertError(f"malformed pretrained model name {name!r}")
    d = weights_dir(directory)
    p = d / f"{name}.safetensors"
    if not p.is_file():
        have = [m["name"] for m in list_pretrained(d)]
        shipped = f"shipped: {', '.join(have)}" if have else "this installation ships none yet"
        raise PatchcertError(f"no shipped model {name!r} in {d} ({shipped}); pass --model NAME_OR_CHECKPOINT")
    return p


def load_pretrained(name: str | None = None, device: str | torch.device = "cpu",
                    directory: str | os.PathLike | None = None) -> torch.nn.Module:
    """Load a shipped model (the default when ``name`` is None) in eval mode on ``device``.

    If ``<name>.json`` records a ``sha256``, the weights file must match it.
    """
    from .checkpoint import file_sha256
    from .models import load_model

    p = pretrained_path(name, directory)
    want = _sidecar(p).get("sha256")
    if isinstance(want, str) and want:
        got = file_sha256(p)
        if got != want:
            raise CheckpointError(f"{p}: SHA-256 {got[:12]}... does not match the shipped {want[:12]}... (corrupt?)")
    model = load_model(p, device=device)
    model.pretrained_name = p.stem  # type: ignore[attr-defined]
    return model
