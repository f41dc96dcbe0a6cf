"""Where a run's examples come from (:class:`Source`: a model and a dataset, or a score file),
what its records depend on (:func:`provenance`), and the checks every run makes on its
selection and precision before any work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import file_sha256
from ..data import ImageSource
from ..errors import PatchcertError
from ..geometry import Geometry
from ..results import ScoreFile
from ..specs import jsonable

__all__ = ["DTYPES", "Source", "deployment_options", "model_source", "score_source", "provenance", "check_selection", "check_pos_int",
           "resolve_dtype", "state_dict_sha256"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def state_dict_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_pos_int(v: Any, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PatchcertError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class Source:
    """Where the score maps come from: a model + dataset, or a score file."""

    geometry: Geometry
    image_size: tuple[int, int]
    num_classes: int
    classes: list[str]
    total: int
    name: str
    # defense name -> options a defense spec that leaves them out takes (the model's measured
    # deployment, :func:`deployment_options`)
    deployment: dict[str, dict[str, Any]] = field(default_factory=dict)


def deployment_options(model: Any) -> dict[str, dict[str, Any]]:
    """The deployment a checkpoint was measured in: ``checkpoint_meta["deployment"]``, e.g.
    ``{"double-masking": {"options": {"bf16": true, "channels_last": true}, "evidence": "..."}}``
    -> ``{"double-masking": {"bf16": True, "channels_last": True}}``. A defense spec that leaves
    such an option out takes the measured value (``double-masking:bf16=false`` overrides it);
    a model without the entry (every user model) gets the defenses' own defaults."""
    meta = getattr(model, "checkpoint_meta", None)
    dep = meta.get("deployment") if isinstance(meta, dict) else None
    if dep is None:
        return {}
    bad = PatchcertError("checkpoint metadata: 'deployment' must map defense names to "
                         "{\"options\": {name: true/false/number/string}, \"evidence\": \"...\"}")
    if not isinstance(dep, dict):
        raise bad
    out: dict[str, dict[str, Any]] = {}
    for name, entry in dep.items():
        opts = entry.get("options") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(opts, dict) or not all(
                isinstance(k, str) and isinstance(v, (bool, int, float, str)) for k, v in opts.items()):
            raise bad
        out[name] = dict(opts)
    return out


def model_source(model: Any, data: Any) -> Source:
    if model is None or data is None:
        raise PatchcertError("give a model and a dataset, or cached scores")
    if not isinstance(data, ImageSource):
        raise PatchcertError(f"data must be an ImageSource (patchcert.data), got {type(data).__name__}")
    geometry = getattr(model, "geometry", None)
    if not isinstance(geometry, Geometry):
        raise PatchcertError(f"{type(model).__name__} declares no receptive-field geometry")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes != data.num_classes:
        raise PatchcertError(f"the model has {num_classes} classes but {data.name} has {data.num_classes}")
    image_size = data.image_size
    exp = geometry.input_size
    if exp is not None and tuple(exp) != tuple(image_size):
        raise PatchcertError(f"the model expects {exp[0]}x{exp[1]} images but {data.name} has "
                             f"{image_size[0]}x{image_size[1]}")
    chans = int(data.images.shape[1]) if hasattr(data, "images") else 3  # streamed images are decoded to RGB
    if chans != 3:
        raise PatchcertError(f"{data.name}: expected 3-channel images, got {chans}")
    return Source(geometry, image_size, num_classes, list(data.classes), len(data), data.name,
                  deployment_options(model))


def score_source(scores: ScoreFile) -> Source:
    meta = scores.meta
    try:
        geometry = Geometry.from_dict(meta["geometry"])
        image_size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PatchcertError(f"score file: bad geometry/image_size metadata ({e})") from None
    num_classes = int(scores.scores.shape[1])
    classes = list(meta.get("classes") or [f"class{i}" for i in range(num_classes)])
    if len(classes) != num_classes:
        raise PatchcertError(f"score file: {num_classes}-class scores but {len(classes)} class names")
    return Source(geometry, image_size, num_classes, classes, len(scores), f"scores:{scores.path}")


def provenance(model: Any, data: Any, scores: ScoreFile | None) -> dict[str, Any]:
    """What the records depend on besides the run's options: model (hash), data, score file."""
    if scores is None:
        ckpt = getattr(model, "checkpoint_path", None)
        return {"model": str(getattr(model, "arch", type(model).__name__)),
                "model_sha256": file_sha256(ckpt) if ckpt else state_dict_sha256(model),
                "hash_of": "file" if ckpt else "state_dict", "checkpoint": str(ckpt) if ckpt else None,
                "model_config": jsonable(dict(getattr(model, "config", {}) or {})),
                "data": jsonable({"name": data.name, "num_examples_total": len(data), **data.info}),
                "scores_path": None, "scores_sha256": None}
    meta = scores.meta
    return {"model": str(meta.get("model", "unknown")), "model_sha256": meta.get("model_sha256"),
            "hash_of": meta.get("model_hash_of", "file"), "checkpoint": meta.get("checkpoint"),
            "model_config": jsonable(meta.get("model_config") or {}), "data": jsonable(meta.get("data") or {}),
            "scores_path": scores.path, "scores_sha256": scores.sha256}


def check_selection(start: Any, num_examples: int | None, batch_size: Any, src: Source) -> int:
    check_pos_int(batch_size, "batch size")
    check_pos_int(num_examples, "number of examples", allow_none=True)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise PatchcertError(f"start must be a non-negative integer, got {start!r}")
    if start >= src.total:
        raise PatchcertError(f"start {start} is past the end of {src.name} ({src.total} examples)")
    if num_examples is None:
        return src.total - start
    if start + num_examples > src.total:
        raise PatchcertError(f"{num_examples} examples from {start} exceed the {src.total} examples of {src.name}")
    return num_examples


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PatchcertError(f"dtype must be float32 or float64, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise PatchcertError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype
