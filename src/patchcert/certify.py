"""Certification over a dataset: batched, resumable, sharded, with per-example records.

The data path is::

    images --model.score_map (once per batch)--> scores [B, K, H, W]
           --every defense x every patch--> ExampleRecord (one JSONL line per example)

:func:`certify_dataset` is the loop; :func:`certify_batch` certifies one batch of score maps
(pure: same maps in, same records out); :func:`largest_certified_square` finds, per image, the
largest certified square patch by a vectorised bisection over the square's window.

Batches are fixed slices of the selected examples (batch ``k`` = positions ``[k*B, (k+1)*B)``);
shard ``i`` of ``n`` is the contiguous run of batches ``[floor(i*nb/n), floor((i+1)*nb/n))``.
A shard, a resumed run and an uninterrupted run therefore push the very same batches through
the model, and their records are byte-identical (the merged shards included).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from . import rundir
from .checkpoint import atomic_write_bytes, file_sha256, load_tensors, save_tensors, versions
from .data import ImageSource, as_image_dataset, to_float
from .defenses import Defense, create_defense
from .errors import PatchcertError
from .geometry import Geometry, PatchSpec, parse_patch
from .runtime import precise_math
from .selection import dataset_indices
from .results import (
    CONFIG_FILE,
    PROGRESS_FILE,
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_CSV,
    SUMMARY_FILE,
    DefenseOutcome,
    ExampleRecord,
    ResultRow,
    RunMetadata,
    ScoreFile,
    Summary,
    WorstCase,
    append_records,
    load_scores,
    read_json,
    read_summary,
    repair_records,
    save_scores,
    shard_dirname,
    SummaryCounter,
    write_json,
    write_summary,
)

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.jsonl"  # unreadable images skipped by skip_bad_images, one JSON object per line

__all__ = [
    "DefenseSpec",
    "PatchPlan",
    "DefensePlan",
    "CertifyRun",
    "parse_defense_spec",
    "parse_shard",
    "build_defenses",
    "plan_patches",
    "plan_threat",
    "square_windows",
    "largest_certified_square",
    "square_summary",
    "certify_batch",
    "certify_dataset",
    "shard_batches",
    "DTYPES",
    "PIXEL_DEFENSES",
    "default_mask_shapes",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- defense specs -----------------------------------------------------------------------

@dataclass(frozen=True)
class DefenseSpec:
    """A defense as the user wrote it: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``."""

    name: str
    params: dict[str, Any]
    text: str


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_PAIR_X = re.compile(r"^(\d+)[xX](\d+)$")
_NUM = r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUM}):({_NUM})$")


def _parse_value(v: str) -> Any:
    """``3`` -> int, ``0.2`` -> float, ``true``/``false`` -> bool, ``none`` -> None,
    ``11x11`` -> (11, 11), ``-1:1`` -> (-1.0, 1.0), anything else -> str."""
    s = v.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if _INT.match(s):
        return int(s)
    if _FLOAT.match(s):
        return float(s)
    m = _PAIR_X.match(s)
    if m:
        return (int(m.group(1)), int(m.group(2)))
    m = _RANGE.match(s)
    if m:
        return (float(m.group(1)), float(m.group(2)))
    return s


def parse_defense_spec(text: str | DefenseSpec) -> DefenseSpec:
    """Parse ``voting``, ``voting:condition=3.3``, ``masking:threshold=0.0,features=logits``,
    ``clipping:clip=-1:1`` ... (values: int, float, true/false, none, ``AxB`` pair, ``lo:hi``
    range, else a string). Raises a one-line PatchcertError when malformed."""
    if isinstance(text, DefenseSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise PatchcertError(f"defense spec must be a non-empty string like 'voting' or 'masking:threshold=0', got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", name):
        raise PatchcertError(f"malformed defense spec {text!r}: expected NAME[:KEY=VALUE,...]")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k) or not v.strip():
                raise PatchcertError(f"malformed defense spec {text!r}: {item.strip()!r} is not KEY=VALUE")
            if k in params:
                raise PatchcertError(f"malformed defense spec {text!r}: {k!r} given twice")
            params[k] = _parse_value(v)
    elif _:
        raise PatchcertError(f"malformed defense spec {text!r}: nothing after ':'")
    return DefenseSpec(name, params, text.strip())


@dataclass
class DefensePlan:
    """A built defense: its stable ``key`` (record/summary label) and JSON ``config``."""

    key: str
    defense: Any
    config: dict[str, Any]
    spec: str
    #: double masking: the mask set (the defense works on pixels and needs the model)
    mask_set: Any = None

    @property
    def on_pixels(self) -> bool:
        return self.mask_set is not None


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


PIXEL_DEFENSES = ("double-masking", "double_masking")


def _build_double_masking(spec: DefenseSpec, image_size: tuple[int, int] | None,
                          default_shapes: Sequence[tuple[int, int]] | None) -> DefensePlan:
    from .defenses.double_masking import DoubleMasking

    params = dict(spec.params)
    allowed = ("k", "fill", "patch", "bf16")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PatchcertError(f"defense {spec.text!r}: unknown option(s) {', '.join(unknown)}; options: "
                             f"{', '.join(allowed)}")
    if "patch" in params and not isinstance(params["patch"], str):
        p = params["patch"]
        params["patch"] = f"{p[0]}x{p[1]}" if isinstance(p, tuple) else str(p)
    try:
        d = DoubleMasking(**params)
        if image_size is None:
            raise PatchcertError("double masking needs the image size")
        ms = d.mask_set(image_size, default_shapes)
    except PatchcertError as e:
        raise PatchcertError(f"defense {spec.text!r}: {e}") from None
    cfg = {**d.config, "masks": len(ms)}
    return DefensePlan(d.key, d, cfg, spec.text, mask_set=ms)


def default_mask_shapes(plans: Sequence["PatchPlan"]) -> list[tuple[int, int]]:
    """The shapes a double-masking defense without ``patch=`` builds its mask set for: the
    bounding shape of the requested patches if each threat is one shape (a mask set for a
    ``ph x pw`` patch covers every smaller one), else the union of every requested shape."""
    if all(len(p.shapes) == 1 for p in plans):
        return [(max(p.shapes[0][0] for p in plans), max(p.shapes[0][1] for p in plans))]
    out: list[tuple[int, int]] = []
    for p in plans:
        out += [s for s in p.shapes if s not in out]
    return out


def build_defenses(specs: Sequence[str | DefenseSpec | Any], default_window: tuple[int, int] | None = None,
                   wrap: bool = False, image_size: tuple[int, int] | None = None,
                   default_shapes: Sequence[tuple[int, int]] | None = None) -> list[DefensePlan]:
    """Build every defense up front (bad names/parameters fail here, before any work).

    ``default_window``: the feature window given to a masking defense whose spec sets no
    ``window`` (the run passes the window covering its largest requested patch).
    ``wrap``: the score map's windows wrap around its edges (``geometry.wrap``, De-randomized
    smoothing's bands): specs that do not say ``wrap`` get ``wrap=True``, and a defense with
    ``wrap=False`` is refused -- it would skip the wrapping placements, an unsound certificate.
    """
    if not specs:
        raise PatchcertError("no defense given")
    plans: list[DefensePlan] = []
    for s in specs:
        if isinstance(s, (str, DefenseSpec)) and parse_defense_spec(s).name in PIXEL_DEFENSES:
            plan = _build_double_masking(parse_defense_spec(s), image_size, default_shapes)
            if any(p.key == plan.key for p in plans):
                raise PatchcertError(f"defense {plan.key!r} requested twice")
            plans.append(plan)
            continue
        if isinstance(s, (str, DefenseSpec)):
            spec = parse_defense_spec(s)
            params = dict(spec.params)
            if wrap and "wrap" not in params:
                params["wrap"] = True
            if spec.name == "masking" and "window" not in params and default_window is not None:
                params["window"] = tuple(default_window)
                log.info("%s: mask window %dx%d (covers every requested patch window; set window=HxW to "
                         "choose)", spec.text, *default_window)
            try:
                d = create_defense(spec.name, **params)
            except PatchcertError as e:
                raise PatchcertError(f"defense {spec.text!r}: {e}") from None
            except (TypeError, ValueError) as e:
                raise PatchcertError(f"defense {spec.text!r}: bad parameters ({e})") from None
        elif isinstance(s, Defense):
            spec, d = None, s
        else:
            raise PatchcertError(f"a defense must be a spec string like 'voting' or a patchcert Defense, got {s!r}")
        if wrap and not d.wrap:
            raise PatchcertError(f"defense {spec.text if spec else d!s}: the score map's windows wrap around its edges "
                                 "(geometry.wrap); wrap=false would miss placements")
        if any(p.key == d.key for p in plans):
            raise PatchcertError(f"defense {d.key!r} requested twice")
        plans.append(DefensePlan(d.key, d, _jsonable(d.config), spec.text if spec else d.key))
    return plans


# -- patch specs -------------------------------------------------------------------------

@dataclass
class PatchPlan:
    """A patch threat resolved for one geometry and image size.

    ``shapes``: the pixel rectangles ``(ph, pw)``; ``windows``: their distinct feature windows
    ``(wh, ww)``; ``shape_window[j]``: the index in ``windows`` of ``shapes[j]``.
    """

    text: str
    spec: PatchSpec
    shapes: list[tuple[int, int]]
    windows: list[tuple[int, int]]
    shape_window: list[int]
    resolved: str


def plan_patches(patches: Sequence[str | PatchSpec], geometry: Geometry, image_size: tuple[int, int]
                 ) -> list[PatchPlan]:
    """Parse and resolve every patch spec; one-line PatchcertError when malformed or too big."""
    if not patches:
        raise PatchcertError("no patch given")
    plans: list[PatchPlan] = []
    for p in patches:
        try:
            spec = parse_patch(p)
            shapes = spec.shapes(image_size)
        except PatchcertError:
            raise
        except ValueError as e:
            raise PatchcertError(str(e)) from None
        if any(q.text == spec.text for q in plans):
            raise PatchcertError(f"patch {spec.text!r} requested twice")
        windows: list[tuple[int, int]] = []
        idx = []
        for sh in shapes:
            w = geometry.window(sh)
            if w not in windows:
                windows.append(w)
            idx.append(windows.index(w))
        plans.append(PatchPlan(spec.text, spec, shapes, windows, idx, ",".join(f"{a}x{b}" for a, b in shapes)))
    return plans


def _covering_window(plans: Sequence[PatchPlan]) -> tuple[int, int]:
    return (max(w[0] for p in plans for w in p.windows), max(w[1] for p in plans for w in p.windows))


def plan_threat(defenses: Sequence[str | DefenseSpec | Any], patches: Sequence[str | PatchSpec],
                geometry: Geometry, image_size: tuple[int, int]) -> tuple[list[DefensePlan], list[PatchPlan]]:
    """The defenses and patches of a run, exactly as every verb (certify, attack, training
    evaluation) must build them for one model: patch specs resolved on ``geometry``, masking's
    default window covering every patch window, and ``wrap`` from the geometry (a wrapping map
    -- De-randomized smoothing -- gets wrapping defenses; a non-wrapping defense is refused)."""
    patch_plans = plan_patches(patches, geometry, image_size)
    defense_plans = build_defenses(defenses, default_window=_covering_window(patch_plans), wrap=geometry.wrap,
                                   image_size=tuple(image_size), default_shapes=default_mask_shapes(patch_plans))
    return defense_plans, patch_plans


def square_windows(geometry: Geometry, cap: int) -> list[tuple[int, int]]:
    """Feature window of an ``s x s`` pixel patch for ``s = 1..cap``."""
    return [geometry.window((s, s)) for s in range(1, cap + 1)]


# -- one batch ---------------------------------------------------------------------------

def largest_certified_square(defense: Any, scores: torch.Tensor, labels: torch.Tensor,
                             windows: Sequence[tuple[int, int]], method: str = "bisect",
                             known: Mapping[tuple[int, int], torch.Tensor] | None = None,
                             pred: torch.Tensor | None = None) -> torch.Tensor:
    """Largest side ``s`` in ``1..len(windows)`` whose square patch is certified, per image.

    ``windows[s-1]`` is the feature window of an ``s x s`` patch (non-decreasing in ``s``).
    Returns long ``[N]`` (0: not even ``1x1`` certified). Exact when certification is monotone
    in the window, which holds for every defense here (a larger window contains every
    placement of a smaller one); either way the returned side was itself certified (or is
    implied by ``known`` through that monotonicity).

    What makes it cheap (nothing here changes an answer):

    * ``pred``: the defense's predictions (``certify`` implies ``pred == label``): images
      predicted wrongly get 0 without any certification;
    * ``known``: certificates already computed on these maps, ``{window: bool [N]}`` (e.g. the
      requested patches' windows): certified at ``K`` implies certified at every window inside
      ``K``, not certified at ``K`` implies not certified at every window containing it;
    * ``defense.window_class(w)``: windows with the same class are certified alike (masking:
      every window inside the mask window), so each class is certified at most once per image;
    * ``method="bisect"``: a vectorised bisection over the distinct windows for the images
      whose answer is still open (each step certifies every open image once, grouped by the
      window it asks about).

    ``method="scan"`` is the straightforward reference: it certifies every distinct window for
    every image (ignoring ``known``, ``pred`` and window classes) and returns the largest side
    whose window and all smaller ones are certified.
    """
    n = scores.shape[0]
    dev = scores.device
    if n == 0 or not windows:
        return torch.zeros(n, dtype=torch.long, device=dev)
    if method not in ("bisect", "scan"):
        raise PatchcertError(f"unknown method {method!r}; use 'bisect' or 'scan'")
    distinct: list[tuple[int, int]] = []
    last_side: list[int] = []
    for s, w in enumerate(windows, 1):
        w = (int(w[0]), int(w[1]))
        if distinct and distinct[-1] == w:
            last_side[-1] = s
        else:
            if distinct and (w[0] < distinct[-1][0] or w[1] < distinct[-1][1]):
                raise PatchcertError("square windows must grow with the side")
            distinct.append(w)
            last_side.append(s)
    m = len(distinct)
    side_of = torch.tensor([0] + last_side, dtype=torch.long, device=dev)  # index j+1 -> side
    wclass = getattr(defense, "window_class", lambda w: tuple(w))
    keys = [wclass(w) for w in distinct]
    span = {}  # class -> (first j, last j): windows grow, so a class is certified alike on its span
    for j, k in enumerate(keys):
        span[k] = (span[k][0] if k in span else j, j)
    lo = torch.full((n,), -1, dtype=torch.long, device=dev)  # largest j known certified
    hi = torch.full((n,), m, dtype=torch.long, device=dev)   # smallest j known not certified

    def learn(j_lo: int, j_hi: int, ok: torch.Tensor, sel: torch.Tensor | None = None) -> None:
        """``ok`` (bool, over ``sel`` or all images): certified at every j <= j_lo if ok, not
        certified at any j >= j_hi if not."""
        if sel is None:
            lo.copy_(torch.where(ok, lo.clamp(min=j_lo), lo))
            hi.copy_(torch.where(ok, hi, hi.clamp(max=j_hi)))
        else:
            lo[sel] = torch.where(ok, lo[sel].clamp(min=j_lo), lo[sel])
            hi[sel] = torch.where(ok, hi[sel], hi[sel].clamp(max=j_hi))

    if pred is not None:
        learn(-1, 0, pred.to(dev) == labels)
    for K, ok in (known or {}).items():
        ok = ok.to(device=dev, dtype=torch.bool)
        inside = [j for j, w in enumerate(distinct) if w[0] <= K[0] and w[1] <= K[1]]
        around = [j for j, w in enumerate(distinct) if w[0] >= K[0] and w[1] >= K[1]]
        kk = wclass(tuple(K))
        same = [j for j, k in enumerate(keys) if k == kk]
        j_lo = max(inside + same, default=-1)
        j_hi = min(around + same, default=m)
        learn(j_lo, j_hi, ok)

    def certify_at(j: int, sel: torch.Tensor) -> None:
        ok = defense.certify(scores[sel], labels[sel], [distinct[j]]).to(torch.bool)
        first, last = span[keys[j]]
        learn(last, first, ok, sel)

    if method == "scan":  # the straightforward reference: no shortcut at all
        ok = torch.stack([defense.certify(scores, labels, [w]).to(torch.bool) for w in distinct], 1)
        return side_of[ok.long().cumprod(1).sum(1)]
    while True:
        active = hi - lo > 1
        if not bool(active.any()):
            break
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        for j in torch.unique(mid[active]).tolist():
            certify_at(j, torch.nonzero(active & (mid == j)).flatten())
    return side_of[lo + 1]


def square_summary(curve: Sequence[float]) -> str:
    """One line describing the largest certified square from a square curve (``curve[s-1]``:
    fraction of all images certified against an ``s x s`` patch, non-increasing): the mean
    largest certified side over all images (0 for images certified against no square; the
    mean of a non-negative integer is the sum of its tail fractions), the fraction certified at
    each size up to the first size where none is, and the largest size any image reaches."""
    cap = len(curve)
    if cap == 0:
        return "no square searched"
    mean = float(sum(curve))
    reached = max((s for s, v in enumerate(curve, 1) if v > 0), default=0)
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%" if v == 0 or v >= 0.001 else f"{100 * v:.2g}%"

    parts = [f"{s}x{s} {pct(v)}" for s, v in enumerate(curve[: reached + 1], 1)]
    if len(parts) > 12:  # keep the line short: the first sizes, then every few
        step = -(-len(parts) // 10)
        parts = parts[:4] + parts[4:-1:step] + parts[-1:]
    if reached == 0:
        dist = "none certified even at 1x1"
    else:
        dist = "certified at " + ", ".join(parts)
        dist += f" (largest: {reached}x{reached}" + (")" if reached < cap else ", the search cap)")
    return f"largest certified square: mean side {mean:.2f} px over all images; {dist}; searched up to {cap}x{cap}"


class _Timer:
    """Accumulated seconds by name (synchronising CUDA around each measured block)."""

    def __init__(self, device: torch.device, totals: dict[str, float] | None = None) -> None:
        self.device = device
        self.totals: dict[str, float] = dict(totals or {})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


def certify_batch(scores: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
                  defenses: Sequence[DefensePlan], patches: Sequence[PatchPlan],
                  squares: Sequence[tuple[int, int]] | None = None, timer: _Timer | None = None,
                  square_method: str = "bisect", tables: Mapping[str, torch.Tensor] | None = None
                  ) -> list[ExampleRecord]:
    """Certify one batch of score maps against every defense and patch.

    ``tables``: for pixel defenses (double masking), the batch's masked-prediction tables
    ``[B, M, M]`` by defense key (:func:`patchcert.defenses.double_masking.masked_prediction_table`).

    ``scores`` float ``[B, K, H, W]`` (the dtype the defenses compute in), ``labels`` long
    ``[B]`` on the same device, ``indices`` the B dataset indices. ``squares``: windows of
    ``s x s`` patches for ``s = 1..cap`` (None: no largest-square search). Returns B records.
    """
    timer = timer or _Timer(scores.device)
    B = scores.shape[0]
    clean_pred = scores.to(torch.float64).mean((2, 3)).argmax(1).tolist()
    lab = labels.tolist()
    per_def: dict[str, dict[str, Any]] = {}
    for dp in defenses:
        d = dp.defense
        if dp.on_pixels:
            if tables is None or dp.key not in tables:
                raise PatchcertError(f"{dp.key} works on images: it needs the model (a score file holds no "
                                     "masked predictions)")
            per_def[dp.key] = _certify_table_batch(dp, tables[dp.key], labels, patches, timer)
            continue
        timer.sync()
        t0 = time.perf_counter()
        pred = d.predict(scores)
        timer.sync()
        timer.add(f"{dp.key}|predict", time.perf_counter() - t0)
        out: dict[str, Any] = {"pred": pred.tolist(), "patches": {}}
        known: dict[tuple[int, int], torch.Tensor] = {}  # certificates the square search can reuse
        for pp in patches:
            t0 = time.perf_counter()
            det = d.certify_details(scores, labels, pp.windows)
            timer.sync()
            timer.add(f"{dp.key}|patch|{pp.text}", time.perf_counter() - t0)
            cert = det.certified.to(torch.bool)
            for i, w in enumerate(pp.windows):
                known[tuple(w)] = det.per_window[:, i].to(torch.bool)
            if bool((cert & (pred != labels)).any()):
                bad = int(torch.nonzero(cert & (pred != labels))[0])
                raise RuntimeError(f"internal error: {dp.key} certified example {indices[bad]} for {pp.text} "
                                   "but predicts another class (please report)")
            entry: dict[str, Any] = {"certified": cert.tolist(), "shapes": None}
            margin = det.margin.tolist()
            wi, rr, cc, wc = det.window_index.tolist(), det.row.tolist(), det.col.tolist(), det.worst_class.tolist()
            entry["worst"] = [WorstCase(margin[i], pp.windows[wi[i]], rr[i], cc[i], wc[i])
                              if 0 <= wi[i] < len(pp.windows) else None for i in range(B)]
            if len(pp.shapes) > 1:
                pw = det.per_window.to(torch.bool)[:, pp.shape_window].tolist()  # [B, shapes]
                names = [f"{a}x{b}" for a, b in pp.shapes]
                entry["shapes"] = [dict(zip(names, row)) for row in pw]
            out["patches"][pp.text] = entry
        if squares:
            t0 = time.perf_counter()
            ls = largest_certified_square(d, scores, labels, squares, method=square_method,
                                          known=known, pred=pred).tolist()
            timer.sync()
            timer.add(f"{dp.key}|largest_square", time.perf_counter() - t0)
        else:
            ls = [None] * B
        out["largest_square"] = ls
        per_def[dp.key] = out
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
        records.append(ExampleRecord(int(indices[i]), lab[i], clean_pred[i], defs))
    return records


def _certify_table_batch(dp: DefensePlan, table: torch.Tensor, labels: torch.Tensor,
                         patches: Sequence[PatchPlan], timer: _Timer) -> dict[str, Any]:
    """Double masking on one batch: prediction and, per patch threat, the certificate (every
    shape covered by the mask set and every two-mask prediction equal to the label)."""
    from .defenses.double_masking import certify_from_table, covers

    d = dp.defense
    t0 = time.perf_counter()
    pred = d.predict_table(table)
    timer.add(f"{dp.key}|predict", time.perf_counter() - t0)
    B = table.shape[0]
    out: dict[str, Any] = {"pred": pred.tolist(), "patches": {}, "largest_square": [None] * B}
    all_pairs = certify_from_table(table, labels.to(table.device))  # the same for every threat
    for pp in patches:
        t0 = time.perf_counter()
        cov = [covers(dp.mask_set, s) for s in pp.shapes]
        cert = (all_pairs & all(cov)).tolist()
        timer.add(f"{dp.key}|patch|{pp.text}", time.perf_counter() - t0)
        entry: dict[str, Any] = {"certified": cert, "worst": [None] * B, "shapes": None}
        if len(pp.shapes) > 1:
            names = [f"{a}x{b}" for a, b in pp.shapes]
            entry["shapes"] = [{n: bool(c) and ok for n, ok in zip(names, cov)} for c in all_pairs.tolist()]
        out["patches"][pp.text] = entry
    return out


# -- the dataset loop --------------------------------------------------------------------

@dataclass
class CertifyRun:
    """What :func:`certify_dataset` returns: the summary, the records (in index order) and
    the directory written (None for an in-memory run)."""

    summary: Summary
    records: list[ExampleRecord]
    out_dir: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per example x defense x patch (:func:`patchcert.results.records_table`)."""
        from .results import records_table

        return records_table(self.records)


def parse_shard(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) or ``(i, n)`` -> ``(i, n)``; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", spec)
        if not m:
            raise PatchcertError(f"malformed shard {spec!r}: use i/n with 0 <= i < n, e.g. 0/4")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(spec[0]), int(spec[1]))
        except (TypeError, ValueError, IndexError):
            raise PatchcertError(f"malformed shard {spec!r}: use (i, n) with 0 <= i < n") from None
        if len(spec) != 2:
            raise PatchcertError(f"malformed shard {spec!r}: use (i, n) with 0 <= i < n")
    if n < 1 or not 0 <= i < n:
        raise PatchcertError(f"bad shard {i}/{n}: need n >= 1 and 0 <= i < n (shards count from 0)")
    return (i, n)


def shard_batches(num_batches: int, shard: tuple[int, int] | None) -> range:
    """Batch numbers of shard ``(i, n)``: a contiguous block, sizes differing by at most one."""
    if shard is None:
        return range(num_batches)
    i, n = shard
    return range(i * num_batches // n, (i + 1) * num_batches // n)


def _state_dict_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _first_bad(mask_ok: torch.Tensor) -> int:
    return int(torch.nonzero(~mask_ok)[0])


def _check_pos_int(v: Any, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PatchcertError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class _Source:
    """Where the score maps come from: a model + dataset, or a score file."""

    geometry: Geometry
    image_size: tuple[int, int]
    num_classes: int
    classes: list[str]
    total: int
    name: str


def _model_source(model: Any, data: Any) -> _Source:
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
    return _Source(geometry, image_size, num_classes, list(data.classes), len(data), data.name)


def _score_source(scores: ScoreFile) -> _Source:
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
    return _Source(geometry, image_size, num_classes, classes, len(scores), f"scores:{scores.path}")


def _provenance(model: Any, data: Any, scores: ScoreFile | None) -> dict[str, Any]:
    """What the records depend on besides the run's options: model (hash), data, score file."""
    if scores is None:
        ckpt = getattr(model, "checkpoint_path", None)
        return {"model": str(getattr(model, "arch", type(model).__name__)),
                "model_sha256": file_sha256(ckpt) if ckpt else _state_dict_sha256(model),
                "hash_of": "file" if ckpt else "state_dict", "checkpoint": str(ckpt) if ckpt else None,
                "model_config": _jsonable(dict(getattr(model, "config", {}) or {})),
                "data": _jsonable({"name": data.name, "num_examples_total": len(data), **data.info}),
                "scores_path": None, "scores_sha256": None}
    meta = scores.meta
    return {"model": str(meta.get("model", "unknown")), "model_sha256": meta.get("model_sha256"),
            "hash_of": meta.get("model_hash_of", "file"), "checkpoint": meta.get("checkpoint"),
            "model_config": _jsonable(meta.get("model_config") or {}), "data": _jsonable(meta.get("data") or {}),
            "scores_path": scores.path, "scores_sha256": scores.sha256}


def _check_selection(start: Any, num_examples: int | None, batch_size: Any, src: _Source) -> int:
    _check_pos_int(batch_size, "batch size")
    _check_pos_int(num_examples, "number of examples", allow_none=True)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise PatchcertError(f"start must be a non-negative integer, got {start!r}")
    if start >= src.total:
        raise PatchcertError(f"start {start} is past the end of {src.name} ({src.total} examples)")
    if num_examples is None:
        return src.total - start
    if start + num_examples > src.total:
        raise PatchcertError(f"{num_examples} examples from {start} exceed the {src.total} examples of {src.name}")
    return num_examples


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PatchcertError(f"dtype must be float32 or float64, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise PatchcertError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _warn_oversized(patch_plans: Sequence[PatchPlan], map_size: tuple[int, int]) -> None:
    H, W = map_size
    for pp in patch_plans:
        for w in pp.windows:
            if H and (w[0] > H or w[1] > W):
                log.warning("patch %s: window %dx%d is larger than the %dx%d score map; nothing can be certified",
                            pp.text, w[0], w[1], H, W)


def _check_pixel_plans(defense_plans: Sequence[DefensePlan], patch_plans: Sequence[PatchPlan],
                       scores: ScoreFile | None) -> None:
    pixel_plans = [dp for dp in defense_plans if dp.on_pixels]
    if pixel_plans and scores is not None:
        raise PatchcertError(f"{pixel_plans[0].key} works on images and needs the model; a score file holds only "
                             "score maps")
    for dp in pixel_plans:
        from .defenses.double_masking import covers

        for pp in patch_plans:
            bad = [f"{a}x{b}" for a, b in pp.shapes if not covers(dp.mask_set, (a, b))]
            if bad:
                log.warning("%s: its mask set does not cover patch %s (%s); nothing is certified for it",
                            dp.key, pp.text, ", ".join(bad))


@dataclass
class _Job:
    """Everything one certify call decided before any work."""

    model: Any
    data: Any
    scores: ScoreFile | None
    src: _Source
    prov: dict[str, Any]
    defense_plans: list[DefensePlan]
    patch_plans: list[PatchPlan]
    squares: list[tuple[int, int]] | None
    start: int
    num_examples: int
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    shard: tuple[int, int] | None
    batches: range
    lo: int  # first selected position of this shard (relative to start)
    total: int  # examples of this shard
    map_size: tuple[int, int]
    config: dict[str, Any]
    square_cap: int
    square_method: str
    save_scores: bool
    seed: int | None
    command: str
    num_workers: int | None = None
    skip_bad_images: bool = False  # record unreadable images in skipped.jsonl instead of stopping
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {index, reason}, in order

    @property
    def pixel_plans(self) -> list[DefensePlan]:
        return [dp for dp in self.defense_plans if dp.on_pixels]

    @property
    def dtype_name(self) -> str:
        return "float32" if self.dtype == torch.float32 else "float64"


def _plan_job(model, data, scores, defenses, patches, batch_size, device, dtype, num_examples, start, shard,
              out_dir, save_scores, square_cap, square_method, seed, command) -> _Job:
    if scores is None:
        if model is not None and data is not None:
            data = as_image_dataset(data, num_classes=int(getattr(model, "num_classes", 0) or 0) or None)
        src = _model_source(model, data)
    else:
        if model is not None or data is not None:
            raise PatchcertError("give either a model and dataset or cached scores, not both")
        src = _score_source(scores)
    num_examples = _check_selection(start, num_examples, batch_size, src)
    shard_t = parse_shard(shard)
    dtype = _resolve_dtype(dtype)
    from .runtime import resolve_device

    dev = resolve_device(device)
    if square_cap is None:
        square_cap = min(src.image_size)
    if isinstance(square_cap, bool) or not isinstance(square_cap, int) or square_cap < 0:
        raise PatchcertError(f"square cap must be a non-negative integer, got {square_cap!r}")
    square_cap = min(square_cap, min(src.image_size))
    if save_scores and out_dir is None:
        raise PatchcertError("save_scores needs an output directory")
    defense_plans, patch_plans = plan_threat(defenses, patches, src.geometry, src.image_size)
    _check_pixel_plans(defense_plans, patch_plans, scores)
    squares = square_windows(src.geometry, square_cap) if square_cap > 0 else None
    prov = _provenance(model, data, scores)
    nb = math.ceil(num_examples / batch_size)
    batches = shard_batches(nb, shard_t)
    lo = min(batches.start * batch_size, num_examples)
    hi = min(batches.stop * batch_size, num_examples)
    if hi == lo:
        log.warning("shard %s/%s holds no examples (%d batches for %d shards)", *shard_t, nb, shard_t[1])  # type: ignore[misc]
    if scores is not None:
        map_size = (int(scores.scores.shape[-2]), int(scores.scores.shape[-1]))
    else:
        map_size = tuple(model.map_size(src.image_size)) if hasattr(model, "map_size") else (0, 0)
    _warn_oversized(patch_plans, map_size)  # type: ignore[arg-type]
    dtype_name = "float32" if dtype == torch.float32 else "float64"
    config = _jsonable({
        "format": 1,
        "model": prov["model"], "model_sha256": prov["model_sha256"], "model_config": prov["model_config"],
        "scores_sha256": prov["scores_sha256"], "data": prov["data"], "start": start, "num_examples": num_examples,
        "total": num_examples, "defenses": [{"key": p.key, "config": p.config} for p in defense_plans],
        "patches": [{"patch": p.text, "resolved": p.resolved, "windows": [list(w) for w in p.windows]}
                    for p in patch_plans],
        "dtype": dtype_name, "batch_size": batch_size, "save_scores": bool(save_scores),
        "square_cap": square_cap, "square_method": square_method,
        "geometry": src.geometry.to_dict(), "image_size": list(src.image_size),
        "shard": list(shard_t) if shard_t else None,
    })
    return _Job(model, data, scores, src, prov, defense_plans, patch_plans, squares, start, num_examples, batch_size,
                dtype, dev, shard_t, batches, lo, hi - lo, map_size, config, square_cap,  # type: ignore[arg-type]
                square_method, bool(save_scores), seed, command)


def _hold_run(stack: contextlib.ExitStack, out_dir: str | os.PathLike, shard: tuple[int, int] | None,
              lock: bool) -> Path:
    """Check the run folder's layout and hold it for the run: an unsharded run holds ``RUN``
    exclusively; a shard holds ``RUN`` shared and ``RUN/shard-i-of-n`` exclusively."""
    top = Path(out_dir)
    if shard is None and top.is_dir() and any(top.glob("shard-*-of-*")):
        raise PatchcertError(f"{top} holds a sharded run: continue it with --shard i/n, or merge it with "
                             f"patchcert certify --merge {top}")
    if shard is not None and (top / CONFIG_FILE).is_file() and not any(top.glob("shard-*-of-*")):
        raise PatchcertError(f"{top} holds an unsharded run; choose another --out for a sharded one")
    run_dir = top / shard_dirname(*shard) if shard else top
    writes = (SUMMARY_FILE, SUMMARY_CSV, PROGRESS_FILE, SCORES_FILE, "scores.parts", SKIPPED_FILE)
    if shard is not None and not any(top.glob("shard-*-of-*")):  # the merge will write these into RUN
        rundir.check_new_run(top, (CONFIG_FILE, RECORDS_FILE) + writes, markers=())
    rundir.check_new_run(run_dir, writes)  # a folder of the user's: nothing of theirs is overwritten
    if not lock:
        return rundir.prepare(run_dir)
    if shard is None:
        return stack.enter_context(rundir.hold(top))
    stack.enter_context(rundir.hold(top, "shared", clean=False))
    return stack.enter_context(rundir.hold(run_dir))


def _resume_records(job: _Job, run_dir: Path, resume: bool) -> tuple[list[ExampleRecord], dict[str, float]]:
    """The records (and timing) an interrupted run in ``run_dir`` already holds; none for a new run."""
    if not rundir.check_resume(run_dir, job.config, resume, CONFIG_FILE, markers=(CONFIG_FILE, RECORDS_FILE)):
        return [], {}
    done = repair_records(run_dir / RECORDS_FILE)
    first = job.start + job.lo
    job.skipped = _resume_skipped(job, run_dir, first, [r.index for r in done])
    skipped = {int(s["index"]) for s in job.skipped}
    window = dataset_indices(job.data, torch.arange(first, first + min(len(done) + len(skipped), job.total)))
    expect = [i for i in window.tolist() if i not in skipped]
    if job.scores is not None:
        expect = job.scores.indices[first:first + len(done)].tolist()
    if [r.index for r in done] != expect:
        raise PatchcertError(f"cannot resume {run_dir}: records.jsonl does not hold the first examples "
                             "of this run in order")
    if len(done) > job.total:
        raise PatchcertError(f"cannot resume {run_dir}: it holds more records than the run selects")
    timing: dict[str, float] = {}
    prog_p = run_dir / PROGRESS_FILE
    if prog_p.exists():
        timing = {k: float(v) for k, v in (read_json(prog_p).get("timing") or {}).items()}
    log.info("resuming %s: %d/%d examples done", run_dir, len(done), job.total)
    return done, timing


def _resume_skipped(job: _Job, run_dir: Path, first: int, done: list[int]) -> list[dict[str, Any]]:
    """The unreadable images an interrupted run skipped (``skipped.jsonl``), as far as its records
    reach: a batch's skipped images are written before its records, so entries past the last
    recorded batch are dropped (that batch is read again). Entries and ``done`` hold dataset
    indices; the run covers positions ``first, first + 1, ...`` (of a selection, if any)."""
    p = run_dir / SKIPPED_FILE
    if not p.exists():
        return []
    entries = rundir.read_jsonl(p, tail="repair")
    if not all(isinstance(e.get("index"), int) and isinstance(e.get("reason"), str) for e in entries):
        raise PatchcertError(f"cannot resume {run_dir}: {SKIPPED_FILE} is corrupt")
    have = set(done) | {int(e["index"]) for e in entries}
    window = dataset_indices(job.data, torch.arange(first, first + min(len(done) + len(entries), job.total))).tolist()
    end = 0
    while end < len(window) and window[end] in have:
        end += 1
    reach = set(window[:end])
    keep = [e for e in entries if int(e["index"]) in reach]
    if len(keep) != len(entries):
        atomic_write_bytes(p, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in keep).encode())
    return keep


def _finished_run(job: _Job, run_dir: Path, ndone: int) -> Summary | None:
    """The summary of the finished run in ``run_dir`` (every record, the summary and, with
    ``save_scores``, the score file are there), or None if it still has work to do."""
    if ndone + len(job.skipped) != job.total or not (run_dir / SUMMARY_FILE).is_file():
        return None
    if job.save_scores and not (run_dir / SCORES_FILE).is_file():
        return None
    summary = read_summary(run_dir)
    if summary.n != ndone:
        return None
    log.info("%s is finished (%d/%d examples): nothing to do", run_dir, ndone, job.total)
    return summary


def _start_run_dir(job: _Job, run_dir: Path, done: list[ExampleRecord], timing: dict[str, float]) -> None:
    for f in (SUMMARY_FILE, SUMMARY_CSV):  # a finished run is only finished once rewritten
        (run_dir / f).unlink(missing_ok=True)
    write_json(run_dir / CONFIG_FILE, job.config)
    (run_dir / RECORDS_FILE).touch()
    write_json(run_dir / PROGRESS_FILE, {"done": len(done) + len(job.skipped), "total": job.total, "complete": False,
                                         "timing": timing})


def _batch_maps(job: _Job, pos: torch.Tensor, images: Any, timer: _Timer
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score maps, labels, dataset indices and (with a model) the images of the selected
    positions ``pos`` (checked); images come from the loader ``images``."""
    x = None
    if images is not None:
        xb, y, idx = next(images)
        if len(idx) == 0:  # every image of the batch was unreadable (and skipped)
            return None, y, idx, None  # type: ignore[return-value]
        idx = dataset_indices(job.data, idx)  # a selection's positions -> dataset indices
        x = to_float(xb.to(job.device, non_blocking=job.device.type == "cuda"))
        timer.sync()
        t0 = time.perf_counter()
        smap = job.model.score_map(x)
        timer.sync()
        timer.add("forward", time.perf_counter() - t0)
        timer.add("forward_images", float(len(pos)))
        what = "model produced"
    else:
        smap = job.scores.scores[pos].to(job.device)
        y, idx = job.scores.labels[pos], job.scores.indices[pos]
        what = "score file holds"
    K = job.src.num_classes
    if smap.dim() != 4 or smap.shape[1] != K or not smap.is_floating_point():
        raise PatchcertError(f"score maps of shape {tuple(smap.shape)} ({smap.dtype}); expected float [N, {K}, H, W]")
    fin = torch.isfinite(smap).flatten(1).all(1)
    if not bool(fin.all()):
        raise PatchcertError(f"{what} NaN/Inf scores for example {int(idx[_first_bad(fin)])}")
    return smap, y, idx, x


def _pixel_tables(job: _Job, x: torch.Tensor | None, timer: _Timer) -> dict[str, torch.Tensor]:
    """Double masking: the model on every two-mask image of the batch, per pixel defense."""
    tables = {}
    for dp in job.pixel_plans:
        timer.sync()
        t0 = time.perf_counter()
        tables[dp.key] = dp.defense.table(job.model, x, dp.mask_set)
        timer.sync()
        timer.add(f"{dp.key}|table", time.perf_counter() - t0)
    return tables


def _certify_loop(job: _Job, run_dir: Path | None, records: list[ExampleRecord], ndone: int, timer: _Timer,
                  progress: Callable[[int, int], None] | None, counter: SummaryCounter,
                  keep: bool = True) -> list[ExampleRecord]:
    """Certify the job's remaining batches (``ndone`` examples are recorded already), appending
    records to ``run_dir`` and counting them in ``counter`` as it goes; ``records`` (the
    resumed ones, if kept) is extended with the new ones if ``keep`` (else memory stays flat)."""
    if progress is not None:
        progress(ndone, job.total)
    parts_dir = run_dir / "scores.parts" if run_dir is not None else None
    if job.save_scores and parts_dir is not None:
        parts_dir.mkdir(exist_ok=True)
    model = job.model
    was_training = model.training if model is not None else None
    if model is not None:
        model.to(job.device).eval()
    B, n = job.batch_size, job.num_examples
    todo = [b for b in job.batches if min((b + 1) * B, n) - job.lo > ndone]  # not fully recorded
    images = None
    if job.scores is None:
        from .loader import load_batches

        images = load_batches(job.data, [range(job.start + b * B, job.start + min((b + 1) * B, n)) for b in todo],
                              job.num_workers, pin_memory=job.device.type == "cuda",
                              on_bad=(lambda i, why: bad.append({"index": i, "reason": why}))
                              if job.skip_bad_images else None)
    bad: list[dict[str, Any]] = []  # the unreadable images of the current batch
    try:
        with torch.no_grad(), precise_math():
            for b in todo:
                lo, hi = b * B, min((b + 1) * B, n)
                pos = torch.arange(job.start + lo, job.start + hi)
                bad.clear()
                smap, y, idx, x = _batch_maps(job, pos, images, timer)
                if smap is None:
                    batch_records: list[ExampleRecord] = []
                elif job.save_scores and parts_dir is not None:
                    save_tensors(parts_dir / f"{lo:09d}.safetensors",
                                 {"scores": smap.float(), "labels": y, "indices": idx}, {"lo": lo, "hi": hi})
                if smap is not None:  # never round the map down: a float64 model is certified on its float64 scores
                    sdef = smap.to(torch.promote_types(smap.dtype, job.dtype))
                    batch_records = certify_batch(sdef, y.to(job.device), idx.tolist(), job.defense_plans,
                                                  job.patch_plans, job.squares, timer, job.square_method,
                                                  tables=_pixel_tables(job, x, timer))
                timer.add("images", float(len(pos)))
                new, new_bad = _not_recorded(job, pos, batch_records, bad, ndone, lo)
                if run_dir is not None:
                    if new_bad:  # before the records: a resume trims what its records do not reach
                        rundir.append_jsonl(run_dir / SKIPPED_FILE, [json.dumps(e, separators=(",", ":"))
                                                                     for e in new_bad])
                    append_records(run_dir / RECORDS_FILE, new)
                    write_json(run_dir / PROGRESS_FILE, {"done": ndone + len(new) + len(new_bad), "total": job.total,
                                                         "complete": False, "timing": timer.totals})
                for e in new_bad:
                    log.warning("skipped example %d: %s", e["index"], e["reason"])
                job.skipped.extend(new_bad)
                counter.add(new)
                if keep:
                    records.extend(new)
                ndone += len(new) + len(new_bad)
                if progress is not None:
                    progress(ndone, job.total)
    finally:
        if images is not None:
            images.close()  # stops DataLoader workers early if the loop raised
        if model is not None and was_training:
            model.train(True)
    return records


def _not_recorded(job: _Job, pos: torch.Tensor, batch_records: list[ExampleRecord], bad: list[dict[str, Any]],
                  ndone: int, lo: int) -> tuple[list[ExampleRecord], list[dict[str, Any]]]:
    """The records and skipped images (``{index, reason}``, dataset indices) of the batch at
    positions ``pos`` that the run does not hold yet (a resumed run reads its last batch again).
    ``bad`` holds the batch's unreadable images by position; the records are the rest, in order."""
    if job.scores is not None:
        return (batch_records[ndone - (lo - job.lo):] if lo - job.lo < ndone else batch_records), []
    nxt = job.start + job.lo + ndone  # the first position not recorded yet
    bad_pos = {int(e["index"]) for e in bad}
    rec_pos = [p for p in pos.tolist() if p not in bad_pos]
    new = [r for r, p in zip(batch_records, rec_pos) if p >= nxt]
    late = [e for e in bad if int(e["index"]) >= nxt]
    didx = dataset_indices(job.data, torch.tensor([int(e["index"]) for e in late], dtype=torch.int64)).tolist()
    return new, [{"index": int(i), "reason": e["reason"]} for i, e in zip(didx, late)]


def _per_image(timer: _Timer, key: str, count_key: str = "images") -> float | None:
    """Seconds per image of the timer entry ``key`` (None if never timed)."""
    tot = timer.totals
    n = tot.get(count_key, 0.0)
    return tot[key] / n if key in tot and n else None


def _template(job: _Job, timer: _Timer) -> list[ResultRow]:
    """The summary's rows (accuracies still 0), with the run's per-image timing."""
    return [
        ResultRow(defense=dp.key, defense_config=dp.config, patch=pp.text, resolved=pp.resolved,
                  windows=[list(w) for w in pp.windows], clean_accuracy=0.0, certified_accuracy=0.0,
                  certify_seconds_per_image=_per_image(timer, f"{dp.key}|patch|{pp.text}"))
        for dp in job.defense_plans for pp in job.patch_plans
    ]


def _summary(job: _Job, counter: SummaryCounter, timer: _Timer) -> Summary:
    prov = job.prov
    md = RunMetadata(
        model=prov["model"], model_sha256=prov["model_sha256"], checkpoint=prov["checkpoint"], data=prov["data"],
        num_examples=counter.n, seed=job.seed, device=str(job.device), dtype=job.dtype_name, versions=versions(),
        forward_seconds_per_image=_per_image(timer, "forward", "forward_images"),
        geometry=job.src.geometry.to_dict(), image_size=list(job.src.image_size), command=job.command,
        model_hash_of=str(prov["hash_of"]), model_config=prov["model_config"], num_classes=job.src.num_classes,
        classes=job.src.classes, map_size=list(job.map_size),
        scores_file=prov["scores_path"], scores_sha256=prov["scores_sha256"], start=job.start,
        indices=[counter.first_index, counter.last_index] if counter.n else [],
        batch_size=job.batch_size, square_cap=job.square_cap, shard=list(job.shard) if job.shard else None,
        skipped=list(job.skipped),
        defense_seconds_per_image={dp.key: {"predict": _per_image(timer, f"{dp.key}|predict"),
                                            "largest_square": _per_image(timer, f"{dp.key}|largest_square"),
                                            **({"masked_forward": _per_image(timer, f"{dp.key}|table")} if dp.on_pixels
                                               else {})}
                                   for dp in job.defense_plans},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return counter.summary(md, template=_template(job, timer))  # the timing is known now


def _finish_run_dir(job: _Job, run_dir: Path, summary: Summary, ndone: int, timer: _Timer) -> None:
    prov = job.prov
    if job.save_scores:
        _join_score_parts(run_dir / "scores.parts", run_dir / SCORES_FILE, {
            "format": 1, "geometry": job.src.geometry.to_dict(), "image_size": list(job.src.image_size),
            "model": prov["model"], "model_sha256": prov["model_sha256"], "model_hash_of": prov["hash_of"],
            "model_config": prov["model_config"], "checkpoint": prov["checkpoint"], "classes": job.src.classes,
            "data": prov["data"], "shard": list(job.shard) if job.shard else None,
        }, job.total - len(job.skipped))
    write_summary(run_dir, summary)
    write_json(run_dir / PROGRESS_FILE, {"done": ndone, "total": job.total, "complete": True, "timing": timer.totals})


def certify_dataset(
    model: nn.Module | None = None,
    data: ImageSource | None = None,
    *,
    scores: ScoreFile | None = None,
    defenses: Sequence[str | DefenseSpec | Any] = ("voting",),
    patches: Sequence[str | PatchSpec] = ("5x5",),
    batch_size: int = 128,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float64,
    num_examples: int | None = None,
    start: int = 0,
    shard: str | tuple[int, int] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_scores: bool = False,
    square_cap: int | None = None,
    square_method: str = "bisect",
    seed: int | None = None,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
    num_workers: int | None = None,
    lock: bool = True,
    keep_records: bool = True,
    skip_bad_images: bool = False,
    indices: str | Sequence[int] | None = None,
    subset: str | None = None,
) -> CertifyRun:
    """Certify examples ``start .. start+num_examples-1`` of ``data`` (or of a cached score file).

    Either ``model`` (a ScoreMapModel: images in [0, 1] -> ``[N, K, H, W]``) and ``data`` (an
    ``ImageDataset``, ``(images, labels)`` tensors with float images in [0, 1] or uint8, or any
    map-style dataset of ``(image, label)``: :func:`patchcert.data.as_image_dataset`), or
    ``scores`` (a :class:`ScoreFile`). ``device="auto"``: CUDA if available, else the CPU. The model runs once per batch in eval mode, under
    ``no_grad``, with TF32 off, on images in float32 [0, 1]; its scores go to the defenses in
    ``dtype`` (or the model's own dtype if wider: a map is never rounded down before it is
    certified). Saved score files hold float32, as the contract says.
    Every defense (spec string, :class:`DefenseSpec` or defense object) is certified against
    every patch spec (``"5x5"``, ``"2%"``, ``"area=24"``) on the same maps.

    ``out_dir``: write the run directory (see :mod:`patchcert.results`); with ``shard=(i, n)``
    into ``out_dir/shard-i-of-n``. The folder is held for the whole call (:mod:`patchcert.rundir`):
    another process on it is refused; ``lock=False`` when the caller already holds it (a
    torchrun job). ``resume``: continue a run there (its records must come from the same
    configuration). ``square_cap``: largest square side searched for ``largest_square``
    (default ``min(H, W)``; 0 disables). ``progress(done, total)`` is called after every
    batch. Everything is validated before any work, with one-line PatchcertErrors.
    ``data`` is any :class:`~patchcert.data.ImageSource`; images are read batch by batch through
    :func:`patchcert.loader.load_batches` (``num_workers`` processes decode ahead; default: none
    for in-memory data, a few for image folders), so memory does not grow with the dataset.
    TF32 is off inside the loop and the caller's setting is restored afterwards.
    ``keep_records=False``: the returned run holds no records (``records == []``; they are in
    ``out_dir/records.jsonl``) and the summary is counted as the run goes, so memory does not grow
    with the number of examples either (the ``patchcert certify`` command runs this way).
    An image that cannot be decoded stops the run with a one-line DataError naming its file;
    ``skip_bad_images=True`` records it as skipped instead (``out_dir/skipped.jsonl`` and the
    summary's ``metadata.skipped``, ``{index, reason}``, the dataset index): it has no record
    and is in no count.
    ``model`` may also be any ``nn.Module`` mapping float images in [0, 1] to logits ``[N, K]``
    (wrapped by :func:`patchcert.wrap_classifier`; pixel defenses only), and ``indices``
    (``[3, 17]`` or ``"3,17,40-49"``) or ``subset="random:N"`` (drawn with ``seed``, default 0)
    select the examples (:mod:`patchcert.selection`); ``start``/``num_examples`` then count
    positions in the selection, and the records keep the dataset indices.
    """
    from .inputs import prepare_inputs

    model, data = prepare_inputs(model, data, defenses, indices=indices, subset=subset, seed=seed, start=start,
                                 num_examples=num_examples)
    job = _plan_job(model, data, scores, defenses, patches, batch_size, device, dtype, num_examples, start, shard,
                    out_dir, save_scores, square_cap, square_method, seed, command)
    job.num_workers = num_workers
    job.skip_bad_images = bool(skip_bad_images)
    with contextlib.ExitStack() as stack:
        run_dir: Path | None = None
        done: list[ExampleRecord] = []
        timing: dict[str, float] = {}
        if out_dir is not None:
            run_dir = _hold_run(stack, out_dir, job.shard, lock)
            done, timing = _resume_records(job, run_dir, resume)
            finished = _finished_run(job, run_dir, len(done))
            if finished is not None:  # resuming a finished run: nothing to do, nothing rewritten
                return CertifyRun(finished, done if keep_records else [], run_dir, job.config)
            _start_run_dir(job, run_dir, done, timing)
        timer = _Timer(job.device, timing)
        counter = SummaryCounter(_template(job, timer)).add(done)
        ndone, records = len(done) + len(job.skipped), (done if keep_records else [])
        del done  # without keep_records, the resumed records are counted and dropped
        records = _certify_loop(job, run_dir, records, ndone, timer, progress, counter, keep=keep_records)
        summary = _summary(job, counter, timer)
        if run_dir is not None:
            _finish_run_dir(job, run_dir, summary, counter.n, timer)
            if job.shard:
                log.info("shard %d/%d finished; merge all shards with: patchcert certify --merge %s",
                         job.shard[0], job.shard[1], out_dir)
    return CertifyRun(summary, records, run_dir, job.config)


def _join_score_parts(parts_dir: Path, dest: Path, meta: dict[str, Any], expect: int) -> None:
    parts = sorted(parts_dir.glob("*.safetensors"))
    if not parts and dest.is_file() and len(load_scores(dest).indices) == expect:
        shutil.rmtree(parts_dir, ignore_errors=True)  # joined already: interrupted before the summary
        return
    chunks = [load_tensors(p)[0] for p in parts]
    if chunks:
        s = torch.cat([c["scores"] for c in chunks])
        y = torch.cat([c["labels"] for c in chunks])
        i = torch.cat([c["indices"] for c in chunks])
    else:
        s, y, i = torch.zeros(0, 0, 0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if len(i) != expect or len(set(i.tolist())) != expect:
        raise PatchcertError(f"{parts_dir}: saved score maps do not cover the run ({len(i)} of {expect}); "
                             "rerun without --save-scores or start afresh")
    save_scores(dest, s, y, i, meta)
    shutil.rmtree(parts_dir)
