"""Training objectives on score maps ``[N, K, h, w]``.

Pure loss functions (``bagcert_loss``, ``patchguard_loss``, ``cross_entropy_map``) and the
:class:`Objective` classes the training loop uses. An objective decides

* which module is trained (``trainable``: the model itself, or a DS model's base classifier),
* how a global batch of float images in [0, 1] is turned into the network's input
  (``prepare``: identity, or De-randomized smoothing's random ablation), and
* the loss of the network's output (``loss``), computed in float32 outside autocast.

Objectives are registered by name in :data:`OBJECTIVES`; ``create_objective(name, model,
image_size, **cfg)`` validates ``cfg`` (unknown or bad options are one-line errors).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PatchcertError
from ..models.ds import DerandomizedSmoothing, random_ablate
from ..windows import window_sums

__all__ = [
    "heaviside_ste",
    "bagcert_loss",
    "one_hot_penalty",
    "cross_entropy_map",
    "strongest_window_mask",
    "patchguard_loss",
    "Objective",
    "BagCertObjective",
    "CrossEntropyObjective",
    "PatchGuardObjective",
    "DSObjective",
    "MaskCutoutObjective",
    "OBJECTIVES",
    "register_objective",
    "create_objective",
]


# -- BagCert (Metzen & Yatsura, ICLR 2021, Sec. 3.3) ----------------------------------------

def heaviside_ste(u: torch.Tensor) -> torch.Tensor:
    """Forward: ``1[u >= 0]`` exactly; backward: the logistic sigmoid's derivative (straight-through).

    The forward value ``sig + (hard - sig)`` is exactly ``hard`` in floating point: where
    ``hard = 0`` it is ``sig - sig``; where ``hard = 1``, ``sig >= 0.5`` so ``1 - sig`` is
    exact (Sterbenz) and the sum is exactly 1.
    """
    sig = torch.sigmoid(u)
    hard = (u >= 0).to(u.dtype)
    return sig + (hard - sig).detach()


def one_hot_penalty(S: torch.Tensor) -> torch.Tensor:
    """``L_oh = max_{c != cmax} S_c - S_cmax`` per example (``S`` ``[N, K]`` in [0, 1]) -> ``[N]`` in [-1, 0]."""
    top2 = S.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def bagcert_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, sigma: float = 0.0,
                 classes: str = "runner_up", dense_bce: float = 0.0) -> torch.Tensor:
    """BagCert's margin loss (Sec. 3.3): ``-min(min_{c!=y} sum_ij (s_y - s_c) / (h w), M) + sigma L_oh``.

    ``scores`` ``[N, K, h, w]`` are pre-Heaviside region scores (any float dtype; computed in
    float32); the votes ``s`` use the straight-through Heaviside. ``labels`` ``[N]``. Returns the
    batch mean (a scalar).

    Options beyond the paper (issue 9):

    * ``classes="all"``: the margin term is averaged over *every* wrong class,
      ``-mean_{c!=y} min(S_y - S_c, M)``, instead of taken on the runner-up only, so that
      classes other than the runner-up also stop voting (Condition 3.2 must hold for each c).
    * ``dense_bce``: weight of a dense per-location, per-class binary cross-entropy on the
      scores with one-hot targets (the sign votes' own target: ``u_y >= 0``, ``u_c < 0``),
      averaged over locations and classes; it trains every location directly, which the
      vote-count margin does only through the straight-through estimator.
    """
    u = scores.float()
    s = heaviside_ste(u)
    S = s.mean((2, 3))  # [N, K] normalised vote counts
    Sy = S.gather(1, labels[:, None])
    delta = Sy - S
    onehot = F.one_hot(labels, S.shape[1]).bool()
    if classes == "all":
        per = torch.clamp(delta, max=margin).masked_fill(onehot, 0.0)
        loss = -per.sum(1) / (S.shape[1] - 1)
    elif classes == "runner_up":
        delta = delta.masked_fill(onehot, float("inf"))
        loss = -torch.clamp(delta.min(1).values, max=margin)
    else:
        raise PatchcertError(f"bagcert classes must be 'runner_up' or 'all', got {classes!r}")
    if sigma:
        loss = loss + sigma * one_hot_penalty(S)
    if dense_bce:
        target = onehot[:, :, None, None].expand_as(u).to(u.dtype)
        loss = loss + dense_bce * F.binary_cross_entropy_with_logits(u, target, reduction="none").mean((1, 2, 3))
    return loss.mean()


def cross_entropy_map(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy on the spatially averaged logits (BagNet-style training).

    ``scores`` ``[N, K, h, w]`` or ``[N, K]``; ``labels`` ``[N]``.
    """
    s = scores.float()
    if s.dim() == 4:
        s = s.mean((2, 3))
    return F.cross_entropy(s, labels)


# -- PatchGuard provable adversarial training (Xiang et al., USENIX Sec. 2021, App. A) ------------

def strongest_window_mask(
    evidence: torch.Tensor, windows: Sequence[tuple[int, int]], wrap: bool = False
) -> torch.Tensor:
    """Boolean ``[N, H, W]`` mask of the placement with the largest evidence sum per example.

    ``evidence`` ``[N, H, W]`` (e.g. one class's clipped logits). Among all window shapes in
    ``windows`` and all their placements, the one with the largest sum wins (ties: the first
    shape, then the first placement in row-major order). A window larger than the map
    (along an axis without wrap) is clipped to the map: it covers that whole axis.
    """
    if evidence.dim() != 3:
        raise ValueError(f"evidence must be [N, H, W], got {tuple(evidence.shape)}")
    n, H, W = evidence.shape
    dev = evidence.device
    best = None
    best_shape = best_i = best_j = None
    for wh, ww in windows:
        wh, ww = min(int(wh), H), min(int(ww), W)
        sums = window_sums(evidence, (wh, ww), wrap)  # [N, Ph, Pw]
        pw = sums.shape[-1]
        val, flat = sums.flatten(1).max(1)
        i, j = flat // pw, flat % pw
        shp = torch.tensor([wh, ww], device=dev).expand(n, 2)
        if best is None:
            best, best_i, best_j, best_shape = val, i, j, shp
        else:
            better = val > best
            best = torch.where(better, val, best)
            best_i = torch.where(better, i, best_i)
            best_j = torch.where(better, j, best_j)
            best_shape = torch.where(better[:, None], shp, best_shape)
    if best is None:
        raise ValueError("no window given")
    rows = torch.arange(H, device=dev)[None, :]
    cols = torch.arange(W, device=dev)[None, :]
    if wrap:
        in_r = (rows - best_i[:, None]) % H < best_shape[:, :1]
        in_c = (cols - best_j[:, None]) % W < best_shape[:, 1:]
    else:
        in_r = (rows >= best_i[:, None]) & (rows < best_i[:, None] + best_shape[:, :1])
        in_c = (cols >= best_j[:, None]) & (cols < best_j[:, None] + best_shape[:, 1:])
    return in_r[:, :, None] & in_c[:, None, :]


def patchguard_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    windows: Sequence[tuple[int, int]],
    clip_max: float | None = None,
    zero: str = "true",
    aggregate: str = "mean",
    wrap: bool = False,
) -> torch.Tensor:
    """PatchGuard's provable adversarial training loss for logit maps.

    ``scores`` ``[N, K, H, W]`` local logits -> clip to ``[0, clip_max]`` (``None``: only at 0)
    -> for each example, find the placement of the patch window (``windows``: the feature
    windows of the deployed threat, several shapes allowed) with the largest clipped evidence
    of the TRUE class and zero it (``zero="true"``: the true class only, the attacker's worst
    case in the provable analysis; ``"all"``: every class in that window) -> aggregate over
    the map (``"mean"`` or ``"sum"``) -> cross-entropy. Returns the batch mean.
    """
    if zero not in ("true", "all"):
        raise ValueError(f"zero must be 'true' or 'all', got {zero!r}")
    if aggregate not in ("mean", "sum"):
        raise ValueError(f"aggregate must be 'mean' or 'sum', got {aggregate!r}")
    u = scores.float()
    f = u.clamp(min=0.0) if clip_max is None else u.clamp(0.0, float(clip_max))
    n, k, H, W = f.shape
    fy = f.gather(1, labels.view(n, 1, 1, 1).expand(n, 1, H, W))[:, 0]  # [N, H, W]
    mask = strongest_window_mask(fy.detach(), windows, wrap=wrap)  # [N, H, W]
    if zero == "true":
        sel = F.one_hot(labels, k).bool()[:, :, None, None] & mask[:, None]
    else:
        sel = mask[:, None].expand(n, k, H, W)
    f = f.masked_fill(sel, 0.0)
    g = f.sum((2, 3))
    if aggregate == "mean":
        g = g / (H * W)
    return F.cross_entropy(g, labels)


# -- objective classes ----------------------------------------------------------------------------

class Objective:
    """A training objective. Subclasses set ``name`` and override what differs.

    ``model`` is the full registered model (a ``ScoreMapModel``), ``image_size`` the training
    images' ``(H, W)``; ``cfg`` the objective's options from ``TrainConfig.objective_cfg``.
    """

    name: str = ""
    #: the objective's own ``prepare`` consumes the data generator (must run on the global batch)
    uses_generator: bool = False

    def __init__(self, model: nn.Module, image_size: tuple[int, int]) -> None:
        self.image_size = image_size

    def trainable(self, model: nn.Module) -> nn.Module:
        """The module whose forward the loop runs (and wraps in DDP)."""
        return model

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Global batch of float images ``[B, C, H, W]`` in [0, 1] -> network input (default: as is)."""
        return x

    #: the objective's :meth:`refine` runs after ``prepare`` (it sees labels and the model)
    refines: bool = False

    def refine(self, clean: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, model: nn.Module,
               autocast: Callable[[Any], Any]) -> torch.Tensor:
        """This rank's prepared batch ``x`` -> the network input, given the clean images, labels
        and the model (default: ``x``). Randomness must come from the global torch generator,
        whose state the training state saves."""
        return x

    def set_progress(self, fraction: float) -> None:
        """Called by the loop before every step with the fraction of training done, ``step / total``
        in [0, 1) (a function of the step alone, so resumption stays exact). Default: ignored."""

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def eval_defense(cls, cfg: dict[str, Any], windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """The defense a model trained with this objective is evaluated (and deployed) with, as
        ``{"name": ..., **options}`` (``cfg``: the objective's options; ``windows``: the
        evaluation threat's feature windows). Default: voting on the local argmax."""
        return {"name": "voting", "binarize": "argmax", "condition": "3.2"}

    def describe(self) -> dict[str, Any]:
        """Resolved settings, for logs and checkpoint metadata."""
        return {"name": self.name}


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    if not cls.name or cls.name in OBJECTIVES:
        raise RuntimeError(f"objective {cls.name!r} registered twice or unnamed")
    OBJECTIVES[cls.name] = cls
    return cls


def create_objective(name: str, model: nn.Module, image_size: tuple[int, int], **cfg: Any) -> Objective:
    """Build objective ``name`` for ``model``; bad options are a one-line ``PatchcertError``."""
    if name not in OBJECTIVES:
        raise PatchcertError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "image_size")]
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise PatchcertError(
            f"objective {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(params) or 'none'}"
        )
    return cls(model, image_size, **cfg)


def _number(name: str, v: Any, lo: float | None = None, allow_none: bool = False, strict_lo: bool = False) -> Any:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PatchcertError(f"{name} must be a number, got {v!r}")
    if lo is not None and (v <= lo if strict_lo else v < lo):
        raise PatchcertError(f"{name} must be {'>' if strict_lo else '>='} {lo}, got {v!r}")
    return float(v)


@register_objective
class BagCertObjective(Objective):
    """BagCert end-to-end training: margin loss with margin ``margin`` (M) + ``sigma`` one-hot penalty;
    ``classes`` (``runner_up`` as in the paper, or ``all``) and ``dense_bce`` (see :func:`bagcert_loss`);
    ``dense_until`` makes the dense term a warm-up: its weight falls linearly from ``dense_bce`` at
    the start to 0 at that fraction of training (None: constant)."""

    name = "bagcert"

    @classmethod
    def eval_defense(cls, cfg: dict[str, Any], windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Sign voting, BagCert's Condition 3.2."""
        return {"name": "voting", "binarize": "sign", "condition": "3.2"}

    def __init__(self, model: nn.Module, image_size: tuple[int, int], margin: float = 0.5, sigma: float = 0.0,
                 classes: str = "runner_up", dense_bce: float = 0.0, dense_until: float | None = None) -> None:
        super().__init__(model, image_size)
        self.dense_until = _number("bagcert dense_until", dense_until, lo=0.0, allow_none=True, strict_lo=True)
        if self.dense_until is not None and self.dense_until > 1:
            raise PatchcertError(f"bagcert dense_until must be a fraction of training in (0, 1], got {dense_until!r}")
        self._dense_scale = 1.0
        self.margin = _number("bagcert margin", margin, lo=0.0, strict_lo=True)
        self.sigma = _number("bagcert sigma", sigma, lo=0.0)
        if classes not in ("runner_up", "all"):
            raise PatchcertError(f"bagcert classes must be 'runner_up' or 'all', got {classes!r}")
        self.classes = classes
        self.dense_bce = _number("bagcert dense_bce", dense_bce, lo=0.0)

    def set_progress(self, fraction: float) -> None:
        # dense_until: the dense term is a warm-up, its weight falls linearly to 0 at that fraction
        if self.dense_until is not None:
            self._dense_scale = max(0.0, 1.0 - fraction / self.dense_until)

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bagcert_loss(out, labels, margin=self.margin, sigma=self.sigma, classes=self.classes,
                            dense_bce=self.dense_bce * self._dense_scale)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "margin": self.margin, "sigma": self.sigma}
        if self.classes != "runner_up" or self.dense_bce:  # old checkpoints' descriptions stay as they were
            d.update(classes=self.classes, dense_bce=self.dense_bce, dense_until=self.dense_until)
        return d


@register_objective
class CrossEntropyObjective(Objective):
    """Plain cross-entropy on the spatially averaged score map."""

    name = "ce"

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_map(out, labels)


@register_objective
class PatchGuardObjective(Objective):
    """PatchGuard provable adversarial training; the window is the deployed threat's (``patch``).

    ``patch``: a threat spec (``"5x5"``, ``"2%"``, ``"area=24"``); its feature windows come from
    the model's geometry (``patchcert.patch_windows``), e.g. 11x11 for RF 7 and a 5x5 patch.
    ``window`` (``[wh, ww]``) overrides it with an explicit feature window.
    """

    name = "patchguard"

    @classmethod
    def eval_defense(cls, cfg: dict[str, Any], windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Robust masking of clipped logits (T = 0) with a mask window covering every window."""
        if not windows:
            raise PatchcertError("the masking defense needs the evaluation patch window")
        win = [max(w[0] for w in windows), max(w[1] for w in windows)]
        return {"name": "masking", "window": win, "threshold": 0.0, "clip_max": cfg.get("clip_max"),
                "features": "logits"}

    def __init__(
        self,
        model: nn.Module,
        image_size: tuple[int, int],
        patch: str | None = None,
        window: Sequence[int] | None = None,
        clip_max: float | None = None,
        zero: str = "true",
        aggregate: str = "mean",
    ) -> None:
        super().__init__(model, image_size)
        from ..geometry import patch_windows

        if (patch is None) == (window is None):
            raise PatchcertError("objective 'patchguard' needs exactly one of patch (e.g. \"5x5\") or window ([wh, ww])")
        geom = getattr(model, "geometry", None)
        self.wrap = bool(getattr(geom, "wrap", False))
        if window is not None:
            if (not isinstance(window, (list, tuple)) or len(window) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in window)):
                raise PatchcertError(f"patchguard window must be [wh, ww] of positive ints, got {window!r}")
            self.windows = [(int(window[0]), int(window[1]))]
        else:
            try:
                self.windows = patch_windows(model, patch, image_size)  # type: ignore[arg-type]
            except ValueError as e:
                raise PatchcertError(f"objective 'patchguard': {e}") from None
        self.patch = patch
        self.clip_max = _number("patchguard clip_max", clip_max, lo=0.0, allow_none=True, strict_lo=True)
        if zero not in ("true", "all"):
            raise PatchcertError(f"patchguard zero must be 'true' or 'all', got {zero!r}")
        if aggregate not in ("mean", "sum"):
            raise PatchcertError(f"patchguard aggregate must be 'mean' or 'sum', got {aggregate!r}")
        self.zero, self.aggregate = zero, aggregate

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return patchguard_loss(out, labels, self.windows, clip_max=self.clip_max, zero=self.zero,
                               aggregate=self.aggregate, wrap=self.wrap)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "patch": self.patch, "windows": [list(w) for w in self.windows],
                "clip_max": self.clip_max, "zero": self.zero, "aggregate": self.aggregate, "wrap": self.wrap}


@register_objective
class DSObjective(Objective):
    """De-randomized smoothing: train the base classifier on one random ablation per image.

    The model must be a DS model (``ds_column`` / ``ds_block``: a ``DerandomizedSmoothing``); the ablation
    (mode ``column``/``block`` and band width ``b``) is the model's unless given here. Each image
    of the global batch keeps one random band/block (drawn from the data generator, so runs
    resume exactly and every DDP rank sees the same ablations); loss = cross-entropy of the
    base classifier's logits (spatially averaged if it returns a map).
    """

    name = "ds"

    @classmethod
    def eval_defense(cls, cfg: dict[str, Any], windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Voting with softmax threshold 0.3 on wrap-around bands."""
        return {"name": "voting", "binarize": 0.3, "condition": "3.2", "wrap": True}
    uses_generator = True

    def __init__(self, model: nn.Module, image_size: tuple[int, int], mode: str | None = None, b: int | None = None) -> None:
        super().__init__(model, image_size)
        self._ablate = random_ablate
        if not isinstance(model, DerandomizedSmoothing):
            raise PatchcertError(f"objective 'ds' needs a De-randomized smoothing model (ds_column / ds_block), "
                                 f"got {getattr(model, 'arch', type(model).__name__)!r}")
        self.mode = mode if mode is not None else model.mode
        self.b = b if b is not None else model.b
        if self.mode not in ("column", "block"):
            raise PatchcertError(f"objective 'ds': ablation mode must be 'column' or 'block', got {self.mode!r}")
        if isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 1:
            raise PatchcertError(f"objective 'ds': band width b must be a positive int, got {self.b!r}")

    def trainable(self, model: nn.Module) -> nn.Module:
        return cast(DerandomizedSmoothing, model).base  # checked in __init__

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self._ablate(x, self.mode, self.b, generator)

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_map(out, labels)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "b": self.b}


@register_objective
class MaskCutoutObjective(Objective):
    """Training for masking invariance (PatchCleanser's Cutout-style augmentation).

    Each image of the global batch is occluded by 0, 1 or 2 masks (probabilities ``probs``)
    drawn uniformly from the double-masking mask set of the threat ``patch`` with ``k`` masks
    per axis (for a multi-shape threat such as ``area=24``, one shape per batch, drawn at
    random); masked pixels take ``fill``. The masks come from the data generator, so runs
    resume exactly and every DDP rank sees the same occlusions. Loss: cross-entropy of the
    (spatially averaged) logits with ``label_smoothing``. ``centre_weight`` ``c`` draws these
    random masks in proportion to :func:`patchcert.masks.centre_weights` (a mask centred on the
    image weighs ``c``, the farthest ones 1; ``c = 1``, the default, is uniform).

    Distillation (``teacher``: a shipped model name or a checkpoint path): the teacher's soft
    targets are taken from the *unmasked* image, and the loss becomes
    ``(1 - a) CE + a T^2 KL(softmax(t / T) || softmax(s / T))`` with ``a = distill_weight`` and
    ``T = distill_temperature`` (Hinton et al., 2015). The teacher runs in eval mode without
    gradients (one extra forward pass per image); it is not saved with the run, so a resumed run
    must find the same teacher.
    """

    name = "mask_cutout"

    @classmethod
    def eval_defense(cls, cfg: dict[str, Any], windows: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Double masking with the objective's own mask set (``patch``, ``k``, ``fill``)."""
        return {"name": "double-masking", "k": cfg.get("k", 6), "patch": str(cfg.get("patch", "5x5")),
                "fill": cfg.get("fill", 0.5)}

    uses_generator = True

    def __init__(self, model: nn.Module, image_size: tuple[int, int], patch: str = "5x5", k: int = 6,
                 probs: Sequence[float] = (0.2, 0.3, 0.5), fill: float = 0.5, label_smoothing: float = 0.0,
                 greedy_fraction: float = 0.0, greedy_candidates: int = 8, teacher: str | None = None,
                 distill_weight: float = 0.5, distill_temperature: float = 4.0, centre_weight: float = 1.0) -> None:
        super().__init__(model, image_size)
        from ..geometry import parse_patch
        from ..masks import centre_weights, mask_set

        try:
            shapes = parse_patch(patch).shapes(image_size)
        except ValueError as e:
            raise PatchcertError(f"objective 'mask_cutout': {e}") from None
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PatchcertError(f"objective 'mask_cutout': k must be a positive int, got {k!r}")
        self.mask_sets = [mask_set(image_size, s, k) for s in shapes]
        self.patch, self.k = patch, k
        if not isinstance(probs, (list, tuple)) or len(probs) != 3:
            raise PatchcertError(f"objective 'mask_cutout': probs must be [p0, p1, p2], got {probs!r}")
        self.probs = [_number("mask_cutout probs", p, lo=0.0) for p in probs]
        if abs(sum(self.probs) - 1.0) > 1e-9:
            raise PatchcertError(f"objective 'mask_cutout': probs must sum to 1, got {probs!r}")
        self.fill = _number("mask_cutout fill", fill, lo=0.0)
        if self.fill > 1:
            raise PatchcertError(f"objective 'mask_cutout': fill must be in [0, 1], got {fill!r}")
        self.label_smoothing = _number("mask_cutout label_smoothing", label_smoothing, lo=0.0)
        if self.label_smoothing >= 1:
            raise PatchcertError(f"objective 'mask_cutout': label_smoothing must be < 1, got {label_smoothing!r}")
        self.greedy_fraction = _number("mask_cutout greedy_fraction", greedy_fraction, lo=0.0)
        if self.greedy_fraction > 1:
            raise PatchcertError(f"objective 'mask_cutout': greedy_fraction must be in [0, 1], got {greedy_fraction!r}")
        if isinstance(greedy_candidates, bool) or not isinstance(greedy_candidates, int) or greedy_candidates < 1:
            raise PatchcertError(f"objective 'mask_cutout': greedy_candidates must be a positive int, "
                                 f"got {greedy_candidates!r}")
        self.greedy_candidates = greedy_candidates
        self.centre_weight = _number("mask_cutout centre_weight", centre_weight, lo=0.0, strict_lo=True)
        self.mask_weights = (None if self.centre_weight == 1 else
                             [centre_weights(m, self.centre_weight) for m in self.mask_sets])
        self._init_teacher(model, teacher, distill_weight, distill_temperature)
        self.refines = self.greedy_fraction > 0 or self.teacher is not None

    def _init_teacher(self, model: nn.Module, teacher: str | None, weight: float, temperature: float) -> None:
        self.teacher_name = teacher
        self.distill_weight = _number("mask_cutout distill_weight", weight, lo=0.0)
        if self.distill_weight > 1:
            raise PatchcertError(f"objective 'mask_cutout': distill_weight must be in [0, 1], got {weight!r}")
        self.distill_temperature = _number("mask_cutout distill_temperature", temperature, lo=0.0)
        if not self.distill_temperature > 0:
            raise PatchcertError(f"objective 'mask_cutout': distill_temperature must be positive, got {temperature!r}")
        self.teacher: nn.Module | None = None
        self._soft: torch.Tensor | None = None  # this step's teacher probabilities (set by refine)
        if teacher is None:
            return
        if not isinstance(teacher, str) or not teacher:
            raise PatchcertError(f"objective 'mask_cutout': teacher must be a shipped model name or a checkpoint "
                                 f"path, got {teacher!r}")
        from pathlib import Path

        from ..models import load_model
        from ..pretrained import load_pretrained

        self.teacher = load_model(teacher) if Path(teacher).is_file() else load_pretrained(teacher)
        want, got = getattr(model, "num_classes", None), getattr(self.teacher, "num_classes", None)
        if want is not None and got is not None and want != got:
            raise PatchcertError(f"objective 'mask_cutout': teacher {teacher!r} has {got} classes, the model {want}")
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _teacher_probs(self, clean: torch.Tensor, autocast: Callable[[Any], Any]) -> torch.Tensor:
        """Softened class probabilities of the teacher on the unmasked images (float32)."""
        assert self.teacher is not None
        t = self.teacher.to(clean.device).eval()
        with autocast(None):  # NHWC: the fast layout for convolutions (targets only: its rounding is harmless)
            out = t(clean.contiguous(memory_format=torch.channels_last))
        out = out.float()
        out = out.mean((2, 3)) if out.dim() == 4 else out
        return F.softmax(out / self.distill_temperature, dim=1)

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        from ..masks import apply_masks, random_masks

        j = int(torch.randint(0, len(self.mask_sets), (1,), generator=generator)) if len(self.mask_sets) > 1 else 0
        w = None if self.mask_weights is None else self.mask_weights[j]
        m = random_masks(self.mask_sets[j], x.shape[0], self.probs, generator, weights=w)
        return apply_masks(x, m, self.fill)

    @torch.no_grad()
    def refine(self, clean: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, model: nn.Module,
               autocast: Callable[[Any], Any]) -> torch.Tensor:
        """Greedy Cutout (Saha et al., 2023) on the first ``greedy_fraction`` of the batch (whose
        order is random): round 1 picks, among ``greedy_candidates`` random masks, the one whose
        masked image has the highest loss; round 2 adds the second mask the same way. The model
        runs in eval mode (BatchNorm statistics untouched). Candidates are distinct masks.
        """
        from ..masks import apply_masks

        if self.teacher is not None:
            self._soft = self._teacher_probs(clean, autocast)
        g = int(round(self.greedy_fraction * clean.shape[0]))
        if g == 0:
            return x
        j = int(torch.randint(0, len(self.mask_sets), (1,))) if len(self.mask_sets) > 1 else 0
        table = self.mask_sets[j].boolean(clean.device)  # [M, H, W]
        c = min(self.greedy_candidates, table.shape[0])
        xc, yc = clean[:g], labels[:g]
        was = model.training
        model.eval()
        try:
            chosen = torch.zeros(g, *table.shape[1:], dtype=torch.bool, device=clean.device)
            for _ in range(2):
                cand = torch.rand(g, table.shape[0]).argsort(1)[:, :c].to(clean.device)  # [g, c] distinct
                masks = chosen[:, None] | table[cand]  # [g, c, H, W]
                xm = apply_masks(xc.repeat_interleave(c, 0), masks.flatten(0, 1), self.fill)
                with autocast(None):
                    out = model(xm)
                out = out.float()
                out = out.mean((2, 3)) if out.dim() == 4 else out
                loss = F.cross_entropy(out, yc.repeat_interleave(c), reduction="none").view(g, c)
                chosen = masks[torch.arange(g, device=clean.device), loss.argmax(1)]
        finally:
            model.train(was)
        out_x = x.clone()
        out_x[:g] = apply_masks(xc, chosen, self.fill)
        return out_x

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = out.float()
        if s.dim() == 4:
            s = s.mean((2, 3))
        ce = F.cross_entropy(s, labels, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return ce
        soft, self._soft = self._soft, None
        if soft is None or soft.shape != s.shape:  # (class counts are checked when the teacher is loaded)
            raise PatchcertError("objective 'mask_cutout': distillation needs the teacher's targets of this batch "
                                 "(refine must run before loss)")
        temp = self.distill_temperature
        kl = F.kl_div(F.log_softmax(s / temp, dim=1), soft, reduction="batchmean") * temp * temp
        return (1 - self.distill_weight) * ce + self.distill_weight * kl

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "patch": self.patch, "k": self.k, "probs": self.probs, "fill": self.fill,
             "label_smoothing": self.label_smoothing, "masks_per_shape": [len(m) for m in self.mask_sets],
             "greedy_fraction": self.greedy_fraction, "greedy_candidates": self.greedy_candidates}
        if self.centre_weight != 1:  # (absent when uniform: runs made before the option describe themselves unchanged)
            d["centre_weight"] = self.centre_weight
        if self.teacher is not None:
            d.update(teacher=self.teacher_name, distill_weight=self.distill_weight,
                     distill_temperature=self.distill_temperature)
        return d
