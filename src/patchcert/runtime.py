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

__all__ = ["tune_allocator", "bound_allocator", "check_seed", "harden", "resolve_device", "math_mode", "precise_math"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator() -> bool:
    """Stop glibc from trimming/mmapping big blocks (re-faulting pages halves conv speed on CPU).

    Measured here (benchmarks/train_speed.md): bagcert_cifar width 64 inference 123 -> 376 img/s.
    A no-op where glibc's ``mallopt`` is absent. Returns True if applied.
    """
    global _tuned
    if _tuned:
        return _tuned
    _tuned = _mallopt(((_M_TRIM_THRESHOLD, 1 << 30), (_M_MMAP_THRESHOLD, 1 << 30)))
    return _tuned


# glibc's defaults (mallopt(3)); set explicitly, they switch off its dynamic mmap threshold.
_BOUNDED_THRESHOLD = 128 * 1024


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    if os.environ.get("PATCHCERT_NO_MALLOPT"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):
        return False


def bound_allocator() -> bool:
    """Fixed glibc thresholds for processes whose heap must not creep: DataLoader workers.

    By default glibc raises its mmap threshold to the size of every large block it frees (up to
    32 MiB): after a worker frees its first batch tensor, decoded images (150-500 KB each) come
    from the heap, and the varying sizes fragment it. A worker's heap then grows by ~1 MiB per
    batch for thousands of batches (``benchmarks/data_memory.md``: +100 MiB per worker per
    2,000 images). Fixing the thresholds at glibc's own defaults (128 KiB; setting them
    explicitly disables the dynamic adjustment) gives every image its own mapping, returned to
    the OS when freed: the workers stay flat. It also undoes :func:`tune_allocator` in a worker
    forked from a tuned parent. A no-op without glibc or with ``$PATCHCERT_NO_MALLOPT``.
    """
    return _mallopt(((_M_MMAP_THRESHOLD, _BOUNDED_THRESHOLD), (_M_TRIM_THRESHOLD, _BOUNDED_THRESHOLD)))


MAX_SEED = 2**63 - 1


def check_seed(seed: object, name: str = "--seed") -> None:
    """One line unless ``seed`` is an integer every generator takes (0 .. 2**63-1)."""
    from .errors import PatchcertError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PatchcertError(f"{name} must be an integer in [0, 2**63-1], got {seed!r}")


def harden(seed: int | None = 0, deterministic: bool = False) -> None:
    """Seeds everywhere, TF32 off (float32 means float32), optional deterministic algorithms."""
    if seed is not None:
        check_seed(seed)
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
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PatchcertError(f"device {str(device)!r} cannot run a model here; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PatchcertError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PatchcertError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PatchcertError(f"device {device!r} requested but MPS is not available")
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
