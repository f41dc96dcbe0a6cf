"""Certification results: typed records, summaries, and the run-directory format.

A certify run directory (``patchcert certify --out RUN``) holds::

    config.json        what determines the records (model hash, data selection, defenses,
                       patches, dtype, batch size, square cap, shard); checked on --resume
    records.jsonl      one ExampleRecord per line, appended (flush + fsync) after every batch
    progress.json      {"done", "total", "complete", "timing"}: rewritten after every batch
    summary.json       written atomically, and only when every example is done
    summary.csv        one row per (defense, patch), written with summary.json
    scores.safetensors optional (--save-scores): the score maps, see ScoreFile

A run is complete iff ``summary.json`` exists and ``progress.json`` says ``complete``;
:func:`load_run` refuses anything else. Sharded runs (``--shard i/n`` or torchrun) write the
same files to ``RUN/shard-i-of-n/``; :func:`merge_shards` joins them into ``RUN/`` with records
byte-identical to a single run's.

One record (``records.jsonl`` line; PATCH is the patch spec as written, KEY the defense key)::

    {"index": 17, "label": 3, "clean_pred": 3,
     "defenses": {"voting(sign,3.2)": {
         "pred": 3, "correct": true,
         "certified": {"5x5": true},
         "worst": {"5x5": {"margin": 12.0, "window": [11, 11], "row": 4, "col": 0, "class": 5}},
         "largest_square": 7,
         "shapes": {"area=24": {"1x24": false, "2x12": true, ...}}}}}

``worst[PATCH]`` is the defense's ``certify_details`` worst case: the smallest margin over the
patch's windows, placements and competing classes (``> 0`` certified; ``== 0`` certified iff
``class > label``); ``window`` the feature window ``[wh, ww]``, ``row``/``col`` the top-left cell
of the placement on the score map (``-1`` when the worst case is not a placement: a window
larger than the map, or an image already misclassified), ``class`` the competing class (-1 if
none). A non-finite margin (``-inf``: not certifiable at all) is written as null. ``shapes`` is
present only for patch specs that allow several pixel rectangles (``area=A``) and says, per
rectangle, whether the image is certified against that rectangle alone. ``largest_square`` is
null when the run was made with ``square_cap=0``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .checkpoint import atomic_write_text, file_sha256, load_tensors, save_tensors
from .errors import PatchcertError
from .rundir import append_jsonl, hold, iter_jsonl, read_json, read_jsonl, write_json

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "RECORDS_FILE",
    "SUMMARY_FILE",
    "SUMMARY_CSV",
    "PROGRESS_FILE",
    "CONFIG_FILE",
    "SCORES_FILE",
    "TIMING_FIELDS",
    "WorstCase",
    "MaskPairCase",
    "DefenseOutcome",
    "ExampleRecord",
    "ResultRow",
    "SummaryCounter",
    "RunMetadata",
    "Summary",
    "ScoreFile",
    "load_scores",
    "save_scores",
    "records_to_jsonl",
    "records_table",
    "TABLE_FIELDS",
    "append_records",
    "read_records",
    "iter_records",
    "repair_records",
    "summarize",
    "square_curves",
    "write_summary",
    "read_summary",
    "read_json",
    "write_json",
    "run_status",
    "load_run",
    "shard_dirname",
    "find_shards",
    "merge_shards",
]

FORMAT_VERSION = 1
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.json"
SCORES_FILE = "scores.safetensors"

#: Fields that legitimately differ between two runs with identical records (wall-clock,
#: provenance of the invocation). Everything else in a summary is a function of the records.
TIMING_FIELDS = frozenset({
    "forward_seconds_per_image", "certify_seconds_per_image", "defense_seconds_per_image",
    "created", "command", "device", "shard", "merged_from", "versions",
})


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


# -- records -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WorstCase:
    """The worst placement for one patch threat: the smallest margin over every window shape,
    placement and competing class. ``margin > 0`` means certified (see certification.md for
    exact ties). ``window`` is the feature window ``(wh, ww)``; ``row``/``col`` its top-left cell
    on the score map; ``cls`` the competing class (-1 if none). JSON key of ``cls``: ``class``."""

    margin: float | None
    window: tuple[int, int]
    row: int
    col: int
    cls: int

    def to_json(self) -> dict[str, Any]:
        return {"margin": _finite_or_none(self.margin), "window": [int(self.window[0]), int(self.window[1])],
                "row": int(self.row), "col": int(self.col), "class": int(self.cls)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "WorstCase":
        w = d["window"]
        m = d.get("margin")
        return cls(None if m is None else float(m), (int(w[0]), int(w[1])), int(d["row"]), int(d["col"]),
                   int(d["class"]))


@dataclass(frozen=True)
class MaskPairCase:
    """Why double masking did not certify an image: ``pair`` = the first mask pair ``(i, j)``
    (``i == j``: one mask) whose prediction ``cls`` is not the label, in the certificate's
    order (the first round, then pairs ``i < j`` row-major); ``first_round``: some one-mask
    prediction already disagrees with the label; ``disagree``: the masks whose one-mask
    prediction disagrees. JSON: ``{"pair": [i, j], "class": c, "first_round": b, "disagree": [...]}``."""

    pair: tuple[int, int]
    cls: int
    first_round: bool
    disagree: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"pair": [int(self.pair[0]), int(self.pair[1])], "class": int(self.cls),
                "first_round": bool(self.first_round), "disagree": [int(m) for m in self.disagree]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "MaskPairCase":
        p = d["pair"]
        return cls((int(p[0]), int(p[1])), int(d["class"]), bool(d["first_round"]),
                   tuple(int(m) for m in d.get("disagree") or ()))


def _worst_from_json(d: Mapping[str, Any] | None) -> "WorstCase | MaskPairCase | None":
    if d is None:
        return None
    return MaskPairCase.from_json(d) if "pair" in d else WorstCase.from_json(d)


@dataclass
class DefenseOutcome:
    """One defense on one image: its prediction and, per patch spec, the certificate."""

    pred: int
    correct: bool
    certified: dict[str, bool]
    worst: dict[str, WorstCase | MaskPairCase | None]
    largest_square: int | None
    shapes: dict[str, dict[str, bool]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pred": int(self.pred),
            "correct": bool(self.correct),
            "certified": {k: bool(v) for k, v in self.certified.items()},
            "worst": {k: (None if v is None else v.to_json()) for k, v in self.worst.items()},
            "largest_square": None if self.largest_square is None else int(self.largest_square),
        }
        if self.shapes:
            d["shapes"] = {k: {s: bool(b) for s, b in v.items()} for k, v in self.shapes.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DefenseOutcome":
        ls = d.get("largest_square")
        return cls(
            pred=int(d["pred"]),
            correct=bool(d["correct"]),
            certified={str(k): bool(v) for k, v in d["certified"].items()},
            worst={str(k): _worst_from_json(v) for k, v in d.get("worst", {}).items()},
            largest_square=None if ls is None else int(ls),
            shapes={str(k): {str(s): bool(b) for s, b in v.items()} for k, v in (d.get("shapes") or {}).items()},
        )


@dataclass
class ExampleRecord:
    """Everything certified about one example (one line of ``records.jsonl``).

    ``index`` is the example's index in the dataset (or in the cached score file's
    ``indices``), ``clean_pred`` the undefended prediction: argmax over classes of the
    spatially averaged score map (ties to the lowest class).
    """

    index: int
    label: int
    clean_pred: int
    defenses: dict[str, DefenseOutcome]

    def to_json(self) -> dict[str, Any]:
        return {"index": int(self.index), "label": int(self.label), "clean_pred": int(self.clean_pred),
                "defenses": {k: v.to_json() for k, v in self.defenses.items()}}

    def to_line(self) -> str:
        return _dumps(self.to_json())

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExampleRecord":
        return cls(int(d["index"]), int(d["label"]), int(d["clean_pred"]),
                   {str(k): DefenseOutcome.from_json(v) for k, v in d["defenses"].items()})


TABLE_FIELDS = ["index", "label", "clean_pred", "defense", "patch", "pred", "correct", "certified", "margin",
                "worst_window", "worst_row", "worst_col", "worst_class", "worst_pair", "largest_square", "attacked", "success",
                "adv_pred", "target", "attack_pixel", "attack_steps", "soundness_failure"]


def records_table(records: Any, path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Per-example results as a flat table: one row (a dict of plain values) per example x
    defense x patch -- ``pandas.DataFrame(records_table(run))`` loads it as is.

    ``records``: certify records (:class:`ExampleRecord`), attack records (dicts from
    ``records.jsonl``), a ``CertifyRun`` / ``AttackRun`` (anything with ``.records``), or a
    run directory (its ``records.jsonl``). Columns: :data:`TABLE_FIELDS` (attack columns are
    None for certify records, the worst case's None for attack records). ``path``: also
    write the table as CSV."""
    if isinstance(records, (str, os.PathLike)):
        records = read_jsonl(Path(records) / RECORDS_FILE)
    records = getattr(records, "records", records)
    rows: list[dict[str, Any]] = []
    for r in records:
        d = r.to_json() if isinstance(r, ExampleRecord) else r
        for key, o in d["defenses"].items():
            for patch, cert in o["certified"].items():
                w = (o.get("worst") or {}).get(patch)
                a = (o.get("attack") or {}).get(patch)
                rows.append({
                    "index": d["index"], "label": d["label"], "clean_pred": d["clean_pred"], "defense": key,
                    "patch": patch, "pred": o["pred"], "correct": o["correct"], "certified": cert,
                    "margin": None if w is None else w.get("margin"),
                    "worst_window": None if w is None or "window" not in w else "x".join(map(str, w["window"])),
                    "worst_row": None if w is None else w.get("row"), "worst_col": None if w is None else w.get("col"),
                    "worst_pair": None if w is None or "pair" not in w else "x".join(map(str, w["pair"])),
                    "worst_class": None if w is None else w["class"], "largest_square": o.get("largest_square"),
                    "attacked": None if a is None else a.get("attacked"),
                    "success": None if a is None else a.get("success"),
                    "adv_pred": None if a is None else a.get("adv_pred"),
                    "target": None if a is None else a.get("target"),
                    "attack_pixel": None if a is None or a.get("pixel") is None else "x".join(map(str, a["pixel"])),
                    "attack_steps": None if a is None else a.get("steps"),
                    "soundness_failure": None if a is None else a.get("soundness_failure"),
                })
    if path is not None:
        buf = io.StringIO()
        w_ = csv.DictWriter(buf, fieldnames=TABLE_FIELDS, lineterminator="\n")
        w_.writeheader()
        w_.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return rows


def records_to_jsonl(records: Iterable[ExampleRecord]) -> str:
    return "".join(r.to_line() + "\n" for r in records)


def append_records(path: str | os.PathLike, records: Sequence[ExampleRecord]) -> None:
    """Append records to a JSONL file durably (one write, flush, fsync)."""
    append_jsonl(path, [r.to_line() for r in records])


def _record(path: str | os.PathLike, i: int, d: dict[str, Any]) -> ExampleRecord:
    try:
        return ExampleRecord.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PatchcertError(f"{path}: record {i + 1} is not a valid record ({type(e).__name__}: {e})") from None


def _records(path: str | os.PathLike, objs: list[dict[str, Any]]) -> list[ExampleRecord]:
    return [_record(path, i, d) for i, d in enumerate(objs)]


def iter_records(path: str | os.PathLike) -> Iterator[ExampleRecord]:
    """The records of a finished ``records.jsonl``, one at a time (memory independent of its length)."""
    for i, d in enumerate(iter_jsonl(path)):
        yield _record(path, i, d)


def read_records(path: str | os.PathLike, allow_partial_tail: bool = False) -> list[ExampleRecord]:
    """All records of a ``records.jsonl``. An unfinished last line (an interrupted write) is an
    error unless ``allow_partial_tail``, in which case it is dropped."""
    return _records(path, read_jsonl(path, "drop" if allow_partial_tail else "error"))


def repair_records(path: str | os.PathLike) -> list[ExampleRecord]:
    """Drop an unfinished last line in place (truncate) and return the complete records."""
    return _records(path, read_jsonl(path, "repair"))


# -- summaries ---------------------------------------------------------------------------

@dataclass
class ResultRow:
    """One (defense, patch) result of a run (one row of ``summary.csv``)."""

    defense: str
    defense_config: dict[str, Any]
    patch: str
    resolved: str
    windows: list[list[int]]
    clean_accuracy: float
    certified_accuracy: float
    certify_seconds_per_image: float | None
    n: int = 0
    num_correct: int = 0
    num_certified: int = 0
    shapes: dict[str, float] | None = None  # per pixel rectangle: certified accuracy (area=A specs)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["certify_seconds_per_image"] = _finite_or_none(self.certify_seconds_per_image)
        if self.shapes is None:
            del d["shapes"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ResultRow":
        return cls(
            defense=str(d["defense"]), defense_config=dict(d.get("defense_config") or {}), patch=str(d["patch"]),
            resolved=str(d.get("resolved", "")), windows=[list(map(int, w)) for w in d.get("windows", [])],
            clean_accuracy=float(d["clean_accuracy"]), certified_accuracy=float(d["certified_accuracy"]),
            certify_seconds_per_image=_finite_or_none(d.get("certify_seconds_per_image")),
            n=int(d.get("n", 0)), num_correct=int(d.get("num_correct", 0)),
            num_certified=int(d.get("num_certified", 0)),
            shapes=None if d.get("shapes") is None else {str(k): float(v) for k, v in d["shapes"].items()},
        )


@dataclass
class RunMetadata:
    """Provenance of a run. ``model_sha256`` is the checkpoint file's SHA-256, or (for a model
    built in memory) the SHA-256 of its state dict (``model_hash_of`` says which)."""

    model: str
    model_sha256: str | None
    checkpoint: str | None
    data: dict[str, Any]
    num_examples: int
    seed: int | None
    device: str
    dtype: str
    versions: dict[str, str]
    forward_seconds_per_image: float | None
    geometry: dict[str, Any]
    image_size: list[int]
    command: str
    model_hash_of: str = "file"
    model_config: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    map_size: list[int] = field(default_factory=list)
    scores_file: str | None = None
    scores_sha256: str | None = None
    start: int = 0
    indices: list[int] = field(default_factory=list)  # [first, last] dataset index of the selection
    batch_size: int = 0
    square_cap: int = 0
    shard: list[int] | None = None
    merged_from: int | None = None
    defense_seconds_per_image: dict[str, dict[str, float | None]] = field(default_factory=dict)
    created: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["forward_seconds_per_image"] = _finite_or_none(self.forward_seconds_per_image)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunMetadata":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Summary:
    """``summary.json``: accuracies per (defense, patch) plus metadata.

    ``undefended_accuracy``: accuracy of ``clean_pred``. ``square_curves[KEY]`` is the
    certified accuracy against an s x s patch for s = 1..cap (from ``largest_square``; exact
    for defenses whose certificate is monotone in the window, as all shipped ones are).
    """

    n: int
    results: list[ResultRow]
    metadata: RunMetadata
    undefended_accuracy: float = 0.0
    square_curves: dict[str, list[float]] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "results": [r.to_json() for r in self.results], "metadata": self.metadata.to_json(),
                "undefended_accuracy": self.undefended_accuracy, "square_curves": self.square_curves,
                "format": self.format}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Summary":
        return cls(int(d["n"]), [ResultRow.from_json(r) for r in d["results"]], RunMetadata.from_json(d["metadata"]),
                   float(d.get("undefended_accuracy", 0.0)),
                   {str(k): [float(x) for x in v] for k, v in (d.get("square_curves") or {}).items()},
                   int(d.get("format", FORMAT_VERSION)))

    def short(self) -> dict[str, Any]:
        """The ``--json`` contract: ``{"n", "results": [{defense, patch, clean_accuracy, certified_accuracy}]}``."""
        return {"n": self.n, "results": [
            {"defense": r.defense, "patch": r.patch, "clean_accuracy": r.clean_accuracy,
             "certified_accuracy": r.certified_accuracy} for r in self.results]}


class SummaryCounter:
    """The counts behind a :class:`Summary`, fed records batch by batch: its memory does not
    grow with the number of examples (a long ``certify`` keeps no records, only these counts).

    ``template``: the (defense, patch) rows to count (their non-accuracy fields, e.g. resolved
    windows and timing, are kept); ``keys``: the defenses whose largest certified squares are
    counted (default: the template's).
    """

    def __init__(self, template: Sequence[ResultRow], keys: Sequence[str] | None = None) -> None:
        self.template = list(template)
        self.keys = list(dict.fromkeys(t.defense for t in self.template)) if keys is None else list(keys)
        self.n = 0
        self.undefended = 0
        self.correct = [0] * len(self.template)
        self.certified = [0] * len(self.template)
        self.shapes: list[dict[str, int]] = [{} for _ in self.template]
        self.sides: dict[str, dict[int, int]] = {k: {} for k in self.keys}  # largest square side -> count
        self.searched: set[str] = set()  # defenses with a largest square in some record
        self.first_index: int | None = None
        self.last_index: int | None = None

    def add(self, records: Iterable[ExampleRecord]) -> "SummaryCounter":
        for r in records:
            for j, t in enumerate(self.template):
                o = r.defenses.get(t.defense)
                if o is None or t.patch not in o.certified:
                    raise PatchcertError(f"record {r.index} has no result for {t.defense} / {t.patch!r}")
                self.correct[j] += bool(o.correct)
                self.certified[j] += bool(o.certified[t.patch])
                for sh, b in (o.shapes.get(t.patch) or {}).items():
                    self.shapes[j][sh] = self.shapes[j].get(sh, 0) + bool(b)
            for k in self.keys:
                side = r.defenses[k].largest_square
                if side is not None:
                    self.searched.add(k)
                self.sides[k][side or 0] = self.sides[k].get(side or 0, 0) + 1
            self.undefended += r.clean_pred == r.label
            if self.first_index is None:
                self.first_index = r.index
            self.last_index = r.index
            self.n += 1
        return self

    def square_curves(self, cap: int) -> dict[str, list[float]]:
        """Certified accuracy against an s x s patch, s = 1..cap, per defense key (empty for a
        defense whose records hold no largest square: not searched)."""
        n = self.n
        if cap < 1 or n == 0:
            return {k: [] for k in self.keys}
        out: dict[str, list[float]] = {}
        for k in self.keys:
            if k not in self.searched:
                out[k] = []
                continue
            hist = self.sides[k]
            at_least = sum(c for side, c in hist.items() if side > cap)  # images certified at side >= s
            curve = []
            for s in range(cap, 0, -1):
                at_least += hist.get(s, 0)
                curve.append(at_least / n)
            out[k] = curve[::-1]
        return out

    def summary(self, metadata: RunMetadata, square_cap: int | None = None,
                template: Sequence[ResultRow] | None = None) -> Summary:
        """The summary of the records counted so far. ``template``: rows to fill instead of the
        counter's own (the same defenses and patches in the same order, e.g. with timing known
        only at the end)."""
        n = self.n
        if template is None:
            template = self.template
        elif [(t.defense, t.patch) for t in template] != [(t.defense, t.patch) for t in self.template]:
            raise ValueError("template rows differ from the counted ones")
        rows = []
        for j, t in enumerate(template):
            rows.append(ResultRow(
                defense=t.defense, defense_config=t.defense_config, patch=t.patch, resolved=t.resolved,
                windows=t.windows, clean_accuracy=self.correct[j] / n if n else 0.0,
                certified_accuracy=self.certified[j] / n if n else 0.0,
                certify_seconds_per_image=t.certify_seconds_per_image, n=n, num_correct=self.correct[j],
                num_certified=self.certified[j],
                shapes={sh: c / n for sh, c in self.shapes[j].items()} if self.shapes[j] else None,
            ))
        cap = metadata.square_cap if square_cap is None else square_cap
        return Summary(n=n, results=rows, metadata=metadata, undefended_accuracy=self.undefended / n if n else 0.0,
                       square_curves=self.square_curves(cap))


def square_curves(records: Sequence[ExampleRecord], keys: Sequence[str], cap: int) -> dict[str, list[float]]:
    """Certified accuracy against an s x s patch, s = 1..cap, per defense key."""
    return SummaryCounter([], keys).add(records).square_curves(cap)


def summarize(records: Iterable[ExampleRecord], template: Sequence[ResultRow], metadata: RunMetadata,
              square_cap: int | None = None) -> Summary:
    """Accuracies of ``records`` for every (defense, patch) row of ``template`` (whose
    non-accuracy fields, e.g. resolved windows and timing, are kept)."""
    return SummaryCounter(template).add(records).summary(metadata, square_cap)


# -- JSON / CSV files --------------------------------------------------------------------

_CSV_FIELDS = ["defense", "patch", "resolved", "clean_accuracy", "certified_accuracy", "n", "num_correct",
               "num_certified", "certify_seconds_per_image", "windows", "defense_config", "shapes"]


def write_summary(run_dir: str | os.PathLike, summary: Summary) -> None:
    """``summary.csv`` then ``summary.json`` (each atomic; the JSON marks completion)."""
    d = Path(run_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in summary.results:
        w.writerow({
            "defense": r.defense, "patch": r.patch, "resolved": r.resolved,
            "clean_accuracy": repr(r.clean_accuracy), "certified_accuracy": repr(r.certified_accuracy),
            "n": r.n, "num_correct": r.num_correct, "num_certified": r.num_certified,
            "certify_seconds_per_image": "" if r.certify_seconds_per_image is None else f"{r.certify_seconds_per_image:.6g}",
            "windows": ";".join(f"{a}x{b}" for a, b in r.windows),
            "defense_config": _dumps(r.defense_config),
            "shapes": "" if r.shapes is None else _dumps(r.shapes),
        })
    atomic_write_text(d / SUMMARY_CSV, buf.getvalue())
    write_json(d / SUMMARY_FILE, summary.to_json())


def read_summary(run_dir: str | os.PathLike) -> Summary:
    p = Path(run_dir) / SUMMARY_FILE
    d = read_json(p)
    try:
        return Summary.from_json(d)
    except (KeyError, TypeError, ValueError) as e:
        raise PatchcertError(f"{p}: not a patchcert summary ({type(e).__name__}: {e})") from None


# -- cached score maps -------------------------------------------------------------------

@dataclass
class ScoreFile:
    """Cached score maps: ``scores`` float32 ``[N, K, H, W]``, ``labels`` int64 ``[N]``,
    ``indices`` int64 ``[N]`` (dataset indices) and metadata (``geometry``, ``image_size``,
    ``model``, ``model_sha256``, ``classes``, ``data``, ...)."""

    scores: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    meta: dict[str, Any]
    path: str | None = None
    sha256: str | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def save_scores(path: str | os.PathLike, scores: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                meta: Mapping[str, Any]) -> None:
    """Atomically write a score file (scores stored as float32, as the model produced them)."""
    save_tensors(path, {"scores": scores.to(torch.float32), "labels": labels.to(torch.int64),
                        "indices": indices.to(torch.int64)}, dict(meta))


def load_scores(path: str | os.PathLike) -> ScoreFile:
    """Read and validate a score file (``--scores FILE``)."""
    p = Path(path)
    if not p.is_file():
        raise PatchcertError(f"score file {str(p)!r} does not exist")
    try:
        tensors, meta = load_tensors(p)
    except PatchcertError as e:
        raise PatchcertError(f"score file: {e}") from None
    missing = [k for k in ("scores", "labels", "indices") if k not in tensors]
    if missing:
        raise PatchcertError(f"{p}: score file lacks tensor(s) {', '.join(missing)}")
    s, y, idx = tensors["scores"], tensors["labels"], tensors["indices"]
    if s.dim() != 4 or not s.is_floating_point():
        raise PatchcertError(f"{p}: 'scores' must be a float tensor [N, K, H, W], got {s.dtype} {tuple(s.shape)}")
    n, k = s.shape[0], s.shape[1]
    if y.shape != (n,) or idx.shape != (n,) or y.dtype != torch.int64 or idx.dtype != torch.int64:
        raise PatchcertError(f"{p}: 'labels' and 'indices' must be int64 [{n}]")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise PatchcertError(f"{p}: labels outside 0..{k - 1} for {k}-class scores")
    classes = meta.get("classes")
    if classes is not None and len(classes) != k:
        raise PatchcertError(f"{p}: {k}-class scores but the metadata lists {len(classes)} classes")
    for key in ("geometry", "image_size"):
        if key not in meta:
            raise PatchcertError(f"{p}: score file metadata lacks {key!r}")
    if n and len(set(idx.tolist())) != n:
        raise PatchcertError(f"{p}: duplicate example indices")
    return ScoreFile(s, y, idx, meta, str(p), file_sha256(p))


# -- run directories ---------------------------------------------------------------------

_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_dirname(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}"


def find_shards(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Shard sub-directories ``shard-i-of-n`` of a run (all of one ``n``), by ``i``."""
    d = Path(run_dir)
    found: dict[int, dict[int, Path]] = {}
    if d.is_dir():
        for c in d.iterdir():
            m = _SHARD_RE.match(c.name)
            if m and c.is_dir():
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = c
    if len(found) > 1:
        raise PatchcertError(f"{d}: shards of different splits ({', '.join(f'n={k}' for k in sorted(found))})")
    if not found:
        return {}
    n, shards = next(iter(found.items()))
    missing = [i for i in range(n) if i not in shards]
    if missing:
        raise PatchcertError(f"{d}: shard(s) {', '.join(map(str, missing))} of {n} are missing")
    return dict(sorted(shards.items()))


def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"complete": bool, "done": int, "total": int | None, "shards": {i: status} | None}``."""
    d = Path(run_dir)
    prog_p, sum_p = d / PROGRESS_FILE, d / SUMMARY_FILE
    prog = read_json(prog_p) if prog_p.is_file() else {}
    # summary.json is written last, after every record: with no progress.json (a hand-made or
    # copied run) it alone says the run is finished
    complete = sum_p.is_file() and bool(prog.get("complete", True) if not prog_p.is_file() else prog.get("complete"))
    st: dict[str, Any] = {"complete": complete, "done": int(prog.get("done", 0)), "total": prog.get("total"),
                          "shards": None}
    if not complete and not sum_p.is_file() and not prog:
        shards = find_shards(d) if d.is_dir() else {}
        if shards:
            st["shards"] = {i: run_status(p) for i, p in shards.items()}
            st["done"] = sum(s["done"] for s in st["shards"].values())
            tot = [s["total"] for s in st["shards"].values()]
            st["total"] = None if any(t is None for t in tot) else sum(tot)
    return st


def load_run(run_dir: str | os.PathLike, require_complete: bool = True) -> tuple[Summary, list[ExampleRecord]]:
    """Summary and records of a finished run; a clear error for an unfinished or unmerged one."""
    d = Path(run_dir)
    if not d.is_dir():
        raise PatchcertError(f"run directory {str(d)!r} does not exist")
    st = run_status(d)
    if not st["complete"] and require_complete:
        if st["shards"]:
            if all(s["complete"] for s in st["shards"].values()):
                raise PatchcertError(f"{d} holds finished shards that are not merged: run patchcert certify --merge {d}")
            todo = [str(i) for i, s in st["shards"].items() if not s["complete"]]
            raise PatchcertError(f"{d} is incomplete: shard(s) {', '.join(todo)} unfinished "
                                 f"({st['done']}/{st['total']} examples)")
        if not (d / RECORDS_FILE).exists() and not (d / PROGRESS_FILE).exists():
            raise PatchcertError(f"{d} is not a patchcert certify run (no records.jsonl)")
        raise PatchcertError(f"{d} is incomplete ({st['done']}/{st['total']} examples): "
                             f"finish it with patchcert certify --resume --out {d} (same options)")
    summary = read_summary(d)
    records = read_records(d / RECORDS_FILE)
    if len(records) != summary.n:
        raise PatchcertError(f"{d}: summary says {summary.n} examples but records.jsonl holds {len(records)}")
    return summary, records


def _comparable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("shard",)}


def merge_shards(run_dir: str | os.PathLike, write: bool = True,
                 keep_records: bool = True) -> tuple[Summary, list[ExampleRecord]]:
    """Join ``RUN/shard-i-of-n/`` into ``RUN/records.jsonl`` + ``summary.json`` (+ csv, progress,
    config, and ``scores.safetensors`` when every shard saved scores).

    Every shard must be complete and made with the same configuration (apart from the shard).
    The merged records are those of a single run (same order, same bytes): shard i holds the
    i-th contiguous block of the run's batches, so the shards are joined in shard order (a
    score file's indices need not be sorted). Timing is the per-image average over all shards.
    Records are read one at a time and counted as they are written; ``keep_records=False``
    returns none (``[]``), so memory does not grow with the run (the CLI merges this way).
    ``write=False``: merge in memory only (for reports on unmerged runs).
    """
    d = Path(run_dir)
    if not write:
        return _merge(d, None, keep_records)[:2]
    with hold(d, "exclusive", option="run folder", clean=False):  # no shard may be running
        fd, tmp_name = tempfile.mkstemp(dir=d, prefix=f".{RECORDS_FILE}.", suffix=".merging")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                summary, records, shards, configs = _merge(d, out, keep_records)
                out.flush()
                os.fsync(out.fileno())
            _write_merged(d, shards, configs, summary, tmp)
        finally:
            tmp.unlink(missing_ok=True)
    return summary, records


def _merge(d: Path, out: Any, keep_records: bool):
    """Merge the shards of ``d``: ``(summary, records, shards, configs)``; each record's line is
    written to the text file ``out`` (if given) as it is read."""
    shards = find_shards(d)
    if not shards:
        raise PatchcertError(f"{d}: no shard directories (shard-i-of-n) to merge")
    n_sh = len(shards)
    configs, summaries = [], []
    for i, p in shards.items():
        st = run_status(p)
        if not st["complete"]:
            raise PatchcertError(f"cannot merge {d}: shard {i}/{n_sh} is incomplete ({st['done']}/{st['total']} "
                                 f"examples); finish it with --resume")
        # config.json says exactly what the records depend on; a run copied without it is
        # compared by its summary (model, dtype, defenses and patches) below
        configs.append(read_json(p / CONFIG_FILE) if (p / CONFIG_FILE).is_file() else {})
        summaries.append(read_summary(p))
    base = _comparable_config(configs[0])
    for i, c in enumerate(configs[1:], 1):
        if _comparable_config(c) != base:
            diff = sorted(k for k in set(base) | set(c) if base.get(k) != c.get(k) and k != "shard")
            raise PatchcertError(f"cannot merge {d}: shard {i} was made with different options ({', '.join(diff)})")
    sig = [([(r.defense, r.patch) for r in s.results], s.metadata.model_sha256, s.metadata.dtype) for s in summaries]
    for i, g in enumerate(sig[1:], 1):
        if g != sig[0]:
            raise PatchcertError(f"cannot merge {d}: shard {i} was made with a different model, dtype, defenses or "
                                 "patches")

    # timing: per-image averages weighted by shard size
    def wavg(vals: list[tuple[float | None, int]]) -> float | None:
        vs = [(v, k) for v, k in vals if v is not None]
        tot = sum(k for _, k in vs)
        return sum(v * k for v, k in vs) / tot if vs and tot else None

    s0 = summaries[0]
    template = []
    for j, r in enumerate(s0.results):
        t = ResultRow.from_json(r.to_json())
        t.certify_seconds_per_image = wavg([(s.results[j].certify_seconds_per_image, s.n) for s in summaries])
        template.append(t)

    counter = SummaryCounter(template)
    seen: set[int] = set()
    records: list[ExampleRecord] = []
    for i, p in shards.items():
        n_before = counter.n
        for rec in iter_records(p / RECORDS_FILE):
            if rec.index in seen:
                raise PatchcertError(f"cannot merge {d}: shards overlap (example {rec.index} is in more than one)")
            seen.add(rec.index)
            counter.add((rec,))
            if out is not None:
                out.write(rec.to_line() + "\n")
            if keep_records:
                records.append(rec)
        if counter.n - n_before != summaries[i].n:
            raise PatchcertError(f"cannot merge {d}: shard {i} says {summaries[i].n} examples but its "
                                 f"records.jsonl holds {counter.n - n_before}")
    total = configs[0].get("total")
    if total is not None and counter.n != int(total):
        raise PatchcertError(f"cannot merge {d}: shards hold {counter.n} examples, the run selects {total}")

    md = RunMetadata.from_json(s0.metadata.to_json())
    md.shard = None
    md.merged_from = n_sh
    md.num_examples = counter.n
    md.forward_seconds_per_image = wavg([(s.metadata.forward_seconds_per_image, s.n) for s in summaries])
    md.indices = [counter.first_index, counter.last_index] if counter.n else []
    dsp: dict[str, dict[str, float | None]] = {}
    for key, parts in s0.metadata.defense_seconds_per_image.items():
        dsp[key] = {part: wavg([(s.metadata.defense_seconds_per_image.get(key, {}).get(part), s.n) for s in summaries])
                    for part in parts}
    md.defense_seconds_per_image = dsp
    return counter.summary(md), records, shards, configs


def _write_merged(d: Path, shards: dict[int, Path], configs: list[dict[str, Any]], summary: Summary,
                  records_tmp: Path) -> None:
    from datetime import datetime, timezone

    n_sh = len(shards)
    summary.metadata.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for f in (SUMMARY_FILE, PROGRESS_FILE):
        (d / f).unlink(missing_ok=True)  # incomplete until the end
    os.chmod(records_tmp, 0o644)
    os.replace(records_tmp, d / RECORDS_FILE)
    cfg = dict(configs[0])
    cfg["shard"] = None
    write_json(d / CONFIG_FILE, cfg)
    parts = [p / SCORES_FILE for p in shards.values()]
    if all(p.is_file() for p in parts):
        sfs = [load_scores(p) for p in parts]  # shard order is the single run's order
        meta = dict(sfs[0].meta)
        meta.pop("shard", None)
        save_scores(d / SCORES_FILE, torch.cat([s.scores for s in sfs]), torch.cat([s.labels for s in sfs]),
                    torch.cat([s.indices for s in sfs]), meta)
    elif any(p.is_file() for p in parts):
        log.warning("only some shards saved scores; %s/%s not written", d, SCORES_FILE)
    write_summary(d, summary)
    write_json(d / PROGRESS_FILE, {"done": summary.n, "total": summary.n, "complete": True,
                                   "merged_from": n_sh})
