"""Defense base class, registry, input validation and the certification record.

A *defense* aggregates a score map ``[N, K, H, W]`` into a prediction ``long [N]`` and
certifies, per image, that no patch confined to a feature window can change that prediction
(``docs/certification.md`` is the exact definition of every certificate).

Margins
-------
Every certificate here is a set of inequalities, one per (window shape, placement, competing
class ``c != y``): ``margin(w, P, c) > 0``, or ``margin == 0`` with ``y < c`` (ties go to the
lowest class index, as in ``torch.argmax``). :meth:`Defense.certify_details` reports, per image,
the *worst* of them: the smallest margin; among equal margins, a case whose tie goes against the
label (competing class below it) first; then the first window, then the first placement in
row-major order. The reported class is the lowest class attaining that margin at that
placement. With that ordering

    ``certified == (margin > 0) | ((margin == 0) & (worst_class > label))``

holds exactly for every image (the tests check it). ``margin == -inf`` (and ``row == col == -1``)
means "not certifiable" (a window larger than the map, or for masking a patch window that does
not fit in the mask window); ``+inf`` means there is no competing class (K == 1). When the
unmodified map is already not classified as the label and no placement inequality shows it
(possible for masking, whose analysis also needs the *unmasked* argmax to be the label), the
reported margin is the clean margin (label score minus the strongest other class, <= 0) with
``row == col == -1``.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

from ..errors import PatchcertError
from ..windows import placements

__all__ = [
    "Defense",
    "CertifyResult",
    "Window",
    "register_defense",
    "list_defenses",
    "create_defense",
    "defense_from_config",
    "defense_class",
    "check_scores",
    "check_labels",
    "check_windows",
    "check_window",
]

Window = tuple[int, int]

_DEFENSES: dict[str, type["Defense"]] = {}

if TYPE_CHECKING:
    from .threat import Threat, ThreatResult

#: Default memory budget (number of float64 elements) for the largest intermediate tensor of
#: one chunk of images; batches are processed in chunks of images that fit it.
ELEMENT_BUDGET = 1 << 22


# -- registry ------------------------------------------------------------------------------


def register_defense(name: str) -> Callable[[type["Defense"]], type["Defense"]]:
    """Class decorator: make ``create_defense(name, ...)`` build this class. A name can be
    registered once (like ``register_model``): a second class under it is an error."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
        raise PatchcertError(f"a defense name must be letters, digits, '_' or '-' (e.g. 'double-masking'), got {name!r}")
    if name in _DEFENSES:
        raise PatchcertError(f"defense {name!r} is already registered (by {_DEFENSES[name].__module__}."
                             f"{_DEFENSES[name].__qualname__})")

    def deco(cls: type["Defense"]) -> type["Defense"]:
        if name in _DEFENSES:
            raise PatchcertError(f"defense {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise PatchcertError(f"register_defense({name!r}): {cls!r} is not a Defense subclass")
        _DEFENSES[name] = cls
        cls.name = name
        return cls

    return deco


def defense_class(name: str) -> type["Defense"]:
    """The class registered under ``name`` (one-line PatchcertError if none)."""
    if not isinstance(name, str) or name not in _DEFENSES:
        raise PatchcertError(f"unknown defense {name!r}; known: {', '.join(list_defenses())}")
    return _DEFENSES[name]


def list_defenses() -> list[str]:
    """Names accepted by :func:`create_defense`."""
    return sorted(_DEFENSES)


def create_defense(name: str, **kwargs: Any) -> "Defense":
    """Build a defense by name (``"masking"``, ``"clipping"``, ``"voting"``, ``"double-masking"``)
    with its options.

    Unknown names, unknown options and bad option values raise :class:`PatchcertError`.
    """
    cls = defense_class(name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise PatchcertError(
            f"{name}: unknown option(s) {', '.join(map(repr, unknown))}; options: {', '.join(allowed)}"
        )
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise PatchcertError(f"{name}: missing required option(s) {', '.join(map(repr, missing))}")
    return cls(**kwargs)


def defense_from_config(config: dict[str, Any]) -> "Defense":
    """Inverse of :attr:`Defense.config`: ``defense_from_config(d.config)`` rebuilds ``d``."""
    if not isinstance(config, dict) or "name" not in config:
        raise PatchcertError(f"a defense config must be a dict with a 'name', got {config!r}")
    cfg = dict(config)
    name = cfg.pop("name")
    return create_defense(name, **defense_class(name).options_from_json(cfg))


# -- validation ----------------------------------------------------------------------------


def check_scores(scores: Any) -> None:
    """Raise :class:`PatchcertError` unless ``scores`` is a finite float tensor ``[N, K, H, W]``
    with ``K, H, W >= 1`` (``N == 0`` is allowed)."""
    if not isinstance(scores, torch.Tensor):
        raise PatchcertError(f"scores must be a float torch.Tensor [N, K, H, W], got {type(scores).__name__}")
    if scores.dim() != 4:
        raise PatchcertError(
            f"scores must have 4 dimensions [N, K, H, W], got {scores.dim()} (shape {tuple(scores.shape)})"
        )
    if not scores.is_floating_point():
        raise PatchcertError(f"scores must be floating point, got {scores.dtype}")
    N, K, H, W = scores.shape
    if K < 1 or H < 1 or W < 1:
        raise PatchcertError(f"scores must have at least one class and one cell, got shape {tuple(scores.shape)}")
    # fast path: a finite sum means every value is finite; otherwise look properly (the sum of
    # finite values may also overflow)
    if N and not bool(torch.isfinite(scores.sum())):
        bad_images = (~torch.isfinite(scores)).flatten(1).any(1)
        if bool(bad_images.any()):
            bad = int(bad_images.nonzero()[0, 0])
            raise PatchcertError(f"scores contain NaN or Inf (first in image {bad})")


def check_labels(labels: Any, n: int, k: int, device: torch.device) -> torch.Tensor:
    """``labels`` as a ``long [n]`` tensor on ``device``; raise unless integer, shape ``[n]``,
    values in ``[0, k)``."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise PatchcertError(f"labels must be an integer tensor [N], got {type(labels).__name__}") from None
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise PatchcertError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise PatchcertError(f"labels must have shape [{n}] (one per score map), got {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise PatchcertError(
            f"labels must be in [0, {k}) for {k} classes, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise PatchcertError(f"{what} must be an int, got {v!r}")
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
        v = int(v)
    try:
        return operator.index(v)
    except TypeError:
        raise PatchcertError(f"{what} must be an int, got {v!r}") from None


def check_window(window: Any, what: str = "window") -> Window:
    """A window as ``(wh, ww)`` of positive ints (an int ``s`` means ``(s, s)``)."""
    if isinstance(window, (int,)) and not isinstance(window, bool):
        window = (window, window)
    if isinstance(window, (str, bytes)) or not isinstance(window, (tuple, list, torch.Size)) or len(window) != 2:
        raise PatchcertError(f"{what} must be a pair (wh, ww) of positive ints, got {window!r}")
    wh, ww = _as_int(window[0], f"{what} height"), _as_int(window[1], f"{what} width")
    if wh < 1 or ww < 1:
        raise PatchcertError(f"{what} must have positive sides, got {wh}x{ww}")
    return (wh, ww)


def check_windows(windows: Any) -> list[Window]:
    """A non-empty list of windows ``(wh, ww)`` with positive sides."""
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise PatchcertError(f"windows must be a list of (wh, ww) pairs, got {windows!r}")
    if len(windows) == 0:
        raise PatchcertError("windows is empty: give at least one (wh, ww) window")
    if len(windows) == 2 and all(isinstance(w, int) and not isinstance(w, bool) for w in windows):
        raise PatchcertError(
            f"windows must be a list of (wh, ww) pairs, got {tuple(windows)!r}; for one window write [{tuple(windows)!r}]"
        )
    return [check_window(w, f"window {i}") for i, w in enumerate(windows)]


def check_fraction(value: Any, what: str, lo_open: bool = False, hi_closed: bool = False) -> float:
    """A float in ``[0, 1)`` (or ``(0, 1]`` etc. per the flags)."""
    if isinstance(value, bool):
        raise PatchcertError(f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PatchcertError(f"{what} must be a number, got {value!r}") from None
    lo_ok = x > 0 if lo_open else x >= 0
    hi_ok = x <= 1 if hi_closed else x < 1
    if not (math.isfinite(x) and lo_ok and hi_ok):
        rng = ("(0" if lo_open else "[0") + ", " + ("1]" if hi_closed else "1)")
        raise PatchcertError(f"{what} must be in {rng}, got {value!r}")
    return x


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise PatchcertError(f"{what} must be True or False, got {value!r}")
    return value


# -- result record ---------------------------------------------------------------------------


@dataclass
class CertifyResult:
    """Per-image outcome of :meth:`Defense.certify_details` (all tensors have length N).

    certified    bool [N]      == ``Defense.certify``
    per_window   bool [N, W]   certified against window ``windows[i]`` alone
    margin       float64 [N]   worst margin over windows, placements and classes (see module doc)
    window_index long [N]      index into ``windows`` of the worst case
    row, col     long [N]      top-left cell of the worst placement (-1: not a placement)
    worst_class  long [N]      competing class of the worst case (-1: none)
    windows      the windows, as given
    """

    certified: torch.Tensor
    per_window: torch.Tensor
    margin: torch.Tensor
    window_index: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    worst_class: torch.Tensor
    windows: list[Window] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.certified.shape[0])

    def to(self, device: torch.device | str) -> "CertifyResult":
        t = {k: getattr(self, k).to(device) for k in _RESULT_TENSORS}
        return CertifyResult(**t, windows=list(self.windows))

    def worst(self, i: int) -> dict[str, Any]:
        """Image ``i``'s worst case as plain Python values (for JSON records)."""
        w = int(self.window_index[i])
        return {
            "margin": float(self.margin[i]),
            "window": list(self.windows[w]) if 0 <= w < len(self.windows) else None,
            "row": int(self.row[i]),
            "col": int(self.col[i]),
            "class": int(self.worst_class[i]),
        }

    @staticmethod
    def cat(parts: list["CertifyResult"], windows: list[Window]) -> "CertifyResult":
        t = {k: torch.cat([getattr(p, k) for p in parts]) for k in _RESULT_TENSORS}
        return CertifyResult(**t, windows=list(windows))


_RESULT_TENSORS = ("certified", "per_window", "margin", "window_index", "row", "col", "worst_class")


def passes(margin: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The tie rule: ``margin > 0``, or ``margin == 0`` and the competing class is above the label."""
    lab = labels.view(labels.shape + (1,) * (margin.dim() - 1))
    return (margin > 0) | ((margin == 0) & (cls > lab))


def competitor(
    values: torch.Tensor, labels: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strongest class other than the label along dim 1.

    ``values`` ``[N, K, ...]`` -> ``(max_{c != y} values[:, c], argmax)`` of shape ``[N, ...]``;
    ties go to the lowest class; ``(-inf, -1)`` when K == 1. ``inplace``: overwrite the label's
    entries of ``values`` with -inf instead of copying.
    """
    N, K = values.shape[:2]
    idx = labels.view((N, 1) + (1,) * (values.dim() - 2)).expand((N, 1) + values.shape[2:])
    v = values.scatter_(1, idx, float("-inf")) if inplace else values.scatter(1, idx, float("-inf"))
    best, cls = v.max(1)
    if K == 1:
        cls = torch.full_like(cls, -1)
    return best, cls


def reduce_placements(
    margin: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Worst placement per image: margin ``[N, Hp, Wp]`` and class ``[N, Hp, Wp]`` (the lowest
    class with that margin at the placement) -> ``(margin, class, row, col)`` each ``[N]``.

    Order: smallest margin; among equal margins a placement whose tie goes against the label
    (class below the label) first; then row-major order."""
    N, Hp, Wp = margin.shape
    m = margin.reshape(N, Hp * Wp)
    c = cls.expand(N, Hp, Wp).reshape(N, Hp * Wp)
    best = m.amin(1)
    cand = m == best[:, None]
    against = cand & (c < labels[:, None])
    cand = torch.where(against.any(1, keepdim=True), against, cand)
    pos = cand.to(torch.uint8).argmax(1)  # first candidate
    return best, c.gather(1, pos[:, None])[:, 0], pos // Wp, pos % Wp


# -- the base class --------------------------------------------------------------------------


class Defense:
    """Base class: ``predict`` and ``certify`` on score maps ``[N, K, H, W]``.

    Subclasses implement :meth:`_prepare` (per-chunk transform of the scores, float64),
    :meth:`_predict_prepared`, :meth:`_clean` and :meth:`_window_margins`; the base class does
    validation, chunking, the tie rule and the reduction to the worst case.
    """

    name: ClassVar[str] = "defense"
    wrap: bool = False
    #: what :meth:`evidence` holds, for plots ("votes", "clipped scores", ...)
    evidence_name: ClassVar[str] = "evidence"
    #: per-cell relaxed evidence lies in [0, 1] (BagCert's margin cap M = 1 applies to the attack)
    relaxation_bounded: ClassVar[bool] = False

    #: where the expensive pass gets its evidence: ``"scores"`` -- the model's score map, one
    #: forward pass per batch shared by every score-map defense (a score file can stand in for
    #: the model); ``"images"`` -- the defense runs the model itself on modified images
    #: (:class:`patchcert.defenses.pixels.PixelDefense`)
    evidence_source: ClassVar[str] = "scores"
    #: images a training evaluation certifies per epoch (None: the whole evaluation set; an
    #: expensive pass sets a sample size)
    eval_images: ClassVar[int | None] = None

    # -- the run protocol (patchcert.defenses.threat): one for every family --------------------
    @classmethod
    def options_from_json(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Constructor options from their JSON form (JSON has lists, options have pairs)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}

    @classmethod
    def for_threat(cls, options: dict[str, Any], threat: "Threat") -> "Defense":
        """Build the defense a run uses against ``threat`` from the options a spec gave.
        Default: the options as given, with ``wrap=True`` on a wrapping score map when the spec
        does not say (a defense with ``wrap=False`` there is refused: it would skip the
        wrapping placements, an unsound certificate). Subclasses fill in threat-dependent
        defaults (masking: the mask window; double masking: the mask set)."""
        options = dict(options)
        takes_wrap = "wrap" in inspect.signature(cls.__init__).parameters
        if threat.wrap and takes_wrap and "wrap" not in options:
            options["wrap"] = True
        d = create_defense(cls.name, **options)
        if threat.wrap and not d.wrap:
            raise PatchcertError("the score map's windows wrap around its edges (geometry.wrap); wrap=false would "
                                 "miss placements")
        return d

    def describe(self) -> dict[str, Any]:
        """Facts a run records about the built defense beyond its ``config`` (e.g. mask count)."""
        return {}

    def compute_evidence(self, model: Any, images: torch.Tensor | None, scores: torch.Tensor | None,
                         labels: torch.Tensor | None = None) -> Any:
        """The expensive pass of one batch. Score maps: the batch's score map itself."""
        if scores is None:
            raise PatchcertError(f"{self.key} needs score maps")
        return scores

    def predict_evidence(self, evidence: Any) -> torch.Tensor:
        """Prediction per image from the evidence of :meth:`compute_evidence` -> long ``[N]``."""
        return self.predict(evidence)

    def certify_threat(self, evidence: Any, labels: torch.Tensor, patch: Any) -> "ThreatResult":
        """Certificate per image against one patch threat (see :mod:`patchcert.defenses.threat`)."""
        from .threat import scoremap_certify_threat

        return scoremap_certify_threat(self, evidence, labels, patch)

    def largest_square(self, evidence: Any, labels: torch.Tensor, windows: Sequence[Window],
                       known: dict | None = None, pred: torch.Tensor | None = None,
                       method: str = "bisect") -> torch.Tensor | None:
        """Largest certified square side per image (``windows[s-1]``: the feature window of an
        ``s x s`` patch), or None when the defense does not search squares."""
        from ..squares import largest_certified_square

        return largest_certified_square(self, evidence, labels, windows, method=method, known=known, pred=pred)

    # -- self-description: what certify, attack, report and training need to know ------------
    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        """Options of representative instances for maps of a few cells (``create_defense(name,
        **cfg)``); the soundness tests run every registered defense with each of them. An
        empty list opts a (deliberately broken, test-only) defense out of those tests."""
        return [{}]

    @torch.no_grad()
    def evidence(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-cell evidence float64 ``[N, K, H, W]`` whose sums the defense aggregates (votes,
        clipped scores, clipped features). Default: the values of :meth:`_prepare`."""
        check_scores(scores)
        chunk = self._chunk(scores.shape, [])
        parts = [self._prepare(scores[s : s + chunk]).values.to(torch.float64) for s in range(0, scores.shape[0], chunk)]
        return torch.cat(parts) if parts else scores.new_zeros(scores.shape, dtype=torch.float64)

    def evidence_bounds(self) -> tuple[float, float | None]:
        """``(lo, hi)``: the range of one cell's evidence, i.e. what a patch can put in a cell
        (``hi`` None: unbounded). Used to rank attack candidates."""
        return (0.0, None)

    def relaxed_evidence(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """A differentiable stand-in for :meth:`evidence` (same shape), for gradient attacks.
        Default: straight-through (the exact evidence forward, the identity backward)."""
        with torch.no_grad():
            hard = self.evidence(scores.detach()).to(scores.dtype)
        return scores + (hard - scores).detach()

    def relaxed_totals(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Differentiable class totals ``[N, K]`` whose argmax mimics :meth:`predict` (the
        attack's ``defense`` surrogate climbs their margin). Default: summed relaxed evidence."""
        return self.relaxed_evidence(scores, temperature).sum((2, 3))

    def attack_surrogates(self, strong: bool) -> list[str]:
        """Smooth objectives per attack restart (see ``patchcert.attacks.surrogate``)."""
        return ["defense", "logits"] if strong else ["defense"]

    def analysis_window(self, window: Window) -> Window:
        """The window whose placements the certificate for patch window ``window`` runs over
        (and :meth:`margin_map` is indexed by): the window itself, or e.g. a mask window."""
        return self._analysis_window(check_window(window))

    # -- public API --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """Predicted class per image: float ``[N, K, H, W]`` -> long ``[N]`` (ties: lowest class)."""
        check_scores(scores)
        N, K, H, W = scores.shape
        chunk = self._chunk(scores.shape, [])
        outs = [self._predict_prepared(self._prepare(scores[s : s + chunk])) for s in range(0, N, chunk)]
        if not outs:
            return torch.zeros(0, dtype=torch.long, device=scores.device)
        return torch.cat(outs)

    @torch.no_grad()
    def certify(self, scores: torch.Tensor, labels: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
        """True where the prediction is ``labels`` and no patch in any of ``windows`` (list of
        ``(wh, ww)``), at any placement, can change it. float ``[N,K,H,W]``, long ``[N]`` -> bool ``[N]``."""
        return self.certify_details(scores, labels, windows).certified

    @torch.no_grad()
    def certify_details(self, scores: torch.Tensor, labels: torch.Tensor, windows: Sequence[Window]) -> CertifyResult:
        """:meth:`certify` plus, per image, the worst case (margin, window, placement, class)."""
        check_scores(scores)
        windows = check_windows(windows)
        N, K, H, W = scores.shape
        labels = check_labels(labels, N, K, scores.device)
        chunk = self._chunk(scores.shape, windows)
        parts = [
            self._certify_chunk(scores[s : s + chunk], labels[s : s + chunk], windows) for s in range(0, N, chunk)
        ]
        if not parts:
            parts = [self._certify_chunk(scores, labels, windows)]
        return CertifyResult.cat(parts, windows)

    @torch.no_grad()
    def margin_map(self, scores: torch.Tensor, labels: torch.Tensor, window: Window) -> torch.Tensor:
        """Worst margin over competing classes at every placement of ``window``: float64
        ``[N, H', W']`` indexed by the placement's top-left cell (``H' = H - wh + 1``, or ``H``
        with wrap-around; empty if the window does not fit). Masking uses its mask window's
        placements. The clean-prediction requirement of :meth:`certify` is not part of it."""
        check_scores(scores)
        window = check_window(window)
        N, K, H, W = scores.shape
        labels = check_labels(labels, N, K, scores.device)
        chunk = self._chunk(scores.shape, [window])
        outs = []
        for s in range(0, max(N, 1), chunk):
            sc, lab = scores[s : s + chunk], labels[s : s + chunk]
            prep = self._prepare(sc)
            res = self._window_margins(prep, lab, window)
            shape = self._placement_shape((H, W), self._analysis_window(window))
            if res is None:
                outs.append(torch.full((sc.shape[0],) + shape, float("-inf"), dtype=torch.float64, device=sc.device))
            else:
                outs.append(res[0].expand((sc.shape[0],) + shape).clone())
        return torch.cat(outs)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable parameters, including ``name``; ``defense_from_config`` inverts it."""
        return {"name": self.name, **self._params()}

    @property
    def key(self) -> str:
        """Short stable label, e.g. ``voting(sign,3.2)``."""
        return f"{self.name}({','.join(self._key_parts() + (['wrap'] if self.wrap else []))})"

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Defense) and self.config == other.config

    def __hash__(self) -> int:
        return hash(self.key)

    # -- subclass hooks ----------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def _key_parts(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self, scores: torch.Tensor) -> Any:
        """Per-chunk transform of validated scores (float64 values, sums, caches)."""
        raise NotImplementedError

    def _predict_prepared(self, prep: Any) -> torch.Tensor:
        raise NotImplementedError

    def _clean(self, prep: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ok bool [N], clean margin float64 [N], class long [N])``: the certificate's
        requirements on the unmodified map (prediction == label, ...)."""
        raise NotImplementedError

    def _window_margins(
        self, prep: Any, labels: torch.Tensor, window: Window
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-placement worst margin and the lowest class attaining it, each broadcastable to
        ``[N, Hp, Wp]``, or None when the window cannot be certified at all (e.g. larger than the
        map)."""
        raise NotImplementedError

    def _window_worst(
        self, prep: Any, labels: torch.Tensor, window: Window
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Worst placement of one window per image: ``(margin, class, row, col)`` each ``[N]``,
        in the order of :func:`reduce_placements`; None when the window cannot be certified.
        Subclasses may override it with something faster than reducing the full map."""
        res = self._window_margins(prep, labels, window)
        if res is None:
            return None
        mm, cc = res
        N = labels.shape[0]
        if mm.shape[1:] == (1, 1):  # placement-independent (Condition 3.3)
            zero = torch.zeros(N, dtype=torch.long, device=mm.device)
            return mm[:, 0, 0], cc.expand(mm.shape)[:, 0, 0], zero, zero.clone()
        return reduce_placements(mm, cc, labels)

    def _analysis_window(self, window: Window) -> Window:
        """The window whose placements the analysis of ``window`` runs over."""
        return window

    def window_class(self, window: Window) -> Any:
        """A key such that windows with equal keys are certified for exactly the same images on
        every map (searches over window sizes certify one window per key). Default: the window."""
        return tuple(window)

    def _elements_per_image(self, shape: Sequence[int], windows: list[Window]) -> int:
        """Rough size of the largest intermediate per image (float64 elements)."""
        N, K, H, W = shape
        return 4 * K * (2 * H) * (2 * W)

    # -- machinery -----------------------------------------------------------------------
    def _placement_shape(self, size: tuple[int, int], window: Window) -> tuple[int, int]:
        return placements(size, window, self.wrap)

    def _chunk(self, shape: Sequence[int], windows: list[Window]) -> int:
        per = max(1, int(self._elements_per_image(shape, windows)))
        return max(1, ELEMENT_BUDGET // per)

    def _certify_chunk(self, scores: torch.Tensor, labels: torch.Tensor, windows: list[Window]) -> CertifyResult:
        N = scores.shape[0]
        dev = scores.device
        prep = self._prepare(scores)
        ok, clean_margin, clean_cls = self._clean(prep, labels)
        ms, cs, rs, cols, pws = [], [], [], [], []
        for w in windows:
            res = self._window_worst(prep, labels, w)
            if res is None:
                m = torch.full((N,), float("-inf"), dtype=torch.float64, device=dev)
                c = torch.full((N,), -1, dtype=torch.long, device=dev)
                r = torch.full((N,), -1, dtype=torch.long, device=dev)
                q = r.clone()
            else:
                m, c, r, q = res
            ms.append(m)
            cs.append(c)
            rs.append(r)
            cols.append(q)
            pws.append(passes(m, c, labels) & ok)
        M, C, R, Q = (torch.stack(x, 1) for x in (ms, cs, rs, cols))  # [N, nW]
        # across windows: min margin, then a tie against the label, then the first window
        best, cbest, _, widx = reduce_placements(M[:, None, :], C[:, None, :], labels)
        row = R.gather(1, widx[:, None])[:, 0]
        col = Q.gather(1, widx[:, None])[:, 0]
        per_window = torch.stack(pws, 1)
        certified = per_window.all(1)
        # the unmodified map fails a requirement the placement margins do not show: report it
        fold = passes(best, cbest, labels) & ~ok
        if bool(fold.any()):
            best = torch.where(fold, clean_margin, best)
            cbest = torch.where(fold, clean_cls, cbest)
            row = torch.where(fold, torch.full_like(row, -1), row)
            col = torch.where(fold, torch.full_like(col, -1), col)
        return CertifyResult(certified, per_window, best, widx, row, col, cbest, list(windows))


# -- shared numerics -------------------------------------------------------------------------

#: Clipped values are stored in fixed point: multiples of ``grid_for(scale)``, a power of two
#: with ``scale / grid <= 2^32``. Sums of such values are exact in float64 while their magnitude
#: stays below ``2^50`` grid steps (checked; the headroom lets half-steps be exact too), so every
#: sum, window sum and difference of sums is exact and independent of the summation order:
#: ``predict`` and ``certify`` agree to the last bit and exact ties are real ties.
GRID_BITS = 32
EXACT_LIMIT = 2.0**50


def grid_for(scale: float) -> float:
    """Fixed-point step for values of magnitude at most ``scale``: ``2^(ceil(log2 scale) - 32)``."""
    return 2.0 ** (math.ceil(math.log2(scale)) - GRID_BITS)


def to_grid(x: torch.Tensor, grid: float) -> torch.Tensor:
    """Round float64 ``x`` to the nearest multiple of ``grid`` (a power of two; ties to even)."""
    return torch.round(x / grid) * grid


def to_grid_(x: torch.Tensor, grid: float) -> torch.Tensor:
    """In-place :func:`to_grid` (scaling by a power of two is exact either way)."""
    return x.div_(grid).round_().mul_(grid)


def check_exact(mass: float, grid: float, what: str) -> None:
    """Raise unless a bound ``mass`` on every (periodically extended) partial sum of absolute
    values stays below ``2^50`` grid steps, i.e. every sum is exact in float64."""
    if not mass / grid < EXACT_LIMIT:
        raise PatchcertError(
            f"{what}: score magnitudes too large for exact float64 sums (a class's total |value| "
            f"may reach {mass:.3g}); rescale the scores or clip them"
        )


# window sums live in patchcert.windows; re-exported here for the defenses that import them from base
from ..windows import extend_periodic, summed_area  # noqa: E402,F401
from ..windows import table_window_sums as window_sums  # noqa: E402,F401
