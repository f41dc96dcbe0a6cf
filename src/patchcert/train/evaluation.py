"""Evaluation during training: the defense a model is evaluated with, and clean / certified
accuracy on the evaluation set (sharded over DDP ranks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..data import ImageSource, iterate_batches, to_float
from ..errors import PatchcertError
from ..loader import load_batches
from ..runtime import precise_math
from .distributed import _dist_info
from .objectives import OBJECTIVES, Objective

__all__ = ["default_eval_defense", "evaluate", "autocast"]


def default_eval_defense(objective: str, cfg: dict | None = None,
                         windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The defense a model trained with ``objective`` is evaluated (and deployed) with: what the
    objective declares (:meth:`patchcert.train.objectives.Objective.eval_defense`; an unregistered
    name gets the base class's default, voting on the local argmax).

    ``windows``: the evaluation threat's feature windows (PatchGuard's mask window covers
    them all).
    """
    return OBJECTIVES.get(objective, Objective).eval_defense(cfg or {}, windows)


def _make_defense(spec: dict[str, Any], model: Any, patch: str, image_size: tuple[int, int]):
    """The evaluation defense and patch threat, built as ``certify`` builds them for the model."""
    from ..planning import plan_threat
    from ..specs import DefenseSpec

    kw = dict(spec)
    name = kw.pop("name", None)
    if not isinstance(name, str):
        raise PatchcertError(f"eval_defense needs a 'name', got {spec!r}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    try:
        dps, pps = plan_threat([DefenseSpec(name, kw, name)], [patch], model.geometry, tuple(image_size))
    except PatchcertError as e:
        raise PatchcertError(f"eval_defense: {e}") from None
    return dps[0].defense, pps[0]


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` (CPU or CUDA alike)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSource, patch: str, device: torch.device, batch_size: int = 250,
             bf16: bool = False, defense: dict[str, Any] | None = None,
             num_workers: int | None = None) -> dict[str, float]:
    """Clean and certified accuracy of ``defense`` (default: sign voting, Condition 3.2) on ``data``.

    Under an initialised process group each rank evaluates ``data[rank::world]`` and the
    counts are summed, so every rank returns the accuracies on the whole set. A defense with an
    expensive pass (``eval_images``, e.g. double masking) is evaluated on that many images spread
    evenly over ``data`` (its early exit keeps it cheap). Images are read
    through :func:`patchcert.loader.load_batches` (``num_workers``); TF32 is off inside.
    """
    d, threat = _make_defense(defense or {"name": "voting", "binarize": "sign", "condition": "3.2"}, model, patch,
                              data.image_size)
    was = model.training
    model.eval()
    rank, world = _dist_info()
    n_eval = min(len(data), d.eval_images or len(data))  # an expensive defense evaluates a spread sample
    picked = torch.arange(len(data)) if n_eval == len(data) else torch.linspace(0, len(data) - 1, n_eval).round().long()
    share = picked[rank::world]
    counts = torch.zeros(2, dtype=torch.float64)
    batches = [share[idx] for idx in iterate_batches(len(share), batch_size, shuffle=False)]
    cuda = device.type == "cuda"
    with precise_math():
        for xb, yb, _ in load_batches(data, batches, num_workers, pin_memory=cuda):
            x = to_float(xb.to(device, non_blocking=cuda))
            y = yb.to(device, non_blocking=cuda)
            s = None
            if d.evidence_source == "scores":
                with autocast(device, bf16):
                    s = model.score_map(x).float()
            ev = d.compute_evidence(model, x, s, y)
            counts[0] += int((d.predict_evidence(ev).to(y.device) == y).sum())
            counts[1] += int(d.certify_threat(ev, y, threat).certified.sum())
    if world > 1:
        torch.distributed.all_reduce(counts)
    model.train(was)
    n = max(1, n_eval)
    return {"clean_acc": float(counts[0]) / n, "cert_acc": float(counts[1]) / n}
