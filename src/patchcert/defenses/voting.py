"""Binary votes: BagCert (Metzen & Yatsura 2021) and De-randomized smoothing (Levine & Feizi 2020).

Every cell of the score map ``[N, K, H, W]`` casts votes ``s[c] in {0, 1}``:

* ``binarize="sign"``   -- BagCert's Heaviside: ``s = 1[score >= 0]`` (any number of classes);
* ``binarize="argmax"`` -- one vote for the cell's argmax (ties: lowest class);
* ``binarize=θ`` (float in (0, 1]) -- DS: ``s = 1[softmax(scores)[c] >= θ]`` (softmax over K,
  computed in float64; a cell may vote for several classes, or none).

Prediction: argmax of the vote counts ``n[c]`` (ties: lowest class).

Certificates (label ``y``; ``|P| = wh * ww``):

* Condition ``"3.2"`` (exact for every placement): for every placement ``P`` and ``c != y``,
  ``margin = (n[y] - sum_P s_y) - (n[c] - sum_P s_c) - |P|`` must be > 0, or == 0 with
  ``y < c``. The adversary's best move in ``P`` (``y`` gets no vote, ``c`` one in every cell) is
  available under every binarisation, so the condition is also necessary: a map that fails it
  can be flipped. Window sums come from one summed-area table per batch; per placement only the
  largest competing count is needed (see ``_common.outside_worst``).
* Condition ``"3.3"`` (DS's global rule): ``margin = n[y] - n[c] - 2 |P|`` > 0, or == 0 with
  ``y < c``, for every window asked for (so for the largest area). Never certifies more than 3.2.

A window larger than the map is never certified. With ``wrap=True`` windows also wrap around the
right/bottom edges (DS's bands); prediction does not depend on ``wrap``. Vote counts are exact
integers (float32 below 2^24, else float64), so every comparison is exact; margins are reported
in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PatchcertError
from ._common import Prepared, outside_worst
from .base import Defense, Window, check_bool, check_fraction, check_scores, competitor, register_defense

__all__ = ["Voting", "binarize_votes"]


def _parse_binarize(binarize: Any) -> str | float:
    if isinstance(binarize, str):
        b = binarize.strip().lower()
        if b in ("sign", "argmax"):
            return b
        try:
            binarize = float(b)
        except ValueError:
            raise PatchcertError(
                f"voting: binarize must be 'sign', 'argmax' or a softmax threshold θ in (0, 1], got {binarize!r}"
            ) from None
    if isinstance(binarize, bool) or not isinstance(binarize, (int, float)):
        raise PatchcertError(
            f"voting: binarize must be 'sign', 'argmax' or a softmax threshold θ in (0, 1], got {binarize!r}"
        )
    return check_fraction(binarize, "voting: softmax threshold θ (binarize)", lo_open=True, hi_closed=True)


def binarize_votes(scores: torch.Tensor, binarize: str | float) -> torch.Tensor:
    """Votes as bool ``[N, K, H, W]`` from scores ``[N, K, H, W]``."""
    if binarize == "sign":
        return scores >= 0
    if binarize == "argmax":
        K = scores.shape[1]
        return F.one_hot(scores.argmax(1), K).permute(0, 3, 1, 2).bool()
    p = torch.softmax(scores.to(torch.float64), 1)
    return p >= float(binarize)


@register_defense("voting")
class Voting(Defense):
    """Vote counting with Condition 3.2 (BagCert, per window) or 3.3 (DS, global)."""

    def __init__(self, binarize: str | float = "sign", condition: str = "3.2", wrap: bool = False) -> None:
        self.binarize = _parse_binarize(binarize)
        cond = str(condition).strip() if isinstance(condition, (str, float)) else None
        if cond not in ("3.2", "3.3"):
            raise PatchcertError(f"voting: condition must be '3.2' or '3.3', got {condition!r}")
        self.condition = cond
        self.wrap = check_bool(wrap, "voting: wrap")

    evidence_name = "votes"
    relaxation_bounded = True

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"binarize": b, "condition": c, "wrap": w}
                for b in ("sign", "argmax", 0.3) for c in ("3.2", "3.3") for w in (False, True)]

    def votes(self, scores: torch.Tensor) -> torch.Tensor:
        """Votes float64 ``[N, K, H, W]`` in {0, 1} (validated scores)."""
        return binarize_votes(scores, self.binarize).to(torch.float64)

    @torch.no_grad()
    def evidence(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return self.votes(scores)

    def evidence_bounds(self) -> tuple[float, float | None]:
        return (0.0, 1.0)

    def relaxed_evidence(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Smooth votes in [0, 1]: sigmoid (sign votes, BagCert's relaxation), softmax (argmax
        votes), or a steep sigmoid of the softmax around the threshold (DS)."""
        if self.binarize == "sign":
            return torch.sigmoid(scores / temperature)
        if self.binarize == "argmax":
            return torch.softmax(scores / temperature, 1)
        return torch.sigmoid((torch.softmax(scores, 1) - float(self.binarize)) / (0.05 * temperature))

    def attack_surrogates(self, strong: bool) -> list[str]:
        if not strong:
            return ["defense"]
        return ["defense", "hinge" if self.binarize == "sign" else "logits"]

    # -- hooks ---------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"binarize": self.binarize, "condition": self.condition, "wrap": self.wrap}

    def _key_parts(self) -> list[str]:
        b = self.binarize if isinstance(self.binarize, str) else repr(self.binarize)
        return [b, self.condition]

    def _prepare(self, scores: torch.Tensor) -> Prepared:
        H, W = scores.shape[2:]
        # counts (and the summed-area table of a periodically extended map) are integers below
        # 4 H W: exact in float32 (with half-integers, see outside_worst) below 2^22; twice as
        # fast as float64
        dtype = torch.float32 if 4 * H * W < 2**22 else torch.float64
        return Prepared.build(binarize_votes(scores, self.binarize), self.wrap, dtype)

    def _predict_prepared(self, prep: Prepared) -> torch.Tensor:
        return prep.total.argmax(1)

    def _clean(self, prep: Prepared, labels: torch.Tensor):
        n = prep.total.to(torch.float64)
        ok = n.argmax(1) == labels
        best, cls = competitor(n, labels)
        return ok, n.gather(1, labels[:, None])[:, 0] - best, cls

    def _window_margins(self, prep: Prepared, labels: torch.Tensor, window: Window):
        if not prep.fits(window):
            return None
        area = float(window[0] * window[1])
        n = prep.total
        if self.condition == "3.3":
            n = n.to(torch.float64)
            best, cls = competitor(n, labels)
            m = (n.gather(1, labels[:, None])[:, 0] - best) - 2.0 * area
            return m[:, None, None], cls[:, None, None]
        S = prep.window_sums(window)  # [N, K, Hp, Wp]
        outside = n[:, :, None, None] - S  # votes the patch cannot touch
        oy = outside.gather(1, labels[:, None, None, None].expand(-1, 1, *S.shape[2:]))[:, 0]
        best, cls = competitor(outside, labels, inplace=True)
        return ((oy - best) - area).to(torch.float64), cls

    def _window_worst(self, prep: Prepared, labels: torch.Tensor, window: Window):
        if self.condition == "3.3" or not prep.fits(window):
            return super()._window_worst(prep, labels, window)
        return outside_worst(prep, labels, window, 0.5, -float(window[0] * window[1]), 0.0)

    def _elements_per_image(self, shape, windows) -> int:
        N, K, H, W = shape
        return 5 * K * (2 * H) * (2 * W) if self.wrap else 5 * K * (H + 1) * (W + 1)
