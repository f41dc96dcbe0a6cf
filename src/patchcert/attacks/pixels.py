"""An empirical upper bound for pixel defenses (double masking): PGD patches evaluated
through the defense.

For each image and each candidate placement of a ``(ph, pw)`` patch, the patch content is
optimised by signed-gradient ascent (PGD in [0, 1] pixel space) on

* the undefended classifier's cross-entropy (``objective="logits"``), or
* that plus the mean cross-entropy of the image under the masks the patch still reaches
  (``objective="masked"``, default; :meth:`PixelDefense.attack_masks` -- for double masking the
  masks that do *not* cover the patch, the ones its first and second rounds consult).

Every patched image is then classified by the real defense
(:meth:`PixelDefense.predict_images`); an image is *robust* if its clean defended prediction is
the label and no patched image changes it. Candidate placements come from the defense
(:meth:`PixelDefense.attack_placements`; double masking: the corners of the masks of the first
pair that the certificate found wrong, then random placements). A certified image must never
be broken; :func:`attack_pixels` reports any that is as a soundness failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PatchcertError
from ..masks import MaskSet, apply_masks

log = logging.getLogger(__name__)

__all__ = ["DMAttackResult", "attack_pixels", "attack_double_masking"]


@dataclass
class DMAttackResult:
    """Per image (length N): clean defended prediction, certificate, robustness, and the
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


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, top: int, left: int, shape: tuple[int, int],
         others: torch.Tensor, fill: float, steps: int, step_size: float, objective: str,
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
            xm = apply_masks(xa.repeat_interleave(k, 0), others[sel].repeat(n, 1, 1), fill)
            loss = loss + F.cross_entropy(_logits(model, xm), y.repeat_interleave(k))
        (g,) = torch.autograd.grad(loss, patch)
        patch = (patch.detach() + step_size * g.sign()).clamp_(0, 1)
    return paste(patch).detach()


def _one_shape(shape: tuple[int, int]) -> Any:
    return SimpleNamespace(shapes=[shape], windows=[], shape_window=[0], text=f"{shape[0]}x{shape[1]}")


def attack_pixels(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, defense: Any, shape: tuple[int, int],
                  *, steps: int = 100, step_size: float = 0.025, locations: int | None = 1, restarts: int = 1,
                  n_random: int | None = None, objective: str = "masked", seed: int = 0, evidence: Any = None,
                  certified: torch.Tensor | None = None) -> DMAttackResult:
    """Attack a pixel defense (built for its threat) on images ``x`` (``[N, C, H, W]`` in [0, 1])
    with ``shape`` patches: per image, the first ``locations`` candidate placements
    (None: all of them), ``restarts`` random starts of ``steps`` PGD steps each.

    ``evidence``: the defense's evidence for ``x`` and ``labels`` if already computed;
    ``certified``: the certificates to check (default: against ``shape`` alone).
    Returns a :class:`DMAttackResult`; ``robust <= correct`` and, if the certificate is sound,
    ``certified <= robust``.
    """
    if objective not in ("logits", "masked"):
        raise PatchcertError(f"pixel attack: objective must be 'logits' or 'masked', got {objective!r}")
    ph, pw = int(shape[0]), int(shape[1])
    h, w = defense.image_size
    if ph > h or pw > w:
        raise PatchcertError(f"pixel attack: patch {ph}x{pw} is larger than the image ({h}x{w})")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    labels = labels.to(x.device).long()
    if evidence is None:
        with torch.no_grad():
            evidence = defense.compute_evidence(model, x, None, labels)
    pred = defense.predict_evidence(evidence).to(x.device)
    cert = certified if certified is not None else defense.certify_threat(evidence, labels, _one_shape((ph, pw))).certified
    cert = cert.to(x.device).bool()
    robust = pred == labels
    adv_pred = pred.clone()
    placement: list[tuple[int, int] | None] = [None] * x.shape[0]
    adv_images: dict[int, torch.Tensor] = {}
    clf = defense.classifier(model)  # the attack climbs the loss of the classifier the defense runs
    n_rand = n_random if n_random is not None else (locations or 1)
    cands = defense.attack_placements(evidence, labels, (ph, pw), n_rand, g)
    attempts, spent = [0] * x.shape[0], [0] * x.shape[0]
    for n in torch.nonzero(robust)[:, 0].tolist():
        for (top, left) in cands[n][:locations]:
            attempts[n] += 1
            others = defense.attack_masks(top, left, (ph, pw), x.device)
            for _ in range(restarts):
                spent[n] += steps
                with torch.enable_grad():
                    xa = _pgd(clf, x[n:n + 1], labels[n:n + 1], top, left, (ph, pw), others, defense.fill, steps,
                              step_size, objective, g)
                with torch.no_grad():
                    p = int(defense.predict_images(model, xa)[0])
                if p != int(labels[n]):
                    robust[n] = False
                    adv_pred[n] = p
                    placement[n] = (top, left)
                    adv_images[n] = xa[0].cpu()
                    if bool(cert[n]):
                        log.error("%s: certified example %d broken by a patch at (%d, %d)", defense.key, n, top, left)
                    break
            if not bool(robust[n]):
                break
    return DMAttackResult(pred=pred, certified=cert, robust=robust, adv_pred=adv_pred, placement=placement,
                          adv_images=adv_images, attempts=attempts, steps=spent)


def attack_double_masking(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, dm: Any, ms: MaskSet,
                          shape: tuple[int, int], *, steps: int = 20, step_size: float = 0.1, n_random: int = 2,
                          objective: str = "masked", seed: int = 0, table: torch.Tensor | None = None
                          ) -> DMAttackResult:
    """:func:`attack_pixels` on double masking with mask set ``ms``, trying every candidate
    placement (the first failing pair's mask corners and ``n_random`` random ones)."""
    d = dm.bind(ms)
    return attack_pixels(model, x, labels, d, shape, steps=steps, step_size=step_size, locations=None,
                         n_random=n_random, objective=objective, seed=seed, evidence=table)
