"""Any image classifier as a patchcert model: :func:`wrap_classifier` and :func:`as_model`.

Double masking (PatchCleanser) certifies *any* classifier: it needs only the model's
predictions on masked images. A user's ``nn.Module`` that maps float images in [0, 1],
``[N, C, H, W]``, to logits ``[N, K]`` is wrapped into a :class:`Classifier`: a
:class:`~patchcert.models.base.ScoreMapModel` whose "score map" is the logits as one cell
(``[N, K, 1, 1]``, global geometry), with an optional ``mean``/``std`` normalisation in front.
No subclassing, registration or receptive-field geometry is needed; the number of classes
comes from the module's output (:meth:`Classifier.infer_num_classes`), the input size from the
data. A classifier has no score map, so only the pixel defenses (double masking) apply to it:
:func:`patchcert.inputs.check_defenses_fit` refuses the score-map ones with one line naming
those that fit.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..geometry import Geometry
from .base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ScoreMapModel

__all__ = ["Classifier", "wrap_classifier", "as_model", "NORMALIZATION_PRESETS", "resolve_normalization"]

log = logging.getLogger(__name__)

#: ``--mean/--std`` presets (per-channel, for images in [0, 1])
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

def _floats(v: Any, what: str) -> tuple[float, ...]:
    if isinstance(v, torch.Tensor):
        v = v.reshape(-1).tolist()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (float(v),) * 3
    if not isinstance(v, (list, tuple)) or not v or any(isinstance(a, bool) or not isinstance(a, (int, float))
                                                         for a in v):
        raise PatchcertError(f"{what} must be a number or one number per channel, got {v!r}")
    return tuple(float(a) for a in v)


def resolve_normalization(mean: Any = None, std: Any = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from numbers / per-channel sequences or a preset name (``imagenet``,
    ``cifar10``, ``none``; given as ``mean`` alone, or as both); no normalisation by default."""
    if isinstance(mean, str) or isinstance(std, str):
        name = mean if isinstance(mean, str) else std
        if name not in NORMALIZATION_PRESETS:
            raise PatchcertError(f"unknown normalisation preset {name!r}; presets: {', '.join(NORMALIZATION_PRESETS)}")
        if (isinstance(mean, str) and std is not None and std != mean) or (isinstance(std, str) and mean is not None
                                                                          and mean != std):
            raise PatchcertError(f"normalisation preset {name!r} sets both mean and std; give it once")
        return NORMALIZATION_PRESETS[name]
    m = _floats(mean, "mean") if mean is not None else (0.0,) * 3
    s = _floats(std, "std") if std is not None else (1.0,) * 3
    if len(m) != len(s):
        raise PatchcertError(f"mean has {len(m)} values but std has {len(s)}")
    if any(not a > 0 for a in s):
        raise PatchcertError(f"std must be positive, got {s}")
    return m, s


class Classifier(ScoreMapModel):
    """A plain classifier (images in [0, 1] -> logits ``[N, K]``) as a one-cell score-map model.

    ``score_map(x)`` checks the images (float, in [0, 1], ``C`` channels), normalises them with
    ``mean``/``std`` and returns the module's logits as ``[N, K, 1, 1]``; ``logits(x)`` returns
    ``[N, K]``. ``num_classes`` is known once the module has run
    (:meth:`infer_num_classes`); the geometry is global (no receptive field is claimed).
    """

    #: no spatial score map: only pixel defenses (double masking) fit
    has_score_map = False

    def __init__(self, module: nn.Module, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), name: str | None = None,
                 config: dict[str, Any] | None = None, num_classes: int | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise PatchcertError(f"the model must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(module, ScoreMapModel):
            raise PatchcertError(f"{type(module).__name__} is a patchcert model already; use it as it is")
        super().__init__(mean, std)
        self.module = module
        self.arch = name or f"classifier:{type(module).__name__}"
        self.config = {"mean": list(map(float, mean)), "std": list(map(float, std)), **(config or {})}
        self.num_classes = int(num_classes or 0)
        self.geometry = Geometry(rf=(None, None), stride=(1, 1), offset=(0, 0), wrap=False, input_size=None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise PatchcertError(f"{self.arch}: the module returned {type(out).__name__}, expected logits [N, K]")
        if out.dim() == 4 and out.shape[-2:] == (1, 1):
            out = out.flatten(1)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise PatchcertError(f"{self.arch}: the module maps {tuple(x.shape)} images to {tuple(out.shape)}; "
                                 f"expected logits [{x.shape[0]}, K]")
        if self.num_classes and out.shape[1] != self.num_classes:
            raise PatchcertError(f"{self.arch}: the module returned {out.shape[1]} logits, expected {self.num_classes}")
        return out

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, :, None, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits ``[N, K]``."""
        return self.score_map(x).flatten(1)

    def infer_num_classes(self, image_size: Sequence[int]) -> int:
        """Run the module once on a gray image of ``image_size`` (eval mode, no grad) and set
        ``num_classes`` from its output."""
        try:
            p = next(self.parameters())
            dev, dt = p.device, (p.dtype if p.is_floating_point() else torch.float32)
        except StopIteration:
            dev, dt = torch.device("cpu"), torch.float32
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = torch.full((1, self.mean.shape[1], int(image_size[0]), int(image_size[1])), 0.5, device=dev)
                out = self.forward_features(self.normalize(x.to(dt)))
        except PatchcertError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PatchcertError(f"{self.arch}: the module fails on {image_size[0]}x{image_size[1]} images "
                                 f"({msg})") from None
        finally:
            self.train(was)
        k = int(out.shape[1])
        if k < 2:
            raise PatchcertError(f"{self.arch}: the module returns {k} logit(s); a classifier needs at least 2 classes")
        self.num_classes = k
        return k

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}"


def wrap_classifier(module: nn.Module, mean: Any = None, std: Any = None, name: str | None = None,
                    num_classes: int | None = None) -> Classifier:
    """Wrap a classifier (float images in [0, 1], ``[N, C, H, W]`` -> logits ``[N, K]``) for
    patchcert. ``mean``/``std``: the normalisation the module expects, applied inside the
    wrapper (numbers, per-channel sequences, or a preset name: ``"imagenet"``, ``"cifar10"``);
    default none (the module normalises itself, or needs none). ``num_classes``: default from
    the output, on first use with data."""
    m, s = resolve_normalization(mean, std)
    cfg = {} if mean is None and std is None else {"normalization": mean if isinstance(mean, str) else
                                                   (std if isinstance(std, str) else "custom")}
    return Classifier(module, m, s, name=name, config=cfg, num_classes=num_classes)


def as_model(model: Any, image_size: Sequence[int] | None = None) -> Any:
    """``model`` ready for :func:`patchcert.certify_dataset` / ``attack_dataset``: a patchcert model
    as it is; a plain ``nn.Module`` wrapped by :func:`wrap_classifier` (no normalisation). A
    classifier whose number of classes is unknown runs once on ``image_size``."""
    if model is None or isinstance(model, ScoreMapModel) and not isinstance(model, Classifier):
        return model
    if not isinstance(model, Classifier) and callable(getattr(model, "score_map", None)) \
            and getattr(model, "geometry", None) is not None:
        return model  # a module that follows the score-map protocol without subclassing ScoreMapModel
    if not isinstance(model, nn.Module):
        raise PatchcertError(f"the model must be a torch.nn.Module (images in [0, 1] -> logits [N, K]), "
                             f"got {type(model).__name__}")
    clf = model if isinstance(model, Classifier) else wrap_classifier(model)
    if not clf.num_classes and image_size is not None:
        clf.infer_num_classes(image_size)
    return clf
