"""What :func:`patchcert.certify_dataset` and :func:`patchcert.attack_dataset` do first with
their ``model`` and ``data`` (:func:`prepare_inputs`):

* a plain ``nn.Module`` (images in [0, 1] -> logits ``[N, K]``) is wrapped as a
  :class:`~patchcert.models.classifier.Classifier` (``patchcert.wrap_classifier`` sets a
  normalisation); its number of classes comes from its output on the data's image size;
* the data becomes an :class:`~patchcert.data.ImageSource`; images of the wrong dtype or range
  are refused here, naming the fix;
* ``indices`` / ``subset`` select the examples (:mod:`patchcert.selection`);
* a score-map defense asked of a classifier is refused in one line naming the defenses that fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import ImageSource, as_image_dataset
from .errors import DataError, PatchcertError
from .defenses import Defense, defense_class, list_defenses
from .models.classifier import Classifier, as_model
from .selection import select_examples, warn_single_class
from .specs import parse_defense_spec

__all__ = ["prepare_inputs", "check_images", "check_defenses_fit"]


def check_images(images: Any, name: str = "in-memory") -> None:
    """Refuse image tensors that are neither uint8 nor float in [0, 1], naming the fix."""
    if not isinstance(images, torch.Tensor):
        return
    if images.is_floating_point():
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if not (lo >= 0.0 and hi <= 1.0):
                fix = ("they look like 0..255 values: divide by 255 (or pass uint8)" if 1.0 < hi <= 255.0 and lo >= 0
                       else "rescale them to [0, 1] (undo any normalisation: the model normalises inside)")
                raise DataError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {fix}")
    elif images.dtype != torch.uint8:
        raise DataError(f"{name}: images must be uint8 (0..255) or float in [0, 1], got {images.dtype}; "
                        "convert with images.to(torch.uint8) or images.float() / 255")


def _image_size(data: Any) -> tuple[int, int] | None:
    if isinstance(data, ImageSource):
        return data.image_size
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].dim() == 4:
        return (int(data[0].shape[-2]), int(data[0].shape[-1]))
    return None


def prepare_inputs(model: Any, data: Any, defenses: Sequence[Any], *, indices: Any = None, subset: str | None = None,
                   seed: int | None = 0, start: int = 0, num_examples: int | None = None) -> tuple[Any, Any]:
    """``(model, data)`` ready for the run (see the module docstring). With no model or no
    data (a score file) both are returned as they are."""
    if model is None or data is None:
        if indices is not None or subset is not None:
            raise PatchcertError("indices/subset select examples of a dataset; a score file is certified in its "
                                 "own order (use start/num_examples)")
        return model, data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        check_images(data[0])
    model = as_model(model)
    if isinstance(model, Classifier) and not model.num_classes:
        size = _image_size(data)
        if size is None:  # a dataset of (image, label) pairs: read it once to learn the size
            data = as_image_dataset(data)
            size = data.image_size
        model.infer_num_classes(size)
    k = int(getattr(model, "num_classes", 0) or 0) or None
    if isinstance(data, ImageSource) and k and data.num_classes != k and data.info.get("dataset") == "in-memory" \
            and tuple(data.classes) == tuple(str(i) for i in range(data.num_classes)):
        data = as_image_dataset((data.images, data.labels), num_classes=k, name=data.name)  # type: ignore[attr-defined]
    data = as_image_dataset(data, num_classes=k)
    check_defenses_fit(model, defenses)
    if indices is not None or subset is not None:
        data = select_examples(data, indices=indices, subset=subset, seed=seed)
    else:
        warn_single_class(data, start, num_examples)
    return model, data


def _evidence_source(s: Any) -> tuple[str, str | None]:
    """``(name, evidence_source)`` of a defense, a spec string or a DefenseSpec: the pixel-family
    protocol (:attr:`patchcert.defenses.base.Defense.evidence_source`, ``"images"`` for a pixel
    defense); None for a name no defense is registered under (refused later, naming it)."""
    if isinstance(s, Defense):
        return s.key, s.evidence_source
    name = getattr(s, "name", None) if not isinstance(s, str) else None
    if name is None:
        name = parse_defense_spec(s).name
    if name not in list_defenses():
        return str(name), None
    return str(name), defense_class(name).evidence_source


def check_defenses_fit(model: Any, defenses: Sequence[Any]) -> None:
    """Refuse a score-map defense for a model without a score map, in one line naming the
    defenses that fit it (every registered pixel defense)."""
    if getattr(model, "has_score_map", True) or not defenses or isinstance(defenses, (str, bytes)):
        return
    sources = [_evidence_source(s) for s in defenses]
    bad = [name for name, src in sources if src == "scores"]
    if bad:
        fit = [n for n in list_defenses() if defense_class(n).evidence_source == "images"]
        raise PatchcertError(f"{getattr(model, 'arch', type(model).__name__)} is a plain classifier (no score map): "
                             f"{', '.join(dict.fromkeys(bad))} needs a score-map model; the defenses that fit a "
                             f"classifier: {', '.join(fit)}")
