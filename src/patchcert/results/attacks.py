"""Attack records: :class:`AttackRecord` (one line of an attack run's ``records.jsonl``), its
parts, and :class:`AttackCounter`, the attack summary counted record by record (memory
independent of the number of examples, as :class:`~patchcert.results.SummaryCounter` is for
certify runs).

One record::

    {"index": 7, "label": 3, "clean_pred": 3,
     "defenses": {"voting(sign,3.2)": {"pred": 3, "correct": true,
         "certified": {"5x5": false},
         "attack": {"5x5": {"attacked": true, "success": true, "adv_pred": 5, "target": 5,
                            "pixel": [12, 3], "patch": [5, 5], "steps": 41, "attempts": 2,
                            "soundness_failure": false, "window": [...], ...}}}}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from ..errors import PatchcertError
from .records import _PerExample, _record

__all__ = ["AttackOutcome", "AttackDefenseOutcome", "AttackRecord", "AttackCounter", "attack_record"]

# score-map attacks also report where the patch went on the map and the margins they reached
_EXTRA = ("window", "cell", "predicted_margin", "soft_margin", "outside_change")


def _pair(v: Any) -> tuple[int, int] | None:
    return None if v is None else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class AttackOutcome:
    """The attack on one example under one defense and patch threat.

    ``attacked``: the defense classified the example correctly, so it was attacked;
    ``success``: a patch changed the defense's prediction (``adv_pred``; ``target``: the class
    aimed at, if any); ``pixel`` / ``patch``: the successful (else last tried) placement
    ``(row, col)`` and shape ``(h, w)``; ``soundness_failure``: certified, yet broken.
    ``extra``: what the score-map attack adds (feature ``window`` and ``cell``, the
    ``predicted_margin`` / ``soft_margin`` it reached, ``outside_change``)."""

    attacked: bool
    success: bool
    adv_pred: int
    target: int | None
    pixel: tuple[int, int] | None
    patch: tuple[int, int] | None
    steps: int
    attempts: int
    soundness_failure: bool
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "attacked": bool(self.attacked), "success": bool(self.success), "adv_pred": int(self.adv_pred),
            "patch": None if self.patch is None else list(self.patch),
            "pixel": None if self.pixel is None else list(self.pixel),
            "target": None if self.target is None else int(self.target),
            "attempts": int(self.attempts), "steps": int(self.steps),
        }
        d.update({k: self.extra[k] for k in _EXTRA if k in self.extra})
        d["soundness_failure"] = bool(self.soundness_failure)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AttackOutcome":
        t = d.get("target")
        return cls(bool(d["attacked"]), bool(d["success"]), int(d["adv_pred"]), None if t is None else int(t),
                   _pair(d.get("pixel")), _pair(d.get("patch")), int(d["steps"]), int(d.get("attempts", 0)),
                   bool(d["soundness_failure"]), {k: d[k] for k in _EXTRA if k in d})


@dataclass
class AttackDefenseOutcome:
    """One defense on one attacked example: its clean prediction and, per patch spec, the
    certificate and the attack."""

    pred: int
    correct: bool
    certified: dict[str, bool]
    attack: dict[str, AttackOutcome]

    def to_json(self) -> dict[str, Any]:
        return {"pred": int(self.pred), "correct": bool(self.correct),
                "certified": {k: bool(v) for k, v in self.certified.items()},
                "attack": {k: v.to_json() for k, v in self.attack.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AttackDefenseOutcome":
        return cls(int(d["pred"]), bool(d["correct"]), {str(k): bool(v) for k, v in d["certified"].items()},
                   {str(k): AttackOutcome.from_json(v) for k, v in d["attack"].items()})


@dataclass
class AttackRecord(_PerExample):
    """Everything an attack run learnt about one example (one line of its ``records.jsonl``);
    ``clean_pred``: the undefended prediction."""

    outcome: ClassVar[Any] = AttackDefenseOutcome
    index: int
    label: int
    clean_pred: int
    defenses: dict[str, AttackDefenseOutcome]


def attack_record(path: Any, i: int, d: Mapping[str, Any]) -> AttackRecord:
    """Line ``i`` of an attack ``records.jsonl`` as a record (one-line error if malformed)."""
    return _record(path, i, d, AttackRecord, "attack record")


class AttackCounter:
    """The counts behind an attack summary, fed records batch by batch.

    ``rows``: the ``(defense key, patch text)`` pairs to count, in the summary's order. The
    summary's accuracies are fractions of the ``n`` records counted; ``attack_success_rate``
    is over the correctly classified (attacked) examples; ``soundness_failure_indices`` keeps
    the first 100."""

    def __init__(self, rows: Sequence[tuple[str, str]]) -> None:
        self.rows = list(rows)
        self.n = 0
        z = [0] * len(self.rows)
        self.correct, self.certified, self.robust, self.broken, self.steps = list(z), list(z), list(z), list(z), list(z)
        self.failures: list[list[int]] = [[] for _ in self.rows]
        self.num_failures = list(z)

    def add(self, records: Iterable[AttackRecord]) -> "AttackCounter":
        for r in records:
            for j, (key, patch) in enumerate(self.rows):
                o = r.defenses.get(key)
                if o is None or patch not in o.attack or patch not in o.certified:
                    raise PatchcertError(f"attack record {r.index} has no result for {key} / {patch!r}")
                a = o.attack[patch]
                self.correct[j] += o.correct
                self.certified[j] += o.certified[patch]
                self.robust[j] += o.correct and not a.success
                self.broken[j] += a.attacked and a.success
                self.steps[j] += a.steps
                if a.soundness_failure:
                    self.num_failures[j] += 1
                    if len(self.failures[j]) < 100:
                        self.failures[j].append(r.index)
            self.n += 1
        return self

    def results(self, extra: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The summary's rows; ``extra[j]``: row j's fields that are not counts (``resolved``,
        ``defense_config``, ``attack_seconds_per_image``)."""
        n = self.n
        out = []
        for j, (key, patch) in enumerate(self.rows):
            c = self.correct[j]
            out.append({
                "defense": key, "patch": patch, "resolved": extra[j].get("resolved"),
                "clean_accuracy": c / n if n else 0.0, "certified_accuracy": self.certified[j] / n if n else 0.0,
                "robust_accuracy": self.robust[j] / n if n else 0.0,
                "attack_success_rate": self.broken[j] / c if c else None,
                "soundness_failures": self.num_failures[j], "soundness_failure_indices": list(self.failures[j]),
                "n": n, "num_correct": c, "num_certified": self.certified[j], "num_robust": self.robust[j],
                "mean_steps": self.steps[j] / n if n else 0.0,
                "attack_seconds_per_image": extra[j].get("attack_seconds_per_image"),
                "defense_config": extra[j].get("defense_config"),
            })
        return out
