"""Batch certification: one batch of images (or score maps) -> one typed record per example.

:func:`batch_evidence` runs each defense's expensive pass once per batch (the score map is
shared by the score-map family; a pixel defense runs the model itself); :func:`certify_batch`
then asks every defense for its prediction and, per patch threat, its certificate
(:meth:`~patchcert.defenses.Defense.certify_threat`), and its largest certified square. Pure:
same inputs, same records.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from .errors import PatchcertError
from .planning import DefensePlan, PatchPlan
from .results import DefenseOutcome, ExampleRecord

__all__ = ["Timer", "batch_evidence", "certify_batch"]


class Timer:
    """Accumulated seconds by name (synchronising CUDA around each measured block)."""

    def __init__(self, device: torch.device, totals: dict[str, float] | None = None) -> None:
        self.device = device
        self.totals: dict[str, float] = dict(totals or {})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def per_image(self, key: str, count_key: str = "images") -> float | None:
        """Seconds per image of the entry ``key`` (None if never timed)."""
        n = self.totals.get(count_key, 0.0)
        return self.totals[key] / n if key in self.totals and n else None


def batch_evidence(defenses: Sequence[DefensePlan], model: Any, images: torch.Tensor | None,
                   scores: torch.Tensor | None, labels: torch.Tensor | None,
                   timer: Timer | None = None) -> dict[str, Any]:
    """Each defense's evidence for one batch, by key (score maps: ``scores`` itself; pixel
    defenses: their own pass over ``images``, timed as ``KEY|evidence``)."""
    out: dict[str, Any] = {}
    for dp in defenses:
        if not dp.needs_images:
            out[dp.key] = dp.defense.compute_evidence(model, images, scores, labels)
            continue
        if timer is not None:
            timer.sync()
        t0 = time.perf_counter()
        out[dp.key] = dp.defense.compute_evidence(model, images, scores, labels)
        if timer is not None:
            timer.sync()
            timer.add(f"{dp.key}|evidence", time.perf_counter() - t0)
    return out


def _defense_batch(dp: DefensePlan, ev: Any, labels: torch.Tensor, indices: Sequence[int],
                   patches: Sequence[PatchPlan], squares: Sequence[tuple[int, int]] | None, timer: Timer,
                   square_method: str) -> dict[str, Any]:
    d = dp.defense
    timer.sync()
    t0 = time.perf_counter()
    pred = d.predict_evidence(ev).to(labels.device)
    timer.sync()
    timer.add(f"{dp.key}|predict", time.perf_counter() - t0)
    out: dict[str, Any] = {"pred": pred.tolist(), "patches": {}}
    known: dict[tuple[int, int], torch.Tensor] = {}  # certificates the square search can reuse
    for pp in patches:
        t0 = time.perf_counter()
        res = d.certify_threat(ev, labels, pp)
        timer.sync()
        timer.add(f"{dp.key}|patch|{pp.text}", time.perf_counter() - t0)
        cert = res.certified.to(device=labels.device, dtype=torch.bool)
        known.update(res.known)
        if bool((cert & (pred != labels)).any()):
            bad = int(torch.nonzero(cert & (pred != labels))[0])
            raise RuntimeError(f"internal error: {dp.key} certified example {indices[bad]} for {pp.text} "
                               "but predicts another class (please report)")
        shapes = None
        if res.per_shape is not None:
            names = [f"{a}x{b}" for a, b in pp.shapes]
            shapes = [dict(zip(names, row)) for row in res.per_shape.to(torch.bool).tolist()]
        out["patches"][pp.text] = {"certified": cert.tolist(), "worst": res.worst, "shapes": shapes}
    ls = None
    if squares:
        t0 = time.perf_counter()
        side = d.largest_square(ev, labels, squares, known=known, pred=pred, method=square_method)
        timer.sync()
        timer.add(f"{dp.key}|largest_square", time.perf_counter() - t0)
        ls = None if side is None else side.tolist()
    out["largest_square"] = ls if ls is not None else [None] * len(indices)
    return out


def certify_batch(scores: torch.Tensor | None, labels: torch.Tensor, indices: Sequence[int],
                  defenses: Sequence[DefensePlan], patches: Sequence[PatchPlan],
                  squares: Sequence[tuple[int, int]] | None = None, timer: Timer | None = None,
                  square_method: str = "bisect", evidence: Mapping[str, Any] | None = None,
                  clean_pred: Sequence[int] | None = None) -> list[ExampleRecord]:
    """Certify one batch against every defense and patch threat.

    ``scores`` float ``[B, K, H, W]`` (the dtype the defenses compute in; None without a score
    map), ``labels`` long ``[B]`` on the same device, ``indices`` the B dataset indices.
    ``evidence``: the defenses' evidence by key (:func:`batch_evidence`; default: ``scores``
    for every defense, which suits the score-map family). ``squares``: windows of ``s x s``
    patches for ``s = 1..cap`` (None: no largest-square search). ``clean_pred``: the undefended
    prediction (default: argmax of the spatially averaged score map). Returns B records.
    """
    dev = labels.device
    timer = timer or Timer(dev)
    B = labels.shape[0]
    if clean_pred is None:
        if scores is None:
            raise PatchcertError("certify_batch needs the score maps or the undefended predictions")
        clean_pred = scores.to(torch.float64).mean((2, 3)).argmax(1).tolist()
    lab = labels.tolist()
    per_def: dict[str, dict[str, Any]] = {}
    for dp in defenses:
        if evidence is not None and dp.key in evidence:
            ev = evidence[dp.key]
        elif dp.needs_images:
            raise PatchcertError(f"{dp.key} works on images: it needs the model (a score file holds no "
                                 "masked predictions)")
        else:
            ev = scores
        per_def[dp.key] = _defense_batch(dp, ev, labels, indices, patches, squares, timer, square_method)
    records = []
    for i in range(B):
        defs = {}
        for dp in defenses:
            o = per_def[dp.key]
            defs[dp.key] = DefenseOutcome(
                pred=o["pred"][i], correct=o["pred"][i] == lab[i],
                certified={p: o["patches"][p]["certified"][i] for p in o["patches"]},
                worst={p: o["patches"][p]["worst"][i] for p in o["patches"]},
                largest_square=o["largest_square"][i],
                shapes={p: o["patches"][p]["shapes"][i] for p in o["patches"] if o["patches"][p]["shapes"]},
            )
        records.append(ExampleRecord(int(indices[i]), lab[i], int(clean_pred[i]), defs))
    return records
