"""Heuristic adversarial patch attack (BagCert, Appendix A.2) and a stronger variant.

1. Location and target: ``l*, c* = argmin_{l, c}`` of the worst-case margin of each placement
   (the defense's ``margin_map`` when it has one, else BagCert's Condition 3.2 on the votes),
   computed from the clean score map. The feature placement is mapped back to the pixel patch
   whose feature window it is (model geometry; clipped to the image).
2. PGD on the patch pixels only (100 steps, step 0.025 on the sign of the gradient, pixels in
   [0, 1]) minimising a smooth targeted margin (BagCert's ``L_R`` with ``M = 1`` on a
   sigmoid relaxation of the votes; see :mod:`.surrogate`).
3. Success is judged only by the real defended prediction
   ``defense.predict(model.score_map(x_adv)) != label``, re-checked on a fresh forward pass.

The strong setting tries several locations and target classes, restarts (alternating
surrogates) and more steps, and keeps the first success (else the attempt with the lowest
smooth margin). Any defense works, since success is decided by ``defense.predict``.

A successful attack on an image the defense *certified* against the same patch is a
**soundness failure**: :func:`attack_and_check` logs it as an error and counts it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..geometry import PatchSpec, parse_patch
from .selection import affected_mask, patch_masks, pixel_start, select_candidates
from .surrogate import SURROGATES, default_surrogates, resolve_surrogate, targeted_delta

log = logging.getLogger(__name__)

__all__ = [
    "PatchAttackConfig",
    "PatchAttackResult",
    "AttackCheck",
    "patch_attack",
    "attack_and_check",
]

INITS = ("random", "grey", "image")


@dataclass(frozen=True)
class PatchAttackConfig:
    """Attack settings. Defaults are BagCert A.2: one location/target, 100 steps of 0.025."""

    steps: int = 100
    step_size: float = 0.025
    restarts: int = 1
    locations: int = 1
    targets: int = 1
    init: str = "random"  # first restart; later restarts are always random
    surrogates: tuple[str, ...] | None = None  # per restart, cycled; None: matched to the defense
    temperature: float = 1.0
    margin_cap: float = 1.0  # BagCert's M in L_R = -min(delta, M)
    seed: int = 0
    early_stop: bool = True  # stop attacking an example once its prediction flipped

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "locations", "targets"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
                raise PatchcertError(f"attack {name} must be a {'non-negative' if name == 'steps' else 'positive'} int, got {v!r}")
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0):
            raise PatchcertError(f"attack step size must be a positive number, got {self.step_size!r}")
        if self.init not in INITS:
            raise PatchcertError(f"attack init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.surrogates is not None:
            object.__setattr__(self, "surrogates", tuple(self.surrogates))
            bad = [s for s in self.surrogates if s not in SURROGATES]
            if bad or not self.surrogates:
                raise PatchcertError(f"unknown attack surrogate(s) {bad}; choose from {', '.join(SURROGATES)}")
        if not self.temperature > 0:
            raise PatchcertError(f"attack temperature must be positive, got {self.temperature!r}")

    @classmethod
    def strong(cls, **overrides: Any) -> "PatchAttackConfig":
        """Several locations and targets, restarts with alternating surrogates, more steps."""
        base = dict(steps=200, step_size=0.025, restarts=2, locations=4, targets=2)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["surrogates"] = list(self.surrogates) if self.surrogates is not None else None
        return d


@dataclass
class PatchAttackResult:
    """Per-example outcome of a patch attack; every tensor has length N (on the input's device).

    ``success`` means the defended prediction on ``adv_images`` is not the label (so it is also
    True, with ``attacked`` False, for examples the defense already gets wrong). The location
    fields describe the successful attempt, else the attempt with the lowest smooth margin
    (``-1`` where no attack ran).
    """

    clean_pred: torch.Tensor  # long [N] defended prediction on the clean image
    adv_pred: torch.Tensor  # long [N] defended prediction on adv_images (fresh forward pass)
    success: torch.Tensor  # bool [N]
    attacked: torch.Tensor  # bool [N] the clean prediction was right, so an attack ran
    shape: torch.Tensor  # long [N, 2] pixel patch (ph, pw)
    pixel: torch.Tensor  # long [N, 2] top-left pixel (row, col) of the patch
    window: torch.Tensor  # long [N, 2] feature window (wh, ww) the placement is of (masking: its mask window)
    cell: torch.Tensor  # long [N, 2] top-left of the feature placement the location came from
    target: torch.Tensor  # long [N] target class
    predicted_margin: torch.Tensor  # float64 [N] worst-case margin of that placement (< 0: not certifiable there)
    soft_margin: torch.Tensor  # float64 [N] final smooth targeted margin of the reported attempt
    attempts: torch.Tensor  # long [N] (location, target, restart) runs spent
    steps: torch.Tensor  # long [N] PGD steps spent (gradient evaluations)
    outside_change: torch.Tensor  # float64 [N] max |score change| outside the cells the patch can reach
    adv_images: torch.Tensor | None = None  # [N, C, H, W] in [0, 1]

    def __len__(self) -> int:
        return int(self.success.shape[0])

    def example(self, i: int) -> dict:
        """JSON-serialisable record of example ``i``."""
        att = bool(self.attacked[i])
        return {
            "attacked": att,
            "success": bool(self.success[i]),
            "adv_pred": int(self.adv_pred[i]),
            "patch": [int(v) for v in self.shape[i]] if att else None,
            "pixel": [int(v) for v in self.pixel[i]] if att else None,
            "window": [int(v) for v in self.window[i]] if att else None,
            "cell": [int(v) for v in self.cell[i]] if att else None,
            "target": int(self.target[i]) if att else None,
            "predicted_margin": _finite(self.predicted_margin[i]) if att else None,
            "soft_margin": _finite(self.soft_margin[i]) if att else None,
            "attempts": int(self.attempts[i]),
            "steps": int(self.steps[i]),
            "outside_change": float(self.outside_change[i]),
        }


def _finite(v: torch.Tensor) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _example_seed(seed: int, index: int, attempt: int) -> int:
    h = hashlib.blake2b(f"{seed}/{index}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _init_patch(kind: str, x: torch.Tensor, indices: torch.Tensor, seed: int, attempt: int) -> torch.Tensor:
    """Initial patch content ``[n, C, H, W]``; random noise is drawn per dataset index so the
    attack does not depend on how examples are batched."""
    if kind == "grey":
        return torch.full_like(x, 0.5)
    if kind == "image":
        return x.clone()
    noise = torch.empty_like(x, device="cpu")
    for k, idx in enumerate(indices.tolist()):  # once per restart, not per step
        g = torch.Generator().manual_seed(_example_seed(seed, int(idx), attempt))
        noise[k] = torch.rand(x.shape[1:], generator=g, dtype=x.dtype)
    return noise.to(x.device)


def _pgd(
    model: Any, defense: Any, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
    p: torch.Tensor, surrogate: str, cfg: PatchAttackConfig, score_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD on the masked pixels. ``x``, ``p`` ``[n, C, H, W]``, ``mask`` bool ``[n, 1, H, W]``.

    Returns ``(x_adv [n, C, H, W], flipped bool [n], delta float64 [n], steps long [n])``:
    the first flipping image for flipped examples, else the final one.
    """
    n = x.shape[0]
    dev = x.device
    x_out = torch.where(mask, p, x)
    flipped = torch.zeros(n, dtype=torch.bool, device=dev)
    delta_last = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    steps = torch.zeros(n, dtype=torch.long, device=dev)
    act = torch.arange(n, device=dev)
    p = p.clone()
    for t in range(cfg.steps + 1):
        if act.numel() == 0:
            break
        pa = p[act].detach().requires_grad_(t < cfg.steps)
        xa = torch.where(mask[act], pa, x[act])
        with torch.set_grad_enabled(t < cfg.steps):
            scores = model.score_map(xa)
        with torch.no_grad():
            sd = scores.detach()
            pred = defense.predict(sd if score_dtype is None else sd.to(score_dtype))
            hit = pred != y[act]
            fresh = ~flipped[act]  # keep the first flipping image of each example
            x_out[act[fresh]] = xa.detach()[fresh]
            flipped[act] |= hit
        if t == cfg.steps:
            break
        delta, bounded = targeted_delta(surrogate, defense, scores, y[act], target[act], cfg.temperature)
        obj = delta.clamp(max=cfg.margin_cap) if bounded else delta
        (grad,) = torch.autograd.grad(obj.sum(), pa)
        with torch.no_grad():
            p[act] = (pa.detach() - cfg.step_size * grad.sign()).clamp_(0.0, 1.0)
            delta_last[act] = delta.detach().to(torch.float64)
            steps[act] += 1
        if cfg.early_stop:
            act = act[~hit]
    return x_out, flipped, delta_last, steps


def _shapes_of(patch: str | PatchSpec | Sequence[tuple[int, int]], image_size: tuple[int, int]) -> list[tuple[int, int]]:
    if isinstance(patch, (str, PatchSpec)):
        try:
            return parse_patch(patch).shapes(image_size)
        except PatchcertError:
            raise
        except ValueError as e:
            raise PatchcertError(str(e)) from None
    shapes = [(int(a), int(b)) for a, b in patch]
    for ph, pw in shapes:
        if not (1 <= ph <= image_size[0] and 1 <= pw <= image_size[1]):
            raise PatchcertError(f"patch {ph}x{pw} does not fit in a {image_size[0]}x{image_size[1]} image")
    if not shapes:
        raise PatchcertError("no patch shape given")
    return shapes


def _fresh_result(clean_pred: torch.Tensor, labels: torch.Tensor) -> PatchAttackResult:
    """Nothing attacked yet: correctly classified examples are to be attacked, the others count as broken."""
    N, dev = clean_pred.shape[0], clean_pred.device
    neg = torch.full((N,), -1, dtype=torch.long, device=dev)
    return PatchAttackResult(
        clean_pred=clean_pred,
        adv_pred=clean_pred.clone(),
        success=clean_pred != labels,
        attacked=clean_pred == labels,
        shape=torch.stack([neg, neg], 1), pixel=torch.stack([neg, neg], 1),
        window=torch.stack([neg, neg], 1), cell=torch.stack([neg, neg], 1),
        target=neg.clone(),
        predicted_margin=torch.full((N,), float("nan"), dtype=torch.float64, device=dev),
        soft_margin=torch.full((N,), float("inf"), dtype=torch.float64, device=dev),
        attempts=torch.zeros(N, dtype=torch.long, device=dev),
        steps=torch.zeros(N, dtype=torch.long, device=dev),
        outside_change=torch.zeros(N, dtype=torch.float64, device=dev),
    )


@torch.no_grad()
def _verdict(model: nn.Module, defense: Any, geom: Any, x_adv: torch.Tensor, clean_scores: torch.Tensor,
             labels: torch.Tensor, res: PatchAttackResult, claimed: torch.Tensor,
             score_dtype: torch.dtype | None) -> None:
    """The verdict: a fresh forward pass of the final images through model and defense; also
    the largest score change outside the cells the patch can reach (0 for a sound geometry)."""
    adv_scores = model.score_map(x_adv)
    if score_dtype is not None:
        adv_scores = adv_scores.to(score_dtype)
    adv_pred = defense.predict(adv_scores).to(labels.device)
    att = res.attacked
    res.adv_pred = torch.where(att, adv_pred, res.clean_pred)
    res.success = res.adv_pred != labels
    lost = claimed & ~res.success
    if bool(lost.any()):
        log.warning("%d attack success(es) did not reproduce on a fresh forward pass (numerical noise?); "
                    "counted as failures", int(lost.sum()))
    ai = att.nonzero().squeeze(1)
    if ai.numel():
        reach = affected_mask(geom, res.pixel[ai, 0], res.pixel[ai, 1], res.shape[ai, 0], res.shape[ai, 1],
                              tuple(clean_scores.shape[-2:]))
        diff = (adv_scores[ai] - clean_scores[ai]).abs().amax(1).to(torch.float64)
        res.outside_change[ai] = diff.masked_fill(reach, 0.0).flatten(1).amax(1)


def _search(model: Any, defense: Any, geom: Any, x: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
            cand: Any, surrogates: list, shape_t: torch.Tensor, res: PatchAttackResult, cfg: PatchAttackConfig,
            score_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD from every candidate (placement, target) and restart, in candidate order, on the
    examples not yet broken; ``res`` keeps each example's best attempt. Returns the attacked
    images and which examples an attempt claims to have flipped."""
    N, _, H, W = x.shape
    dev = x.device
    x_adv = x.clone()
    remaining = res.attacked.clone()
    claimed = torch.zeros(N, dtype=torch.bool, device=dev)
    attempt = 0
    for j in range(cand.count):
        for r in range(cfg.restarts):
            idx = remaining.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            si = cand.shape[idx, j]
            ph, pw = shape_t[si, 0], shape_t[si, 1]
            wh, ww = cand.window[idx, j, 0], cand.window[idx, j, 1]
            cr, cc = cand.row[idx, j], cand.col[idx, j]
            py = pixel_start(geom, 0, cr, wh, ph, H)
            px = pixel_start(geom, 1, cc, ww, pw, W)
            mask = patch_masks(py, px, ph, pw, (H, W))
            init = cfg.init if r == 0 else "random"
            p0 = _init_patch(init, x[idx], indices[idx.cpu()], cfg.seed, attempt)
            xa, flipped, delta, nsteps = _pgd(
                model, defense, x[idx], labels[idx], mask, cand.target[idx, j], p0,
                surrogates[r % len(surrogates)], cfg, score_dtype,
            )
            attempt += 1
            res.attempts[idx] += 1
            res.steps[idx] += nsteps
            # keep a success, else the attempt with the lowest smooth margin
            better = flipped | (delta < res.soft_margin[idx])
            upd = idx[better]
            res.shape[upd] = torch.stack([ph, pw], 1)[better]
            res.pixel[upd] = torch.stack([py, px], 1)[better]
            res.window[upd] = torch.stack([wh, ww], 1)[better]
            res.cell[upd] = torch.stack([cr, cc], 1)[better]
            res.target[upd] = cand.target[idx, j][better]
            res.predicted_margin[upd] = cand.margin[idx, j][better]
            res.soft_margin[upd] = delta[better]
            x_adv[upd] = xa[better]
            claimed[idx[flipped]] = True
            remaining[idx[flipped]] = False
        if not bool(remaining.any()):
            break

    return x_adv, claimed


def patch_attack(
    model: Any,
    defense: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    patch: str | PatchSpec | Sequence[tuple[int, int]],
    config: PatchAttackConfig | None = None,
    *,
    clean_scores: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    keep_images: bool = False,
    score_dtype: torch.dtype | None = None,
) -> PatchAttackResult:
    """Attack ``images [N, C, H, W]`` (in [0, 1]) with labels ``[N]`` by one patch of any shape
    the threat ``patch`` allows (``'5x5'``, ``'2%'``, ``'area=24'`` or a list of ``(ph, pw)``).

    ``model`` is a :class:`~patchcert.models.ScoreMapModel` (its ``geometry`` maps feature
    placements to pixels), ``defense`` anything with ``predict(scores) -> long [N]``.
    ``clean_scores`` (``model.score_map(images)``) is recomputed if not given. ``indices``
    (dataset indices, default ``arange(N)``) seed the per-example random initialisations.
    ``score_dtype``: the precision the defense computes in (e.g. float64, as ``patchcert
    certify`` does); score maps are cast to it before every ``defense.predict``.
    Works on the device of ``images``; the model must be on the same device.
    """
    cfg = config or PatchAttackConfig()
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise PatchcertError("images must be a float tensor [N, C, H, W] in [0, 1]")
    if labels.shape != images.shape[:1]:
        raise PatchcertError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    geom = getattr(model, "geometry", None)
    if geom is None:
        raise PatchcertError(f"{type(model).__name__} declares no receptive-field geometry")
    N, _, H, W = images.shape
    dev = images.device
    labels = labels.to(dev)
    try:
        pdtype = next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        pdtype = images.dtype
    x = images.to(pdtype)
    if indices is None:
        indices = torch.arange(N)
    indices = torch.as_tensor(indices).cpu()
    shapes = _shapes_of(patch, (H, W))
    windows = [geom.window(s) for s in shapes]
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            if clean_scores is None:
                clean_scores = model.score_map(x)
            clean_scores = clean_scores.detach()
            if score_dtype is not None:
                clean_scores = clean_scores.to(score_dtype)
            clean_pred = defense.predict(clean_scores).to(dev)
        K = clean_scores.shape[1]
        shape_t = torch.tensor(shapes, dtype=torch.long, device=dev)  # [S, 2]

        res = _fresh_result(clean_pred, labels)
        if K < 2 or not bool(res.attacked.any()):
            res.adv_images = x.clone() if keep_images else None
            return res

        wrap = bool(defense.wrap or geom.wrap)
        cand = select_candidates(defense, clean_scores, labels, windows, wrap, cfg.locations, cfg.targets)
        surrogates = list(cfg.surrogates) if cfg.surrogates else default_surrogates(defense, strong=cfg.restarts > 1)
        surrogates = [resolve_surrogate(s, defense) for s in surrogates]
        x_adv, claimed = _search(model, defense, geom, x, labels, indices, cand, surrogates, shape_t, res, cfg,
                                 score_dtype)
        _verdict(model, defense, geom, x_adv, clean_scores, labels, res, claimed, score_dtype)
        res.adv_images = x_adv if keep_images else None
        return res
    finally:
        model.train(was_training)


@dataclass
class AttackCheck:
    """An attack together with the defense's certificate for the same patch threat.

    ``soundness_failure[i]``: example i was certified *and* the attack changed its prediction.
    That can only happen if the certificate (or the model's declared geometry) is wrong.
    """

    result: PatchAttackResult
    certified: torch.Tensor  # bool [N]
    soundness_failure: torch.Tensor  # bool [N]
    windows: list[tuple[int, int]] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return int(self.soundness_failure.sum())


def attack_and_check(
    model: Any,
    defense: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    patch: str | PatchSpec | Sequence[tuple[int, int]],
    config: PatchAttackConfig | None = None,
    *,
    clean_scores: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    keep_images: bool = False,
    certified: torch.Tensor | None = None,
    score_dtype: torch.dtype | None = None,
) -> AttackCheck:
    """Certify (``defense.certify`` on the clean score map, unless ``certified`` is given) and
    attack; every certified example the attack breaks is logged as a SOUNDNESS FAILURE."""
    N, _, H, W = images.shape
    geom = model.geometry
    shapes = _shapes_of(patch, (H, W))
    windows = list(dict.fromkeys(geom.window(s) for s in shapes))
    if clean_scores is None:
        was = bool(getattr(model, "training", False))
        model.eval()
        try:
            with torch.no_grad():
                clean_scores = model.score_map(images.to(next(model.parameters()).dtype))
        finally:
            model.train(was)
    if certified is None:
        cs = clean_scores if score_dtype is None else clean_scores.to(score_dtype)
        certified = defense.certify(cs, labels.to(clean_scores.device), windows)
    certified = certified.to(images.device).bool()
    res = patch_attack(model, defense, images, labels, patch, config, clean_scores=clean_scores,
                       indices=indices, keep_images=keep_images, score_dtype=score_dtype)
    bad = certified & res.success
    if bool(bad.any()):
        idx = torch.arange(N) if indices is None else torch.as_tensor(indices).cpu()
        for i in bad.nonzero().squeeze(1).tolist():
            log.error(
                "SOUNDNESS FAILURE: example %d was certified by %s against patch %s, but a %dx%d patch at pixel "
                "(%d, %d) changes the prediction %d -> %d (max score change outside the patch's reach: %.3g)",
                int(idx[i]), defense, patch if isinstance(patch, (str, PatchSpec)) else shapes,
                int(res.shape[i, 0]), int(res.shape[i, 1]), int(res.pixel[i, 0]), int(res.pixel[i, 1]),
                int(labels[i]), int(res.adv_pred[i]), float(res.outside_change[i]),
            )
    return AttackCheck(result=res, certified=certified, soundness_failure=bad, windows=windows)
