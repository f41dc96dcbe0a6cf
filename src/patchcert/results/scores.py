"""Cached score maps (``scores.safetensors``, ``--save-scores`` / ``--scores FILE``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import file_sha256, load_tensors, save_tensors
from ..errors import PatchcertError, not_found


@dataclass
class ScoreFile:
    """Cached score maps: ``scores`` float32 ``[N, K, H, W]``, ``labels`` int64 ``[N]``,
    ``indices`` int64 ``[N]`` (dataset indices) and metadata (``geometry``, ``image_size``,
    ``model``, ``model_sha256``, ``classes``, ``data``, ...)."""

    scores: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    meta: dict[str, Any]
    path: str | None = None
    sha256: str | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def save_scores(path: str | os.PathLike, scores: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                meta: Mapping[str, Any]) -> None:
    """Atomically write a score file (scores stored as float32, as the model produced them)."""
    save_tensors(path, {"scores": scores.to(torch.float32), "labels": labels.to(torch.int64),
                        "indices": indices.to(torch.int64)}, dict(meta))


def load_scores(path: str | os.PathLike) -> ScoreFile:
    """Read and validate a score file (``--scores FILE``)."""
    p = Path(path)
    if not p.is_file():
        raise PatchcertError(not_found("score file", p, folder=False))
    try:
        tensors, meta = load_tensors(p)
    except PatchcertError as e:
        raise PatchcertError(f"score file: {e}") from None
    missing = [k for k in ("scores", "labels", "indices") if k not in tensors]
    if missing:
        raise PatchcertError(f"{p}: score file lacks tensor(s) {', '.join(missing)}")
    s, y, idx = tensors["scores"], tensors["labels"], tensors["indices"]
    if s.dim() != 4 or not s.is_floating_point():
        raise PatchcertError(f"{p}: 'scores' must be a float tensor [N, K, H, W], got {s.dtype} {tuple(s.shape)}")
    n, k = s.shape[0], s.shape[1]
    if y.shape != (n,) or idx.shape != (n,) or y.dtype != torch.int64 or idx.dtype != torch.int64:
        raise PatchcertError(f"{p}: 'labels' and 'indices' must be int64 [{n}]")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise PatchcertError(f"{p}: labels outside 0..{k - 1} for {k}-class scores")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise PatchcertError(f"{p}: metadata 'classes' must be a list of class names, got {classes!r:.60}")
    for key in ("data", "model_config", "geometry"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise PatchcertError(f"{p}: metadata {key!r} must be an object, got {meta[key]!r:.60}")
    if classes is not None and len(classes) != k:
        raise PatchcertError(f"{p}: {k}-class scores but the metadata lists {len(classes)} classes")
    for key in ("geometry", "image_size"):
        if key not in meta:
            raise PatchcertError(f"{p}: score file metadata lacks {key!r}")
    if n and len(set(idx.tolist())) != n:
        raise PatchcertError(f"{p}: duplicate example indices")
    return ScoreFile(s, y, idx, meta, str(p), file_sha256(p))
