"""Process-level setup: allocator tuning, threads, determinism (alpha-beta-CROWN style hardening)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["tune_allocator", "harden", "resolve_device", "math_mode", "precise_math"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator() -> bool:
    """Stop glibc from trimming/mmapping big blocks (re-faulting pages halves conv speed on CPU).

    Measured here (benchmarks/train_speed.md): bagcert_cifar width 64 inference 123 -> 376 img/s.
    A no-op where glibc's ``mallopt`` is absent. Returns True if applied.
    """
    global _tuned
    if _tuned or os.environ.get("PATCHCERT_NO_MALLOPT"):
        return _tuned
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


def harden(seed: int | None = 0, deterministic: bool = False) -> None:
    """Seeds everywhere, TF32 off (float32 means float32), optional deterministic algorithms."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'auto'``/None -> cuda if available else cpu; validates the name."""
    from .errors import PatchcertError

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PatchcertError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PatchcertError(f"device {device!r} requested but CUDA is not available")
    return dev


@contextmanager
def math_mode(tf32: bool = False, cudnn_benchmark: bool | None = None) -> Iterator[None]:
    """Within the block: TF32 matmuls/convolutions allowed or not, cuDNN autotuning on/off
    (``None``: unchanged); the previous settings come back on exit, also after an exception.

    Only the ``torch.backends.*.allow_tf32`` flags are touched (mixing them with
    ``torch.set_float32_matmul_precision`` is an error in recent PyTorch). On a CPU these
    flags change nothing.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def precise_math() -> AbstractContextManager[None]:
    """Certification arithmetic: TF32 off and no cuDNN autotuning inside the block, restored after
    (a float32 model pass means float32; certificates are then computed in float64)."""
    return math_mode(tf32=False, cudnn_benchmark=False)
