"""Per-example records: :class:`ExampleRecord` (one line of ``records.jsonl``), its parts, the
flat table view, and durable append / read of a records file."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

from ..checkpoint import atomic_write_text
from ..errors import PatchcertError
from ..rundir import iter_jsonl, read_jsonl
from .files import RECORDS_FILE, _dumps, _finite_or_none


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


class _PerExample:
    """JSON of a per-example record (one line of a ``records.jsonl``): ``index``, ``label``,
    ``clean_pred`` and, by defense key, an outcome of the class's ``outcome`` type."""

    outcome: ClassVar[Any]
    index: int
    label: int
    clean_pred: int
    defenses: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"index": int(self.index), "label": int(self.label), "clean_pred": int(self.clean_pred),
                "defenses": {k: v.to_json() for k, v in self.defenses.items()}}

    def to_line(self) -> str:
        return _dumps(self.to_json())

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Any:
        return cls(int(d["index"]), int(d["label"]), int(d["clean_pred"]),  # type: ignore[call-arg]
                   {str(k): cls.outcome.from_json(v) for k, v in d["defenses"].items()})


@dataclass
class ExampleRecord(_PerExample):
    """Everything certified about one example (one line of ``records.jsonl``).

    ``index`` is the example's index in the dataset (or in the cached score file's
    ``indices``), ``clean_pred`` the undefended prediction: argmax over classes of the
    spatially averaged score map (ties to the lowest class).
    """

    outcome: ClassVar[Any] = DefenseOutcome
    index: int
    label: int
    clean_pred: int
    defenses: dict[str, DefenseOutcome]


TABLE_FIELDS = ["index", "label", "clean_pred", "defense", "patch", "pred", "correct", "certified", "margin",
                "worst_window", "worst_row", "worst_col", "worst_class", "worst_pair", "largest_square", "attacked",
                "success", "adv_pred", "target", "attack_pixel", "attack_steps", "soundness_failure"]


def records_table(records: Any, path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Per-example results as a flat table: one row (a dict of plain values) per example x
    defense x patch -- ``pandas.DataFrame(records_table(run))`` loads it as is.

    ``records``: certify records (:class:`ExampleRecord`), attack records
    (:class:`~patchcert.results.AttackRecord`) or either as JSON dicts, a ``CertifyRun`` / ``AttackRun`` (anything with ``.records``), or a
    run directory (its ``records.jsonl``). Columns: :data:`TABLE_FIELDS` (attack columns are
    None for certify records, the worst case's None for attack records). ``path``: also
    write the table as CSV."""
    if isinstance(records, (str, os.PathLike)):
        records = read_jsonl(Path(records) / RECORDS_FILE)
    records = getattr(records, "records", records)
    rows: list[dict[str, Any]] = []
    for r in records:
        d = r.to_json() if hasattr(r, "to_json") else r  # typed certify / attack records, or their JSON
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
    from .. import results  # the writer is looked up on the package: patchcert.results.append_jsonl

    results.append_jsonl(path, [r.to_line() for r in records])


def _record(path: Any, i: int, d: Mapping[str, Any], kind: Any = ExampleRecord, what: str = "record") -> Any:
    """Line ``i`` of a ``records.jsonl`` as a ``kind`` record (one-line error if malformed)."""
    try:
        return kind.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise PatchcertError(f"{path}: record {i + 1} is not a valid {what} ({type(e).__name__}: {e})") from None


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
