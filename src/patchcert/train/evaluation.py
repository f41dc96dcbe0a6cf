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
    """The evaluation defense and patch threat (their plans), built as ``certify`` builds them
    for the model."""
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
    return dps[0], pps[0]


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` (CPU or CUDA alike)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSource, patch: str, device: torch.device, batch_size: int = 250,
             bf16: bool = False, defense: dict[str, Any] | None = None,
             num_workers: int | None = None) -> dict[str, float]:
    """Clean and certified accuracy of ``defense`` (default: sign voting, Condition 3.2) on ``data``.

    The one run loop of ``certify`` and ``attack`` (:func:`patchcert.runs.run_batches`), with
    certify's per-batch function (:func:`patchcert.batch.certify_batch`, the very records of a
    certify run) and its counter; nothing is written. Under an initialised process group each
    rank evaluates ``data[rank::world]`` and the counts are summed, so every rank returns the
    accuracies on the whole set. A defense with an expensive pass (``eval_images``, e.g. double
    masking) is evaluated on that many images spread evenly over ``data`` (its early exit keeps
    it cheap). Images are read through :func:`patchcert.loader.load_batches` (``num_workers``);
    TF32 is off inside.
    """
    from ..batch import batch_evidence, certify_batch
    from ..results import ResultRow, SummaryCounter
    from ..runs import BatchResult, run_batches

    dp, pp = _make_defense(defense or {"name": "voting", "binarize": "sign", "condition": "3.2"}, model, patch,
                           data.image_size)
    was = model.training
    model.eval()
    rank, world = _dist_info()
    n_eval = min(len(data), dp.defense.eval_images or len(data))  # an expensive defense evaluates a spread sample
    picked = torch.arange(len(data)) if n_eval == len(data) else torch.linspace(0, len(data) - 1, n_eval).round().long()
    share = picked[rank::world]
    counter = SummaryCounter([ResultRow(defense=dp.key, defense_config=dp.config, patch=pp.text, resolved=pp.resolved,
                                        windows=[list(w) for w in pp.windows], clean_accuracy=0.0,
                                        certified_accuracy=0.0, certify_seconds_per_image=None)])
    batches = [share[idx] for idx in iterate_batches(len(share), batch_size, shuffle=False)]
    cuda = device.type == "cuda"

    def step(item: Any) -> BatchResult:
        xb, yb, idx = item
        x = to_float(xb.to(device, non_blocking=cuda))
        y = yb.to(device, non_blocking=cuda)
        with autocast(device, bf16):
            s = model.score_map(x).float()  # the evidence of score-map defenses; the undefended prediction
        ev = batch_evidence([dp], model, x, s, y)
        return BatchResult(certify_batch(s, y, [int(i) for i in idx], [dp], [pp], evidence=ev), len(idx))

    images = load_batches(data, batches, num_workers, pin_memory=cuda)
    try:
        with precise_math():
            run_batches(images, step, tally=counter, total=len(share))
    finally:
        images.close()
    counts = torch.tensor([counter.correct[0], counter.certified[0]], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(counts)
    model.train(was)
    n = max(1, n_eval)
    return {"clean_acc": float(counts[0]) / n, "cert_acc": float(counts[1]) / n}
