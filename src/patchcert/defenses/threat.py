"""What a run tells a defense about its threat, and what a defense answers per threat.

Every defense, whatever its family, is used by a run (certify, attack, training evaluation)
the same way::

    d = cls.for_threat(options, threat)             # built once per run (Defense.for_threat)
    ev = d.compute_evidence(model, images, scores, labels)   # the expensive pass, per batch
    pred = d.predict_evidence(ev)                    # cheap, on the evidence
    res = d.certify_threat(ev, labels, patch)        # cheap: a ThreatResult per patch threat

Score-map defenses' evidence is the model's score map (computed once per batch and shared by
all of them; a saved score file can stand in for the model). Pixel defenses
(:class:`patchcert.defenses.pixels.PixelDefense`, e.g. double masking) run the model
themselves on modified images; their evidence is e.g. a masked-prediction table.

A *patch threat* (``patch`` above) is anything with ``shapes`` (the pixel rectangles
``(ph, pw)`` it allows), ``windows`` (their distinct feature windows on the score map) and
``shape_window`` (index into ``windows`` per shape), e.g. :class:`patchcert.certify.PatchPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

__all__ = ["Threat", "ThreatResult", "PatchThreat"]


class PatchThreat(Protocol):
    """One patch threat as a run resolved it (see the module docstring)."""

    shapes: list[tuple[int, int]]
    windows: list[tuple[int, int]]
    shape_window: list[int]


@dataclass(frozen=True)
class Threat:
    """Everything about a run's threat a defense may need to build itself.

    ``image_size``: ``(H, W)`` pixels; ``shapes``: every pixel rectangle of every requested
    patch threat, in order; ``windows``: their feature windows on the score map (empty without
    a score-map geometry); ``wrap``: the score map's windows wrap around its edges;
    ``mask_shapes``: the shapes a mask-based defense without an explicit patch covers (the
    bounding shape when every threat is one rectangle, else every shape).
    """

    image_size: tuple[int, int]
    shapes: tuple[tuple[int, int], ...] = ()
    windows: tuple[tuple[int, int], ...] = ()
    wrap: bool = False
    mask_shapes: tuple[tuple[int, int], ...] = ()

    @property
    def covering_window(self) -> tuple[int, int] | None:
        """The smallest window containing every requested feature window (None if none)."""
        if not self.windows:
            return None
        return (max(w[0] for w in self.windows), max(w[1] for w in self.windows))


@dataclass
class ThreatResult:
    """A defense's answer for one patch threat on one batch of N images.

    ``certified`` bool [N]; ``per_shape`` bool [N, S] (certified against each shape of the
    threat alone; None for a one-shape threat); ``worst``: per image, the record object that
    explains the certificate (:class:`patchcert.results.WorstCase` for score maps,
    :class:`patchcert.results.MaskPairCase` for double masking, or None); ``known``:
    certificates by feature window the largest-square search may reuse.
    """

    certified: torch.Tensor
    per_shape: torch.Tensor | None
    worst: list[Any]
    known: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


def scoremap_certify_threat(defense: Any, scores: torch.Tensor, labels: torch.Tensor,
                            patch: PatchThreat) -> ThreatResult:
    """The score-map family's certificate for one threat: :meth:`Defense.certify_details` over
    the threat's windows; per shape, the certificate of its window."""
    from ..results import WorstCase

    windows: Sequence[tuple[int, int]] = patch.windows
    det = defense.certify_details(scores, labels, windows)
    known = {tuple(w): det.per_window[:, i].to(torch.bool) for i, w in enumerate(windows)}
    margin = det.margin.tolist()
    wi, rr, cc, wc = det.window_index.tolist(), det.row.tolist(), det.col.tolist(), det.worst_class.tolist()
    worst = [WorstCase(margin[i], windows[wi[i]], rr[i], cc[i], wc[i]) if 0 <= wi[i] < len(windows) else None
             for i in range(len(margin))]
    per_shape = det.per_window.to(torch.bool)[:, patch.shape_window] if len(patch.shapes) > 1 else None
    return ThreatResult(det.certified.to(torch.bool), per_shape, worst, known)
