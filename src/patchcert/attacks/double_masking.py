"""An empirical upper bound for double masking: PGD patches evaluated through the defense.

For each image and each candidate placement of a ``(ph, pw)`` patch, the patch content is
optimised by signed-gradient ascent (PGD in [0, 1] pixel space) on

* the undefended classifier's cross-entropy (``objective="logits"``), or
* that plus the mean cross-entropy of the image under masks that do *not* cover the patch
  (``objective="masked"``, default): those are the masked predictions the patch can still
  reach, the ones double masking's first round and second rounds consult.

Every patched image is then classified by the real double-masking defense
(:func:`patchcert.defenses.double_masking.double_masking_predict`); an image is *robust* if
its clean double-masking prediction is the label and no patched image changes it. Candidate
placements: the top-left corners of the masks of the first pair that the certificate found
wrong (where a patch is most likely to matter), then random placements. A certified image
must never be broken; :func:`attack_double_masking` reports any that is as a soundness failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..defenses.double_masking import (
    DoubleMasking,
    certify_from_table,
    double_masking_predict,
    first_failing_pair,
    masked_prediction_table,
    predict_from_table,
)
from ..errors import PatchcertError
from ..masks import MaskSet, apply_masks

log = logging.getLogger(__name__)

__all__ = ["DMAttackResult", "attack_double_masking"]


@dataclass
class DMAttackResult:
    """Per image (length N): clean double-masking prediction, certificate, robustness, and the
    successful patch (placement and the adversarial image) when the attack broke it."""

    pred: torch.Tensor
    certified: torch.Tensor
    robust: torch.Tensor
    adv_pred: torch.Tensor
    placement: list[tuple[int, int] | None] = field(default_factory=list)
    adv_images: dict[int, torch.Tensor] = field(default_factory=dict)
    attempts: list[int] = field(default_factory=list)  # placements tried per image
    steps: list[int] = field(default_factory=list)  # PGD steps spent per image

    @property
    def soundness_failures(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.certified & ~self.robust)[:, 0]]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.float().mean((2, 3)) if out.dim() == 4 else out.float()


def _placements(ms: MaskSet, shape: tuple[int, int], table: torch.Tensor, labels: torch.Tensor, n_random: int,
                generator: torch.Generator) -> list[list[tuple[int, int]]]:
    h, w = ms.image_size
    ph, pw = shape
    _, fi, fj = first_failing_pair(table, labels)
    out = []
    for n in range(table.shape[0]):
        cand: list[tuple[int, int]] = []
        for m in (int(fi[n]), int(fj[n])):
            if m >= 0:
                t, l, mh, mw = ms.rects[m]
                for p in ((t, l), (min(t + mh - ph, h - ph), min(l + mw - pw, w - pw))):
                    if p not in cand:
                        cand.append(p)
        tops = torch.randint(0, h - ph + 1, (n_random,), generator=generator).tolist()
        lefts = torch.randint(0, w - pw + 1, (n_random,), generator=generator).tolist()
        cand += [p for p in zip(tops, lefts) if p not in cand]
        out.append(cand)
    return out


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, top: int, left: int, shape: tuple[int, int],
         others: torch.Tensor, dm: DoubleMasking, steps: int, step_size: float, objective: str,
         generator: torch.Generator) -> torch.Tensor:
    """PGD on one patch placement for a batch of images; returns the patched images."""
    ph, pw = shape
    patch = torch.rand(x.shape[0], x.shape[1], ph, pw, generator=generator).to(x.device)
    region = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    region[top:top + ph, left:left + pw] = True

    def paste(p: torch.Tensor) -> torch.Tensor:
        full = F.pad(p, (left, x.shape[-1] - left - pw, top, x.shape[-2] - top - ph))
        return torch.where(region, full, x)

    for _ in range(steps):
        patch.requires_grad_(True)
        xa = paste(patch)
        loss = F.cross_entropy(_logits(model, xa), y)
        if objective == "masked" and others.shape[0]:
            k = min(8, others.shape[0])
            sel = torch.randperm(others.shape[0], generator=generator)[:k].to(x.device)
            n = xa.shape[0]
            xm = apply_masks(xa.repeat_interleave(k, 0), others[sel].repeat(n, 1, 1), dm.fill)
            loss = loss + F.cross_entropy(_logits(model, xm), y.repeat_interleave(k))
        (g,) = torch.autograd.grad(loss, patch)
        patch = (patch.detach() + step_size * g.sign()).clamp_(0, 1)
    return paste(patch).detach()


def attack_double_masking(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, dm: DoubleMasking,
                          ms: MaskSet, shape: tuple[int, int], *, steps: int = 20, step_size: float = 0.1,
                          n_random: int = 2, objective: str = "masked", seed: int = 0,
                          table: torch.Tensor | None = None) -> DMAttackResult:
    """Attack double masking on images ``x`` (``[N, C, H, W]`` in [0, 1]) with ``shape`` patches.

    ``table``: the images' masked-prediction table if already computed (else it is computed).
    Returns a :class:`DMAttackResult`; ``robust <= correct`` and, if the certificate is sound,
    ``certified <= robust``.
    """
    if objective not in ("logits", "masked"):
        raise PatchcertError(f"double-masking attack: objective must be 'logits' or 'masked', got {objective!r}")
    ph, pw = int(shape[0]), int(shape[1])
    h, w = ms.image_size
    if ph > h or pw > w:
        raise PatchcertError(f"double-masking attack: patch {ph}x{pw} is larger than the image ({h}x{w})")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    labels = labels.to(x.device).long()
    with torch.no_grad():
        if table is None:
            table = masked_prediction_table(model, x, ms, dm.fill, bf16=dm.bf16)
    pred = predict_from_table(table)
    cert = certify_from_table(table, labels)
    robust = pred == labels
    adv_pred = pred.clone()
    placement: list[tuple[int, int] | None] = [None] * x.shape[0]
    adv_images: dict[int, torch.Tensor] = {}
    masks = ms.boolean(x.device)
    cands = _placements(ms, (ph, pw), table, labels, n_random, g)
    attempts = [0] * x.shape[0]
    for n in torch.nonzero(robust)[:, 0].tolist():
        for (top, left) in cands[n]:
            attempts[n] += 1
            covered = masks[:, top:top + ph, left:left + pw].flatten(1).all(1)
            others = masks[~covered]
            with torch.enable_grad():
                xa = _pgd(model, x[n:n + 1], labels[n:n + 1], top, left, (ph, pw), others, dm, steps, step_size,
                          objective, g)
            with torch.no_grad():
                p = int(double_masking_predict(model, xa, ms, dm.fill, bf16=dm.bf16)[0])
            if p != int(labels[n]):
                robust[n] = False
                adv_pred[n] = p
                placement[n] = (top, left)
                adv_images[n] = xa[0].cpu()
                if bool(cert[n]):
                    log.error("double masking: certified example %d broken by a patch at (%d, %d)", n, top, left)
                break
    return DMAttackResult(pred=pred, certified=cert, robust=robust, adv_pred=adv_pred, placement=placement,
                          adv_images=adv_images, attempts=attempts, steps=[a * steps for a in attempts])
