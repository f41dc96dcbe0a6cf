"""Summaries: :class:`ResultRow`, :class:`RunMetadata`, :class:`Summary`, the streaming
:class:`SummaryCounter`, and ``summary.json`` / ``summary.csv``."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..checkpoint import atomic_write_text
from ..errors import PatchcertError
from ..rundir import read_json, write_json
from .files import FORMAT_VERSION, SUMMARY_CSV, SUMMARY_FILE, _dumps, _finite_or_none
from .records import ExampleRecord


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
    # the certify step per image beyond the shared model pass; for a pixel defense (double masking)
    # including its own masked passes over the images (shared by that defense's patch rows)
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
    skipped: list[dict[str, Any]] = field(default_factory=list)  # unreadable images left out: {index, reason}
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
