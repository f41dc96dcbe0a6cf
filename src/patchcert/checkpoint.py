"""Checkpoints: safetensors weights with the JSON metadata in the file's own header.

A checkpoint is one ``.safetensors`` file whose header metadata key ``"patchcert"``
holds JSON: architecture, config, geometry, classes, normalisation, data, epoch,
metrics, versions. A copy of that JSON is written beside it (``<name>.json``) for
people; loading reads only the safetensors file. Nothing is ever unpickled; legacy
``.pth``/``.pt`` files go through ``torch.load(weights_only=True)`` only.

Writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = [
    "check_readable",
    "torch_load_weights",
    "save_checkpoint",
    "portable_metadata",
    "load_checkpoint",
    "read_metadata",
    "file_sha256",
    "atomic_write_bytes",
    "atomic_write_text",
    "versions",
    "save_tensors",
    "load_tensors",
]

META_KEY = "patchcert"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from . import __version__

    return {"patchcert": __version__, "torch": torch.__version__, "python": platform.python_version()}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and weights are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk, a file size limit ...: name the file being written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write tensors + JSON metadata as one safetensors file."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = save(flat, metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
    atomic_write_bytes(path, blob)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_tensors`; clear error on anything else."""
    from safetensors import safe_open

    path = check_readable(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file has no patchcert metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt patchcert metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: patchcert metadata is not a JSON object")
    return tensors, meta


def model_metadata(model: nn.Module, **extra: Any) -> dict[str, Any]:
    meta = {
        "format": FORMAT_VERSION,
        "arch": getattr(model, "arch", type(model).__name__),
        "config": dict(getattr(model, "config", {})),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "geometry": model.geometry.to_dict() if hasattr(model, "geometry") else None,
        "normalization": {
            "mean": [float(v) for v in model.mean.flatten()] if hasattr(model, "mean") else None,
            "std": [float(v) for v in model.std.flatten()] if hasattr(model, "std") else None,
        },
        "versions": versions(),
    }
    meta.update(extra)
    return meta


def portable_metadata(obj: Any) -> Any:
    """``obj`` with every absolute path replaced by its last component (``/home/me/data/cifar-10-batches-py``
    -> ``cifar-10-batches-py``; also ``../shared/data/...``): a checkpoint must not carry the layout
    of the machine it was trained on. Relative paths below the working folder (``runs/x``) and
    other strings are kept."""
    if isinstance(obj, dict):
        return {k: portable_metadata(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_metadata(v) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~") or obj.startswith("../")):
        return Path(obj).name
    return obj


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, write_json: bool = True, **meta: Any) -> dict[str, Any]:
    """Save model weights + metadata (``classes``, ``data``, ``epoch``, ``metrics``, ...).

    Absolute paths in the metadata are reduced to their last component (:func:`portable_metadata`)."""
    md = portable_metadata(model_metadata(model, **meta))
    save_tensors(path, model.state_dict(), md)
    if write_json:
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(md, indent=2, sort_keys=True) + "\n")
    return md


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return load_tensors(path)[1]


def check_readable(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a Path if it is a readable file; else a one-line CheckpointError saying why
    (missing, a folder, permission denied, ...)."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{what} {str(p)!r} is a folder, not a file")
    if not p.exists():
        raise CheckpointError(f"{what} {str(p)!r} does not exist")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        hint = "; check the permissions" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise CheckpointError(f"cannot read {what} {str(p)!r}: {e.strerror or e}{hint}") from None
    return p


_CORRUPT = ("PytorchStreamReader", "zip archive", "truncated", "central directory", "EOF", "unexpected end")


def torch_load_weights(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors: a truncated or
    corrupt file is called so, and a file whose pickle would build objects or call functions is
    refused (nothing in it runs). torch's own warnings about the pickle (e.g. "Detected pickle
    protocol 5") are noise beside that error and are not shown."""
    p = check_readable(path)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (corrupt or truncated)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        hostile = "Weights only load failed" in text or "WeightsUnpickler" in text
        if not hostile and (isinstance(e, (EOFError, struct.error)) or any(m in text for m in _CORRUPT)):
            raise CheckpointError(f"{p}: corrupt or truncated ({type(e).__name__}: "
                                  f"{text.strip().splitlines()[0][:100] if text.strip() else 'end of file'})") from None
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
        reason = " ".join((m.group(1) if m else text).split())[:140]
        raise CheckpointError(f"{p}: refused to load ({type(e).__name__}: {reason}); only plain tensor files are "
                              "read (torch.load with weights_only=True), nothing in the file was run") from None


def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
    obj = torch_load_weights(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict + metadata of a checkpoint (safetensors; ``.pth`` via weights_only)."""
    path = check_readable(path)
    if path.suffix in (".pth", ".pt", ".tar", ".ckpt"):
        return _load_legacy(path), {}
    return load_tensors(path)
