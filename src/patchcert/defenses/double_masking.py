"""Double masking (PatchCleanser, Xiang et al., USENIX Security 2022): certify any classifier.

Unlike the score-map defenses, double masking works on pixels. Its expensive pass runs the
classifier on masked copies of each image and yields a per-image **table** of masked
predictions; ``predict`` and ``certify`` then read the table (cheap, exact integer logic).
The exact semantics are in ``docs/certification.md``; in short, with a mask set of ``M``
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
class). With ``flip=true`` the classifier is :class:`FlipAveraged`: the mean of the model's
logits on the masked image and on its mirror image (the certificate is for that classifier).
The certificate assumes the deployed defense evaluates the model exactly as the table was
computed (same weights, precision and device); :func:`masked_prediction_table` records which
precision it used.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import PatchcertError
from ..masks import MaskSet, apply_masks, mask_set
from .base import create_defense, register_defense
from .pixels import PixelDefense
from .threat import ThreatResult

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
    "certificate_order",
    "settled_table",
    "UNKNOWN",
    "covers",
    "double_masking_predict",
    "FlipAveraged",
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


def _predict_masked(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, fill: float, bf16: bool,
                    channels_last: bool = False) -> torch.Tensor:
    """Labels of ``x`` (``[B, C, H, W]``) masked by ``masks`` (``[B, H, W]`` bool) -> long ``[B]``
    (``channels_last``: the masked batch is handed to the model in NHWC memory layout)."""
    xm = apply_masks(x, masks, fill)
    if channels_last:
        xm = xm.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(xm)
    out = out.float()
    if out.dim() == 4:
        out = out.mean((2, 3))
    if not torch.isfinite(out).all():
        raise PatchcertError("double masking: the model returned non-finite logits")
    return out.argmax(1)


class FlipAveraged(nn.Module):
    """A classifier from ``model``: the mean of its logits (a score map is averaged over its
    cells first) on the images and on their mirror images (left-right), in float32 ->
    ``[N, K]``. Both halves run as one batch of ``2N``; the input's memory layout is kept.

    Double masking certifies any classifier, so it certifies this one: the masks are applied
    to the image, and the classifier sees the masked image and its mirror. A test-time
    augmentation made part of the model, at twice the cost of a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat((x, x.flip(-1)))
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            both = both.contiguous(memory_format=torch.channels_last)
        out = self.model(both).float()
        if out.dim() == 4:
            out = out.mean((2, 3))
        n = x.shape[0]
        return (out[:n] + out[n:]) / 2


@torch.no_grad()
def masked_prediction_table(model: nn.Module, x: torch.Tensor, ms: MaskSet, fill: float = 0.5,
                            batch_size: int = 512, bf16: bool = False, channels_last: bool = False) -> torch.Tensor:
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
        labels[sl] = _predict_masked(model, x[flat_img[sl]], pm[flat_pair[sl]], fill, bf16, channels_last)
    labels = labels.view(n, P)
    table = torch.empty(n, m, m, dtype=torch.long, device=x.device)
    pi, pj = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
    table[:, pi, pj] = labels
    table[:, pj, pi] = labels
    return table


#: a table entry not evaluated (an early-exit table, :func:`settled_table`)
UNKNOWN = -1


def _check_table(table: Any) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.dim() != 3 or table.shape[1] != table.shape[2] \
            or table.shape[1] < 1 or table.is_floating_point() or table.dtype == torch.bool:
        raise PatchcertError("double masking: a prediction table must be an integer tensor [N, M, M]")
    if table.numel() and int(table.min()) < UNKNOWN:
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
    """Double-masking prediction from a table ``[N, M, M]`` -> long ``[N]``.

    An early-exit table (:func:`settled_table`) gives the same prediction as the full one:
    it holds every first-round entry and every second round up to the first consistent one."""
    table = _check_table(table)
    one = torch.diagonal(table, dim1=1, dim2=2)  # [N, M]
    if one.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=table.device)
    if bool((one < 0).any()):
        raise PatchcertError("double masking: the table lacks first-round predictions")
    maj = _majority(one)
    disagree = one != maj[:, None]
    consistent = (table == one[:, :, None]).all(2)  # mask i's second round all agree with its label
    ok = disagree & consistent
    first = ok.to(torch.uint8).argmax(1)
    return torch.where(ok.any(1), one.gather(1, first[:, None])[:, 0], maj)


def certify_from_table(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: every two-mask prediction equals the label (an entry not evaluated never
    does; an early-exit table leaves entries out only after a known disagreement)."""
    table = _check_table(table)
    labels = torch.as_tensor(labels, device=table.device).long()
    if labels.shape != (table.shape[0],):
        raise PatchcertError(f"double masking: expected {table.shape[0]} labels, got {tuple(labels.shape)}")
    return (table == labels[:, None, None]).all(2).all(1)


def certificate_order(m: int) -> torch.Tensor:
    """``[m (m + 1) / 2, 2]`` long: the pairs in the order the certificate checks them -- the
    ``m`` first-round masks ``(i, i)`` in mask order, then the pairs ``i < j`` in row-major order."""
    i, j = torch.triu_indices(m, m, 1)
    d = torch.arange(m)
    return torch.cat([torch.stack([d, d], 1), torch.stack([i, j], 1)])


def first_failing_pair(table: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the number of entries ``i <= j`` not equal to the label (not evaluated
    counts as not equal), and the first such pair ``(i, j)`` in :func:`certificate_order`
    (``-1`` if none). The early-exit table and the full table give the same first pair."""
    table = _check_table(table)
    m = table.shape[1]
    pairs = certificate_order(m).to(table.device)
    wrong = table[:, pairs[:, 0], pairs[:, 1]] != labels.to(table.device).long()[:, None]  # [N, P]
    first = wrong.to(torch.uint8).argmax(1)
    has = wrong.any(1)
    i = torch.where(has, pairs[first, 0], torch.full_like(first, -1))
    j = torch.where(has, pairs[first, 1], torch.full_like(first, -1))
    return wrong.sum(1), i, j


class _Evaluator:
    """Fills table entries ``(image, i, j)`` with the model's prediction on the image masked by
    masks ``i`` and ``j``, ``batch_size`` masked images per forward pass."""

    def __init__(self, model: nn.Module, x: torch.Tensor, ms: MaskSet, fill: float, bf16: bool,
                 batch_size: int, channels_last: bool = False) -> None:
        self.model, self.x, self.fill, self.bf16, self.bs = model, x, fill, bf16, int(batch_size)
        self.channels_last = channels_last
        self.masks = ms.boolean(x.device)
        self.table = torch.full((x.shape[0], len(ms), len(ms)), UNKNOWN, dtype=torch.long, device=x.device)
        self.evaluated = 0

    def fill_in(self, img: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        need = self.table[img, i, j] == UNKNOWN
        img, i, j = img[need], i[need], j[need]
        for s in range(0, img.shape[0], self.bs):
            sl = slice(s, s + self.bs)
            out = _predict_masked(self.model, self.x[img[sl]], self.masks[i[sl]] | self.masks[j[sl]],
                                  self.fill, self.bf16, self.channels_last)
            self.table[img[sl], i[sl], j[sl]] = out
            self.table[img[sl], j[sl], i[sl]] = out
        self.evaluated += int(img.shape[0])


@torch.no_grad()
def settled_table(model: nn.Module, x: torch.Tensor, ms: MaskSet, labels: torch.Tensor | None = None,
                  fill: float = 0.5, batch_size: int = 512, bf16: bool = False,
                  channels_last: bool = False) -> torch.Tensor:
    """The table entries the prediction and (with ``labels``) the certificate need, others
    :data:`UNKNOWN`: the early-exit pass. ``predict_from_table``, ``certify_from_table`` and
    ``first_failing_pair`` give the same answers on it as on :func:`masked_prediction_table`.

    1. the first round: every one-mask image;
    2. the prediction: for images whose first round disagrees, the second rounds of the
       disagreeing masks in mask order, up to the first one that is consistent;
    3. the certificate: images whose first round all equals the label (the others are settled:
       not certified) get their pairs ``i < j`` in row-major order, a chunk at a time, until a
       pair disagrees with the label (settled: not certified) or every pair agrees
       (certified). Settled images leave the batch, and the chunk per remaining image grows so
       that every forward pass stays ``batch_size`` images.
    """
    _check_images(x, ms)
    n, m = x.shape[0], len(ms)
    ev = _Evaluator(model, x, ms, fill, bf16, batch_size, channels_last)
    dev = x.device
    if n == 0:
        return ev.table
    ar = torch.arange(m, device=dev)
    ev.fill_in(torch.arange(n, device=dev).repeat_interleave(m), ar.repeat(n), ar.repeat(n))
    one = torch.diagonal(ev.table, dim1=1, dim2=2)
    maj = _majority(one)
    todo = one != maj[:, None]  # [N, M] disagreeing masks whose second round is still to run
    while bool(todo.any()):
        rows = torch.nonzero(todo.any(1))[:, 0]
        i = todo[rows].to(torch.uint8).argmax(1)
        ev.fill_in(rows.repeat_interleave(m), i.repeat_interleave(m), ar.repeat(len(rows)))
        good = (ev.table[rows, i] == one[rows, i][:, None]).all(1)
        todo[rows[good]] = False
        todo[rows[~good], i[~good]] = False
    if labels is None:
        return ev.table
    labels = labels.to(dev).long()
    pi, pj = torch.triu_indices(m, m, 1, device=dev)
    P = pi.shape[0]
    active = (one == labels[:, None]).all(1)
    pos = torch.zeros(n, dtype=torch.long, device=dev)  # next pair to check, per image
    while P and bool(active.any()):
        rows = torch.nonzero(active)[:, 0]
        c = max(1, -(-batch_size // len(rows)))
        k = (pos[rows][:, None] + torch.arange(c, device=dev)[None, :])  # [R, c]
        valid = k < P
        r = rows[:, None].expand_as(k)[valid]
        kk = k[valid]
        ev.fill_in(r, pi[kk], pj[kk])
        vals = torch.full(k.shape, UNKNOWN, dtype=torch.long, device=dev)
        vals[valid] = ev.table[r, pi[kk], pj[kk]]
        failed = ((vals != labels[rows][:, None]) & valid).any(1)
        pos[rows] += c
        active[rows[failed | (pos[rows] >= P)]] = False
    return ev.table


@torch.no_grad()
def double_masking_predict(model: nn.Module, x: torch.Tensor, ms: MaskSet, fill: float = 0.5,
                           bf16: bool = False, batch_size: int = 512, channels_last: bool = False) -> torch.Tensor:
    """Double-masking prediction computed from the model with early stopping -> long ``[N]``:
    the first round, then second rounds only for disagreeing masks, up to the first consistent
    one (:func:`settled_table` without labels). Same result as
    ``predict_from_table(masked_prediction_table(...))`` at a fraction of the cost."""
    return predict_from_table(settled_table(model, x, ms, None, fill, batch_size, bf16, channels_last))


@register_defense("double-masking")
class DoubleMasking(PixelDefense):
    """The double-masking defense with ``k`` masks per axis and pixel fill ``fill``.

    ``patch``: the threat the mask set is built for (a patch spec such as ``"5x5"`` or
    ``"area=24"``; several shapes give the union of their mask sets); None: the run's requested
    patches (:attr:`Threat.mask_shapes`). ``bf16``: evaluate masked images under bf16 autocast
    (faster on CPUs with bf16 and on GPUs; the certificate then holds for the bf16 deployment).
    ``channels_last``: hand masked batches to the model in NHWC layout (1.45x the throughput of
    the shipped CIFAR model on this project's CPU in bf16, ``benchmarks/double_masking.md``);
    a different layout may round differently, so it is part of the deployed defense and its key.
    ``flip``: the classifier is :class:`FlipAveraged` (the model's logits on the masked image and
    on its mirror image, averaged): twice the cost; part of the key (a different classifier);
    the model then sees ``2 * batch_size`` images per pass.
    ``batch_size``: masked images per forward pass (not part of the defense: it changes no
    prediction, only the speed; measured flat from 128 to 512 on the CPU).
    """

    eval_images = 64  # a training evaluation certifies 64 images spread over the evaluation set

    def __init__(self, k: int = 6, fill: float = 0.5, patch: str | None = None, bf16: bool = False,
                 channels_last: bool = False, flip: bool = False) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PatchcertError(f"double-masking: k must be a positive int, got {k!r}")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not 0.0 <= float(fill) <= 1.0:
            raise PatchcertError(f"double-masking: fill must be a number in [0, 1], got {fill!r}")
        if isinstance(patch, tuple) and len(patch) == 2:  # a spec's patch=5x5 arrives as a pair
            patch = f"{patch[0]}x{patch[1]}"
        if patch is not None:
            from ..geometry import parse_patch

            try:
                parse_patch(patch)
            except ValueError as e:
                raise PatchcertError(f"double-masking: {e}") from None
        if not isinstance(bf16, bool):
            raise PatchcertError(f"double-masking: bf16 must be true or false, got {bf16!r}")
        if not isinstance(channels_last, bool):
            raise PatchcertError(f"double-masking: channels_last must be true or false, got {channels_last!r}")
        if not isinstance(flip, bool):
            raise PatchcertError(f"double-masking: flip must be true or false, got {flip!r}")
        self.k, self.fill, self.patch, self.bf16, self.channels_last = k, float(fill), patch, bf16, channels_last
        self.flip = flip
        self.batch_size = 512
        self._ms: MaskSet | None = None

    @classmethod
    def options_from_json(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A run's config also records the mask count (:meth:`describe`): not an option."""
        return {k: v for k, v in super().options_from_json(options).items() if k != "masks"}

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"k": 2, "patch": "2x2"}, {"k": 3}, {"k": 2, "patch": "area=4", "fill": 0.0}]

    def _params(self) -> dict[str, Any]:
        p = {"k": self.k, "fill": self.fill, "patch": self.patch, "bf16": self.bf16}
        if self.channels_last:  # only when on: the configs of earlier runs stay as they were
            p["channels_last"] = True
        if self.flip:
            p["flip"] = True
        return p

    @property
    def key(self) -> str:
        parts = [f"k={self.k}"]
        if self.patch is not None:
            parts.append(f"patch={self.patch}")
        if self.fill != 0.5:
            parts.append(f"fill={self.fill:g}")
        if self.bf16:
            parts.append("bf16")
        if self.channels_last:
            parts.append("channels_last")
        if self.flip:
            parts.append("flip")
        return f"double-masking({','.join(parts)})"

    # -- building for a threat ---------------------------------------------------------
    def mask_set(self, image_size: Sequence[int], default_shapes: Sequence[Sequence[int]] | None = None) -> MaskSet:
        """The mask set for ``image_size`` images: built for ``patch``, or, when ``patch`` is None,
        for ``default_shapes`` (a run passes the shapes it was asked for)."""
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

    @classmethod
    def for_threat(cls, options: dict[str, Any], threat: Any) -> "DoubleMasking":
        d = create_defense(cls.name, **options)
        assert isinstance(d, DoubleMasking)
        return d.bind(d.mask_set(threat.image_size, threat.mask_shapes))

    def bind(self, ms: MaskSet) -> "DoubleMasking":
        """This defense with mask set ``ms`` (a new object)."""
        d = DoubleMasking(**self._params())
        d.batch_size, d._ms = self.batch_size, ms
        return d

    @property
    def masks(self) -> MaskSet:
        if self._ms is None:
            raise PatchcertError(f"{self.key}: no mask set yet (build it with for_threat, bind or a run)")
        return self._ms

    @property
    def image_size(self) -> tuple[int, int]:
        return self.masks.image_size

    def describe(self) -> dict[str, Any]:
        return {"masks": len(self.masks)}

    def uncovered(self, shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """The shapes some placement of which no mask covers (never certified)."""
        return [(int(a), int(b)) for a, b in shapes if not covers(self.masks, (a, b))]

    # -- the expensive pass and the cheap answers --------------------------------------
    def compute_evidence(self, model: Any, images: torch.Tensor | None, scores: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """The early-exit table of the batch (:func:`settled_table`); with ``labels`` it holds
        what the certificate needs as well."""
        if model is None or images is None:
            raise PatchcertError(f"{self.key} works on images and needs the model (a score file holds no "
                                 "masked predictions)")
        return settled_table(self.classifier(model), images, self.masks, labels, self.fill, self.batch_size,
                             self.bf16, self.channels_last)

    def classifier(self, model: nn.Module) -> nn.Module:
        """The classifier the defense runs on masked images: the model, or with ``flip`` the
        model averaged with its mirror-image pass (:class:`FlipAveraged`)."""
        return FlipAveraged(model) if self.flip else model

    def table(self, model: nn.Module, x: torch.Tensor, ms: MaskSet | None = None) -> torch.Tensor:
        """The full table (every pair), e.g. for a report."""
        return masked_prediction_table(self.classifier(model), x, ms or self.masks, self.fill,
                                       batch_size=self.batch_size,
                                       bf16=self.bf16, channels_last=self.channels_last)

    def predict_evidence(self, evidence: torch.Tensor) -> torch.Tensor:
        return predict_from_table(evidence)

    def certify_threat(self, evidence: torch.Tensor, labels: torch.Tensor, patch: Any) -> ThreatResult:
        """Certified against every shape of ``patch``: the mask set covers it and every pair agrees."""
        labels = labels.to(evidence.device)
        all_pairs = certify_from_table(evidence, labels)
        cov = [covers(self.masks, s) for s in patch.shapes]
        per_shape = torch.stack([all_pairs & c for c in cov], 1) if len(cov) > 1 else None
        return ThreatResult(all_pairs & all(cov), per_shape, self.failing_cases(evidence, labels))

    def failing_cases(self, table: torch.Tensor, labels: torch.Tensor) -> list[Any]:
        """Per image, the record of the first pair (:func:`certificate_order`) that disagrees
        with the label, or None (:class:`patchcert.results.MaskPairCase`)."""
        from ..results import MaskPairCase

        _, fi, fj = first_failing_pair(table, labels)
        one = torch.diagonal(table, dim1=1, dim2=2)
        off = (one != labels.to(table.device)[:, None]).tolist()
        out: list[Any] = []
        for n, (i, j) in enumerate(zip(fi.tolist(), fj.tolist())):
            if i < 0:
                out.append(None)
                continue
            out.append(MaskPairCase((i, j), int(table[n, i, j]), any(off[n]),
                                    tuple(m for m, o in enumerate(off[n]) if o)))
        return out

    def largest_square(self, evidence: torch.Tensor, labels: torch.Tensor, windows: Sequence[Any],
                       known: dict | None = None, pred: torch.Tensor | None = None,
                       method: str = "bisect") -> torch.Tensor:
        """Exact and free: an ``s x s`` patch is certified iff every pair agrees and the mask set
        covers ``s x s`` (true up to some side and false beyond: coverage is monotone)."""
        side = 0
        for s in range(1, len(windows) + 1):
            if not covers(self.masks, (s, s)):
                break
            side = s
        ok = certify_from_table(evidence, labels.to(evidence.device))
        return torch.where(ok, torch.full_like(labels, side, device=evidence.device), torch.zeros_like(ok).long())

    # -- self-description for the attack and the report ----------------------------------
    def attack_placements(self, evidence: torch.Tensor, labels: torch.Tensor, shape: tuple[int, int],
                          n_random: int, generator: torch.Generator) -> list[list[tuple[int, int]]]:
        """The corners of the masks of the first failing pair, then random placements."""
        h, w = self.image_size
        ph, pw = shape
        _, fi, fj = first_failing_pair(evidence, labels)
        rand = super().attack_placements(evidence, labels, shape, n_random, generator)
        out = []
        for n in range(evidence.shape[0]):
            cand: list[tuple[int, int]] = []
            for m in dict.fromkeys((int(fi[n]), int(fj[n]))):
                if m >= 0:
                    t, l, mh, mw = self.masks.rects[m]
                    cand += [(t, l), (min(t + mh - ph, h - ph), min(l + mw - pw, w - pw))]
            out.append(list(dict.fromkeys(cand + rand[n])))
        return out

    def attack_masks(self, top: int, left: int, shape: tuple[int, int], device: Any) -> torch.Tensor:
        masks = self.masks.boolean(device)
        covered = masks[:, top:top + shape[0], left:left + shape[1]].flatten(1).all(1)
        return masks[~covered]

    def disagreement(self, worst: Any) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]] | None:
        """How many first-round masks that disagree with the label cover each pixel, and the
        masks of the first failing pair."""
        if worst is None:
            return None
        masks = self.masks.boolean()
        idx = list(worst.disagree)
        heat = masks[idx].sum(0).double() if idx else torch.zeros(self.image_size, dtype=torch.float64)
        return heat, [self.masks.rects[m] for m in dict.fromkeys(worst.pair)]
