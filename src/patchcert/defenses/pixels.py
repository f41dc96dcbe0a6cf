"""The pixel family: defenses that run the classifier themselves on modified images.

A pixel defense is one :class:`PixelDefense` subclass plus ``@register_defense("name")``
(double masking, :mod:`patchcert.defenses.double_masking`, is one; ``tests/test_custom_pixel_defense.py``
writes another in a test file). It implements the run protocol of
:mod:`patchcert.defenses.threat`:

* :meth:`compute_evidence` -- the expensive pass: the model on modified images of one batch
  (double masking: a masked-prediction table). ``labels`` may be given, so that a
  certificate can stop as soon as it is settled;
* :meth:`predict_evidence` and :meth:`certify_threat` -- cheap and exact, on that evidence;

and describes itself to the attack (:meth:`attack_placements`, :meth:`attack_masks`,
:meth:`predict_images`) and to the report (:meth:`disagreement`). It has no score-map API:
``predict(scores)`` and friends refuse with a one-line error, and a score file cannot stand in
for its model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from ..errors import PatchcertError
from .base import Defense, Window

__all__ = ["PixelDefense"]


class PixelDefense(Defense):
    """Base class of the pixel family (see the module docstring)."""

    evidence_source: ClassVar[str] = "images"
    evidence_name: ClassVar[str] = "masked predictions"
    #: pixel value of masked pixels (the attack's masked objective uses it)
    fill: float = 0.5

    # -- the protocol --------------------------------------------------------------------
    def compute_evidence(self, model: Any, images: torch.Tensor | None, scores: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None) -> Any:
        raise NotImplementedError

    def predict_evidence(self, evidence: Any) -> torch.Tensor:
        raise NotImplementedError

    def certify_threat(self, evidence: Any, labels: torch.Tensor, patch: Any) -> Any:
        raise NotImplementedError

    def largest_square(self, evidence: Any, labels: torch.Tensor, windows: Sequence[Window],
                       known: dict | None = None, pred: torch.Tensor | None = None,
                       method: str = "bisect") -> torch.Tensor | None:
        """None: squares are not searched (override where the certificate allows it)."""
        return None

    def uncovered(self, shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Shapes of a threat this defense can never certify (a run warns about them)."""
        return []

    def classifier(self, model: Any) -> Any:
        """The classifier the defense evaluates (masked) images with; the attack climbs its
        loss. Default: the model itself (double masking with ``flip``: the flip-averaged model)."""
        return model

    @torch.no_grad()
    def predict_images(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """The deployed defense on images ``[N, C, H, W]`` -> long ``[N]``."""
        return self.predict_evidence(self.compute_evidence(model, images, None, None))

    # -- self-description for the attack and the report ----------------------------------
    def attack_placements(self, evidence: Any, labels: torch.Tensor, shape: tuple[int, int], n_random: int,
                          generator: torch.Generator) -> list[list[tuple[int, int]]]:
        """Per image, top-left pixels where the attack tries a ``shape`` patch, most promising
        first. Default: ``n_random`` uniform placements."""
        h, w = self.image_size
        out = []
        for _ in range(int(labels.shape[0])):
            tops = torch.randint(0, h - shape[0] + 1, (n_random,), generator=generator).tolist()
            lefts = torch.randint(0, w - shape[1] + 1, (n_random,), generator=generator).tolist()
            out.append(list(dict.fromkeys(zip(tops, lefts))))
        return out

    def attack_masks(self, top: int, left: int, shape: tuple[int, int], device: Any) -> torch.Tensor:
        """Masks ``[K, H, W]`` bool whose masked images a patch at ``(top, left)`` still reaches
        (the attack also climbs their loss). Default: none."""
        h, w = self.image_size
        return torch.zeros(0, h, w, dtype=torch.bool, device=device)

    def disagreement(self, worst: Any) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]] | None:
        """For the report: from one record's ``worst`` entry, a map ``[H, W]`` of where the
        defense's evidence disagrees with the label and rectangles ``(top, left, h, w)`` to
        outline; None if there is nothing to draw."""
        return None

    @property
    def image_size(self) -> tuple[int, int]:
        raise PatchcertError(f"{self.key}: not built for a threat yet (use create_defense(...).for_threat or "
                             "a run)")

    # -- no score-map API ----------------------------------------------------------------
    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise PatchcertError(f"{self.key} works on images and needs the model; it has no score-map "
                             "predict/certify (use compute_evidence, predict_evidence, certify_threat)")

    predict = certify = certify_details = margin_map = evidence = relaxed_evidence = _refuse  # type: ignore[assignment]

    def _key_parts(self) -> list[str]:
        return [f"{k}={v}" for k, v in self._params().items() if v is not None]
