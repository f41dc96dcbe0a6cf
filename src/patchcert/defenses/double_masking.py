"""Double masking (PatchCleanser, Xiang et al., USENIX Security 2022): certify any classifier.

Unlike the score-map defenses, double masking works on pixels. Its expensive pass runs the
classifier on masked copies of each image and yields a per-image **table** of masked
predictions; ``predict`` and ``certify`` then read the table (cheap, exact integer logic).
The exact semantics are in ``docs/double-masking.md``; in short, with a mask set of ``M``
masks (:mod:`patchcert.masks`) and ``T[i, j]`` the prediction on the image masked by masks
``i`` and ``j`` (``T[i, i]``: mask ``i`` alone; ``T`` is symmetric):

* prediction: if every one-mask prediction ``T[i, i]`` agrees, that label; otherwise the
  majority label ``maj`` (ties to the lowest class); for each mask ``i`` with
  ``T[i, i] != maj``, in mask order, if ``T[i, j] == T[i, i]`` for every ``j``, return
  ``T[i, i]``; if none, return ``maj``;
* certificate for label ``y``: ``T[i, j] == y`` for every pair (``i == j`` included), and the
  mask set covers every placement of every shape of the threat. Then the prediction of any
  image patched within the threat is ``y``.

The model's prediction on a masked image is ``argmax`` of its logits (ties to the lowest
class). The certificate assumes the deployed defense evaluates the model exactly as the
table was computed (same weights, precision and device); :func:`masked_prediction_table`
records which precision it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..masks import MaskSet, apply_masks, mask_set

log = logging.getLogger(__name__)

#: masked forward passes per image beyond which a mask set is refused before any work (k=6 on one
#: shape: 666; the 8 shapes of area=24 with k=6: 34,980; k=100000 on 32x32 images: 307,720)
MAX_MASKED_PASSES = 200_000

__all__ = [
    "DoubleMasking",
    "union_mask_set",
    "pair_indices",
    "masked_prediction_table",
    "predict_from_table",
    "certify_from_table",
    "first_failing_pair",
    "covers",
    "double_masking_predict",
]


def union_mask_set(image_size: Sequence[int], shapes: Sequence[Sequence[int]], k: int) -> MaskSet:
    """One mask set covering every placement of every shape: the union (deduplicated, in
    order of first appearance) of the shapes' own mask sets."""
    if not shapes:
        raise PatchcertError("double masking: no patch shape given")
    rects: list[tuple[int, int, int, int]] = []
    seen = set()
    for s in shapes:
        for r in mask_set(image_size, s, k).rects:
            if r not in seen:
                seen.add(r)
                rects.append(r)
    first = (int(shapes[0][0]), int(shapes[0][1]))
    return MaskSet(image_size=(int(image_size[0]), int(image_size[1])), patch=first, k=k, rects=tuple(rects))


def covers(ms: MaskSet, shape: Sequence[int]) -> bool:
    """True if every placement of a ``shape`` patch lies inside some mask of ``ms`` (exact)."""
    h, w = ms.image_size
    ph, pw = int(shape[0]), int(shape[1])
    if ph > h or pw > w or ph < 1 or pw < 1:
        return False
    rects = torch.tensor(ms.rects, dtype=torch.long)  # [M, 4]
    top = torch.arange(h - ph + 1)[:, None, None]
    left = torch.arange(w - pw + 1)[None, :, None]
    t, l, mh, mw = rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3]
    inside = (t <= top) & (top + ph <= t + mh) & (l <= left) & (left + pw <= l + mw)  # [P, Q, M]
    return bool(inside.any(-1).all())


def pair_indices(m: int) -> torch.Tensor:
    """``[m (m + 1) / 2, 2]`` long: the pairs ``(i, j)``, ``i <= j``, in row-major order."""
    i, j = torch.triu_indices(m, m)
    return torch.stack([i, j], 1)


def _check_images(x: Any, ms: MaskSet) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise PatchcertError(f"double masking: images must be a float tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if tuple(x.shape[-2:]) != tuple(ms.image_size):
        raise PatchcertError(f"double masking: mask set is for {ms.image_size[0]}x{ms.image_size[1]} images, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")


def _predict_masked(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, fill: float, bf16: bool) -> torch.Tensor:
    """Labels of ``x`` (``[B, C, H, W]``) masked by ``masks`` (``[B, H, W]`` bool) -> long ``[B]``."""
    xm = apply_masks(x, masks, fill)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(xm)
    out = out.float()
    if out.dim() == 4:
        out = out.mean((2, 3))
    if not torch.isfinite(out).all():
        raise PatchcertError("double masking: the model returned non-finite logits")
    return out.argmax(1)


@torch.no_grad()
def masked_prediction_table(model: nn.Module, x: torch.Tensor, ms: MaskSet, fill: float = 0.5,
                            batch_size: int = 512, bf16: bool = False) -> torch.Tensor:
    """The expensive pass: ``[N, M, M]`` long table of predictions on every two-mask image.

    ``x`` float images ``[N, C, H, W]`` in [0, 1] on the model's device; the model in eval
    mode. Each unordered pair (``i <= j``) is evaluated once, in batches of ``batch_size``
    masked images, and the table is filled symmetrically.
    """
    _check_images(x, ms)
    n = x.shape[0]
    m = len(ms)
    pairs = pair_indices(m)
    masks = ms.boolean(x.device)
    pm = masks[pairs[:, 0]] | masks[pairs[:, 1]]  # [P, H, W]
    P = pm.shape[0]
    flat_img = torch.arange(n, device=x.device).repeat_interleave(P)
    flat_pair = torch.arange(P, device=x.device).repeat(n)
    labels = torch.empty(n * P, dtype=torch.long, device=x.device)
    for s in range(0, n * P, batch_size):
        sl = slice(s, min(s + batch_size, n * P))
        labels[sl] = _predict_masked(model, x[flat_img[sl]], pm[flat_pair[sl]], fill, bf16)
    labels = labels.view(n, P)
    table = torch.empty(n, m, m, dtype=torch.long, device=x.device)
    pi, pj = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
    table[:, pi, pj] = labels
    table[:, pj, pi] = labels
    return table


def _check_table(table: Any) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.dim() != 3 or table.shape[1] != table.shape[2] \
            or table.shape[1] < 1 or table.is_floating_point() or table.dtype == torch.bool:
        raise PatchcertError("double masking: a prediction table must be an integer tensor [N, M, M]")
    if table.numel() and int(table.min()) < 0:
        raise PatchcertError("double masking: a prediction table holds negative labels")
    if not torch.equal(table, table.transpose(1, 2)):
        raise PatchcertError("double masking: a prediction table must be symmetric (T[i, j] == T[j, i])")
    return table.long()


def _majority(one: torch.Tensor) -> torch.Tensor:
    """Most frequent label per row of ``one`` ``[N, M]`` (ties to the lowest label)."""
    k = int(one.max()) + 1 if one.numel() else 1
    counts = torch.zeros(one.shape[0], k, dtype=torch.long, device=one.device)
    counts.scatter_add_(1, one, torch.ones_like(one))
    return counts.argmax(1)  # first maximum: the lowest label


def predict_from_table(table: torch.Tensor) -> torch.Tensor:
    """Double-masking prediction from a table ``[N, M, M]`` -> long ``[N]``."""
    table = _check_table(table)
    one = torch.diagonal(table, dim1=1, dim2=2)  # [N, M]
    if one.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=table.device)
    maj = _majority(one)
    disagree = one != maj[:, None]
    consistent = (table == one[:, :, None]).all(2)  # mask i's second round all agree with its label
    ok = disagree & consistent
    first = ok.to(torch.uint8).argmax(1)
    return torch.where(ok.any(1), one.gather(1, first[:, None])[:, 0], maj)


def certify_from_table(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: every two-mask prediction equals the label."""
    table = _check_table(table)
    labels = torch.as_tensor(labels, device=table.device).long()
    if labels.shape != (table.shape[0],):
        raise PatchcertError(f"double masking: expected {table.shape[0]} labels, got {tuple(labels.shape)}")
    return (table == labels[:, None, None]).all(2).all(1)


def first_failing_pair(table: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the number of pairs ``i <= j`` not predicted as the label, and the first such
    pair ``(i, j)`` in row-major order (``-1`` if none)."""
    table = _check_table(table)
    m = table.shape[1]
    pairs = pair_indices(m).to(table.device)
    wrong = table[:, pairs[:, 0], pairs[:, 1]] != labels.long()[:, None]  # [N, P]
    first = wrong.to(torch.uint8).argmax(1)
    has = wrong.any(1)
    i = torch.where(has, pairs[first, 0], torch.full_like(first, -1))
    j = torch.where(has, pairs[first, 1], torch.full_like(first, -1))
    return wrong.sum(1), i, j


@torch.no_grad()
def double_masking_predict(model: nn.Module, x: torch.Tensor, ms: MaskSet, fill: float = 0.5,
                           bf16: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Double-masking prediction computed from the model with early stopping -> long ``[N]``.

    Runs the first round (``M`` one-mask images per image); images whose one-mask predictions
    all agree stop there. The others get second rounds only for their disagreeing masks, one
    mask at a time in mask order, and stop at the first mask whose second round agrees. Same
    result as ``predict_from_table(masked_prediction_table(...))`` at a fraction of the cost.
    """
    _check_images(x, ms)
    n, m = x.shape[0], len(ms)
    masks = ms.boolean(x.device)

    def run(img: torch.Tensor, msk: torch.Tensor) -> torch.Tensor:
        out = torch.empty(img.shape[0], dtype=torch.long, device=x.device)
        for s in range(0, img.shape[0], batch_size):
            out[s:s + batch_size] = _predict_masked(model, x[img[s:s + batch_size]], msk[s:s + batch_size], fill, bf16)
        return out

    img = torch.arange(n, device=x.device).repeat_interleave(m)
    one = run(img, masks.repeat(n, 1, 1)).view(n, m) if n else torch.zeros(0, m, dtype=torch.long, device=x.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    maj = _majority(one)
    pred = maj.clone()
    todo = (one != maj[:, None])  # [N, M] disagreeing masks still to try
    while bool(todo.any()):
        rows = torch.nonzero(todo.any(1))[:, 0]  # undecided images
        i = todo[rows].to(torch.uint8).argmax(1)  # their next disagreeing mask
        r_img = rows.repeat_interleave(m)
        r_msk = masks[i].repeat_interleave(m, 0) | masks.repeat(len(rows), 1, 1)
        second = run(r_img, r_msk).view(len(rows), m)
        lab = one[rows, i]
        good = (second == lab[:, None]).all(1)
        pred[rows[good]] = lab[good]
        todo[rows[good]] = False
        todo[rows[~good], i[~good]] = False
    return pred


@dataclass(frozen=True)
class DoubleMasking:
    """The double-masking defense with ``k`` masks per axis and pixel fill ``fill``.

    ``patch``: the threat the mask set is built for (a patch spec such as ``"5x5"`` or
    ``"area=24"``; several shapes give the union of their mask sets); None: the run's largest
    requested patch. ``bf16``: evaluate masked images under bf16 autocast (faster on CPUs
    with bf16 and on GPUs; the certificate then holds for the bf16 deployment).
    """

    k: int = 6
    fill: float = 0.5
    patch: str | None = None
    bf16: bool = False
    name: str = "double-masking"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise PatchcertError(f"double-masking: k must be a positive int, got {self.k!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)) or not 0.0 <= float(self.fill) <= 1.0:
            raise PatchcertError(f"double-masking: fill must be a number in [0, 1], got {self.fill!r}")
        object.__setattr__(self, "fill", float(self.fill))
        if self.patch is not None:
            from ..geometry import parse_patch

            try:
                parse_patch(self.patch)
            except ValueError as e:
                raise PatchcertError(f"double-masking: {e}") from None
        if not isinstance(self.bf16, bool):
            raise PatchcertError(f"double-masking: bf16 must be true or false, got {self.bf16!r}")

    @property
    def key(self) -> str:
        parts = [f"k={self.k}"]
        if self.patch is not None:
            parts.append(f"patch={self.patch}")
        if self.fill != 0.5:
            parts.append(f"fill={self.fill:g}")
        if self.bf16:
            parts.append("bf16")
        return f"double-masking({','.join(parts)})"

    @property
    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "fill": self.fill, "patch": self.patch, "bf16": self.bf16}

    def mask_set(self, image_size: Sequence[int], default_shapes: Sequence[Sequence[int]] | None = None) -> MaskSet:
        """The mask set for ``image_size`` images: built for ``patch``, or, when ``patch`` is None,
        for ``default_shapes`` (a certify run passes the shapes it was asked for)."""
        from ..geometry import parse_patch

        if self.patch is not None:
            try:
                shapes = parse_patch(self.patch).shapes((int(image_size[0]), int(image_size[1])))
            except ValueError as e:
                raise PatchcertError(f"double-masking: {e}") from None
        elif default_shapes:
            shapes = [(int(a), int(b)) for a, b in default_shapes]
        else:
            raise PatchcertError("double-masking: no patch to build the mask set for (set patch=...)")
        ms = union_mask_set(image_size, shapes, self.k)
        m = len(ms)
        passes = m * (m + 1) // 2  # the table: the model on every one- and two-mask image
        if passes > MAX_MASKED_PASSES:
            raise PatchcertError(
                f"double-masking: k={self.k} on {int(image_size[0])}x{int(image_size[1])} images gives {m} masks, "
                f"{passes:,} masked forward passes per image (k=6 and one patch shape: 666); "
                f"the limit is {MAX_MASKED_PASSES:,}: choose a smaller k")
        if passes > MAX_MASKED_PASSES // 20:
            log.warning("double-masking: %d masks, %s masked forward passes per image", m, f"{passes:,}")
        return ms

    def table(self, model: nn.Module, x: torch.Tensor, ms: MaskSet, batch_size: int = 512) -> torch.Tensor:
        return masked_prediction_table(model, x, ms, self.fill, batch_size=batch_size, bf16=self.bf16)

    def predict_table(self, table: torch.Tensor) -> torch.Tensor:
        return predict_from_table(table)

    def certify_table(self, table: torch.Tensor, labels: torch.Tensor, ms: MaskSet,
                      shapes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Certified against every shape in ``shapes``: covered by the mask set and all pairs agree."""
        cert = certify_from_table(table, labels)
        if not all(covers(ms, s) for s in shapes):
            return torch.zeros_like(cert)
        return cert

    def predict(self, model: nn.Module, x: torch.Tensor, ms: MaskSet) -> torch.Tensor:
        return double_masking_predict(model, x, ms, self.fill, bf16=self.bf16)
