"""Import foreign weights (e.g. the published BagNet ``.pth.tar`` files) as patchcert checkpoints.

Safety: a PyTorch pickle is read only through ``torch.load(weights_only=True)`` (a file
whose pickle would build arbitrary objects or call functions is refused before anything
runs); safetensors files are read with ``safetensors``. Nothing else is ever unpickled.

Matching: the source's state dict (unwrapped from ``{"state_dict": ...}`` / ``{"model":
...}`` and stripped of a DataParallel ``module.`` prefix) must have exactly the registered
model's keys and shapes. The only tolerated difference is a missing BatchNorm
``num_batches_tracked`` counter (files from old PyTorch versions), which keeps the
model's value. The first mismatch is reported in a one-line :class:`CheckpointError`.

The number of classes is read from the file (the rows of the classifier) unless given;
``select_classes`` keeps a subset of the classifier's rows, e.g. the 10 ImageNette
classes of a 1000-class ImageNet model (``"imagenette"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import CheckpointError, PatchcertError

log = logging.getLogger(__name__)

__all__ = ["ConversionResult", "read_state_dict", "class_dim_keys", "match_state_dict", "convert_checkpoint",
           "IMAGENETTE_WNIDS", "IMAGENETTE_IMAGENET_INDICES", "resolve_class_selection", "skeleton_model"]

#: ImageNette's classes (sorted WordNet ids, the ImageFolder order) and their ImageNet-1k indices.
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888605")
IMAGENETTE_IMAGENET_INDICES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)

_COUNTER = "num_batches_tracked"


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` wrote."""

    out: str
    arch: str
    num_classes: int
    config: dict[str, Any]
    source: dict[str, Any]
    tensors: int
    filled: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.pth``/``.pth.tar``/``.pt`` (weights_only) or ``.safetensors`` file."""
    from ..checkpoint import check_readable

    path = check_readable(path, "source weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    else:
        from ..checkpoint import torch_load_weights

        obj = torch_load_weights(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors, got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors (entry {bad[0]!r} is not a named tensor)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


@contextlib.contextmanager
def _initialisers_disabled() -> Iterator[None]:
    """Make ``torch.nn.init``'s public initialisers no-ops (not thread-safe; used for skeletons).

    Random initialisation on the meta device goes through PyTorch's Python reference kernels,
    whose first use imports the compiler stack (seconds); a skeleton needs no values anyway.
    """
    import torch.nn.init as init

    saved = {n: getattr(init, n) for n in dir(init)
             if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))}
    for n in saved:
        setattr(init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def skeleton_model(arch: str, num_classes: int, **cfg: Any) -> torch.nn.Module:
    """A registered model built on the meta device without initialisation: names, shapes,
    geometry and config at no memory or time cost (its tensors hold no values)."""
    from .registry import create_model

    with _initialisers_disabled(), torch.device("meta"):
        return create_model(arch, num_classes=num_classes, **cfg)


def class_dim_keys(arch: str, model_cfg: dict[str, Any] | None = None) -> list[str]:
    """Names of the tensors whose first dimension is the number of classes (built on the meta device)."""
    cfg = dict(model_cfg or {})
    a = skeleton_model(arch, 2, **cfg).state_dict()
    b = skeleton_model(arch, 3, **cfg).state_dict()
    keys = []
    for k, v in a.items():
        if v.shape != b[k].shape:
            if v.dim() == 0 or v.shape[0] != 2 or v.shape[1:] != b[k].shape[1:]:
                raise PatchcertError(f"{arch}: cannot tell the class dimension of {k!r}")
            keys.append(k)
    return keys


def match_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "source"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check ``state`` against ``model``'s keys and shapes; returns (complete state, filled keys).

    Raises a one-line :class:`CheckpointError` naming the first mismatch.
    """
    arch = getattr(model, "arch", type(model).__name__)
    want = model.state_dict()
    problems: list[str] = []
    filled: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for k, v in want.items():
        if k not in state:
            if k.endswith("." + _COUNTER):
                filled.append(k)
                out[k] = v
                continue
            problems.append(f"{k} (shape {tuple(v.shape)}) is missing from {source}")
            continue
        got = state[k]
        if tuple(got.shape) != tuple(v.shape):
            problems.append(f"{k} has shape {tuple(got.shape)} in {source} but {tuple(v.shape)} in {arch}")
            continue
        if got.is_floating_point() != v.is_floating_point():
            problems.append(f"{k} is {got.dtype} in {source} but {v.dtype} in {arch}")
            continue
        out[k] = got.to(v.dtype)
    extra = [k for k in state if k not in want]
    problems += [f"{source} has {k} (shape {tuple(state[k].shape)}), which {arch} does not" for k in extra]
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointError(f"weights do not match {arch}: {problems[0]}{more}")
    return out, filled


def resolve_class_selection(select: str | Sequence[int] | None) -> tuple[list[int] | None, list[str] | None]:
    """``"imagenette"`` | ``"0,217,..."`` | a list of ints | None -> (row indices, class names or None)."""
    if select is None:
        return None, None
    if isinstance(select, str):
        if select.strip().lower() == "imagenette":
            return list(IMAGENETTE_IMAGENET_INDICES), list(IMAGENETTE_WNIDS)
        try:
            idx = [int(t) for t in select.split(",") if t.strip()]
        except ValueError:
            raise PatchcertError(f"class selection must be 'imagenette' or comma-separated indices, got {select!r}") from None
    else:
        idx = [int(i) for i in select]
    if not idx:
        raise PatchcertError("class selection is empty")
    if len(set(idx)) != len(idx):
        raise PatchcertError(f"class selection repeats an index: {idx}")
    return idx, None


def convert_checkpoint(
    src: str | os.PathLike,
    arch: str,
    out: str | os.PathLike,
    *,
    num_classes: int | None = None,
    model_cfg: dict[str, Any] | None = None,
    select_classes: str | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert foreign weights ``src`` for the registered model ``arch`` into a patchcert
    checkpoint ``out`` (safetensors + JSON metadata: source file and its sha256, arch,
    config, number of classes, class names if known).

    ``num_classes``: expected classes of the result (default: read from the file).
    ``select_classes``: keep only these classifier rows (indices into the source's classes,
    or ``"imagenette"``); ``classes``: class names to record.
    """
    from ..checkpoint import file_sha256, save_checkpoint
    from .registry import create_model, model_entrypoint

    src, out = Path(src), Path(out)
    model_entrypoint(arch)  # unknown architecture -> one-line error
    if out.suffix != ".safetensors":
        raise PatchcertError(f"output must be a .safetensors file, got {str(out)!r}")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise PatchcertError("output would overwrite the source file")
    if out.exists() and not overwrite:
        raise PatchcertError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    cfg = dict(model_cfg or {})
    if "num_classes" in cfg:
        raise PatchcertError("give the number of classes as num_classes, not in the model config")
    state = read_state_dict(src)
    cls_keys = class_dim_keys(arch, cfg)
    rows, sel_names = resolve_class_selection(select_classes)
    src_classes = None
    if cls_keys:
        k0 = cls_keys[0]
        if k0 not in state:
            raise CheckpointError(f"weights do not match {arch}: {k0} (the classifier) is missing from {src.name}")
        src_classes = int(state[k0].shape[0]) if state[k0].dim() > 0 else None
    if rows is not None:
        if not cls_keys or src_classes is None:
            raise PatchcertError(f"{arch} has no classifier rows to select from")
        bad = [i for i in rows if not 0 <= i < src_classes]
        if bad:
            raise PatchcertError(f"class index {bad[0]} is out of range for {src_classes} source classes")
        sel = torch.tensor(rows, dtype=torch.long)
        state = dict(state)
        for k in cls_keys:
            if k in state and state[k].dim() > 0 and state[k].shape[0] == src_classes:
                state[k] = state[k].index_select(0, sel)
        src_k = len(rows)
    else:
        src_k = src_classes
    if num_classes is None:
        if src_k is None:
            raise PatchcertError(f"cannot read the number of classes of {arch} from {src.name}; pass num_classes")
        num_classes = src_k
    if not isinstance(num_classes, int) or num_classes < 1:
        raise PatchcertError(f"num_classes must be a positive int, got {num_classes!r}")
    if src_k is not None and num_classes != src_k:
        what = "selected" if rows is not None else "in the source"
        raise CheckpointError(f"the classifier has {src_k} classes {what} but num_classes={num_classes} was asked for")
    names = list(classes) if classes is not None else sel_names
    if names is not None and len(names) != num_classes:
        raise PatchcertError(f"{len(names)} class names given for {num_classes} classes")

    model = create_model(arch, num_classes=num_classes, **cfg)
    full, filled = match_state_dict(model, state, src.name)
    model.load_state_dict(full, strict=True)
    model.eval()
    sha = file_sha256(src)
    source = {"file": src.name, "sha256": sha, "size_bytes": src.stat().st_size,
              "format": "safetensors" if src.suffix == ".safetensors" else "torch (weights_only)"}
    if rows is not None:
        source["class_indices"] = rows
        source["source_classes"] = src_classes
    if filled:
        source["filled_defaults"] = len(filled)
    extra: dict[str, Any] = {"source": source, "converted": True, "num_source_classes": src_classes}
    if names is not None:
        extra["classes"] = names
    md = save_checkpoint(out, model, **extra)
    log.info("converted %s -> %s (%s, %d classes, %d tensors, %d filled)", src, out, arch, num_classes,
             len(full), len(filled))
    return ConversionResult(out=str(out), arch=arch, num_classes=num_classes, config=dict(model.config),
                            source=source, tensors=len(full), filled=filled, metadata=md)
