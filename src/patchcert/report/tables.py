"""The results table: one row per run x defense x patch (markdown / CSV), joined with attacks."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from .load import AttackRunData, CertifyRunData
from .stats import wilson_interval

log = logging.getLogger(__name__)


# -- tables ------------------------------------------------------------------------------

@dataclass
class ReportRow:
    """One row of the results table (a run x defense x patch)."""

    run: str
    model: str
    data: str
    defense: str
    patch: str
    resolved: str
    n: int
    clean_accuracy: float
    certified_accuracy: float
    robust_accuracy: float | None = None
    attack: str | None = None  # attack run name (+ setting)
    attack_n: int | None = None
    soundness_failures: int | None = None
    certify_seconds_per_image: float | None = None
    forward_seconds_per_image: float | None = None
    attack_seconds_per_image: float | None = None
    shapes: dict[str, float] | None = None
    # 95% Wilson score interval of the certified accuracy (report.stats.wilson_interval)
    certified_low: float | None = None
    certified_high: float | None = None

    def __post_init__(self) -> None:
        if self.certified_low is None and self.n > 0:
            self.certified_low, self.certified_high = wilson_interval(round(self.certified_accuracy * self.n), self.n)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _data_name(data: dict[str, Any]) -> str:
    return str(data.get("name") or data.get("dataset") or "?")


def report_rows(runs: Sequence[CertifyRunData], attacks: Sequence[AttackRunData] = ()) -> list[ReportRow]:
    """Rows for every run x defense x patch, joined with the first attack run on the same model,
    data, defense and patch; attack results matching no certify run get rows of their own."""
    rows: list[ReportRow] = []
    used: set[tuple[int, str, str]] = set()
    for run in runs:
        md = run.summary.metadata
        for r in run.summary.results:
            lo, hi = wilson_interval(r.num_certified, r.n) if r.n else (None, None)  # old summaries: no counts
            row = ReportRow(
                run=run.name, model=md.model, data=_data_name(md.data), defense=r.defense, patch=r.patch,
                resolved=r.resolved, n=run.summary.n, clean_accuracy=r.clean_accuracy,
                certified_accuracy=r.certified_accuracy, certify_seconds_per_image=r.certify_seconds_per_image,
                forward_seconds_per_image=md.forward_seconds_per_image, shapes=r.shapes,
                certified_low=lo, certified_high=hi,
            )
            for ai, att in enumerate(attacks):
                amd = att.summary["metadata"]
                if md.model_sha256 and amd.get("model_sha256") and md.model_sha256 != amd.get("model_sha256"):
                    continue
                if _data_name(amd.get("data") or {}) != row.data:
                    continue
                hit = next((a for a in att.summary["results"] if a["defense"] == r.defense and a["patch"] == r.patch), None)
                if hit is None:
                    continue
                used.add((ai, r.defense, r.patch))
                row.robust_accuracy = float(hit["robust_accuracy"])
                row.attack = att.name + (" (strong)" if (amd.get("attack") or {}).get("strong") else "")
                row.attack_n = int(att.summary["n"])
                row.soundness_failures = int(hit.get("soundness_failures", 0))
                row.attack_seconds_per_image = hit.get("attack_seconds_per_image")
                if row.attack_n != row.n:
                    log.warning("%s: attack run %s covers %d examples, the certify run %d; the robust accuracy "
                                "is over the attack's examples", run.name, att.name, row.attack_n, row.n)
                break
            rows.append(row)
    for ai, att in enumerate(attacks):
        amd = att.summary["metadata"]
        for a in att.summary["results"]:
            if (ai, a["defense"], a["patch"]) in used:
                continue
            rows.append(ReportRow(
                run=att.name, model=str(amd.get("model", "?")), data=_data_name(amd.get("data") or {}),
                defense=a["defense"], patch=a["patch"], resolved=str(a.get("resolved", a["patch"])),
                n=int(att.summary["n"]), clean_accuracy=float(a["clean_accuracy"]),
                certified_accuracy=float(a["certified_accuracy"]), robust_accuracy=float(a["robust_accuracy"]),
                attack=att.name + (" (strong)" if (amd.get("attack") or {}).get("strong") else ""),
                attack_n=int(att.summary["n"]), soundness_failures=int(a.get("soundness_failures", 0)),
                attack_seconds_per_image=a.get("attack_seconds_per_image"),
            ))
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{1000 * v:.3f}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def rows_to_markdown(rows: Sequence[ReportRow]) -> str:
    """A GitHub-flavoured markdown table (percentages; times in ms per image)."""
    has_att = any(r.robust_accuracy is not None for r in rows)
    cols = ["run", "model", "data", "defense", "patch", "n", "clean", "certified", "certified 95% CI"]
    if has_att:
        cols += ["robust (attack)", "attack", "soundness"]
    cols += ["certify ms/img", "forward ms/img"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in ("n", "clean", "certified", "robust (attack)",
                                                                          "certify ms/img", "forward ms/img") else "---"
                                                           for c in cols) + "|"]
    for r in rows:
        patch = r.patch if r.resolved in ("", r.patch) or len(r.resolved) > 24 else f"{r.patch} ({r.resolved})"
        ci = "" if r.certified_low is None else f"{100 * r.certified_low:.1f}-{100 * r.certified_high:.1f}%"
        cells = [r.run, r.model, r.data, r.defense, patch, str(r.n), _pct(r.clean_accuracy), _pct(r.certified_accuracy),
                 ci]
        if has_att:
            sf = "" if r.soundness_failures is None else ("ok" if r.soundness_failures == 0
                                                          else f"**{r.soundness_failures} FAILURES**")
            att = "" if r.attack is None else (r.attack + (f", n={r.attack_n}" if r.attack_n != r.n else ""))
            cells += [_pct(r.robust_accuracy), att, sf]
        cells += [_ms(r.certify_seconds_per_image), _ms(r.forward_seconds_per_image)]
        out.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


CSV_FIELDS = ["run", "model", "data", "defense", "patch", "resolved", "n", "clean_accuracy", "certified_accuracy",
              "robust_accuracy", "attack", "attack_n", "soundness_failures", "certify_seconds_per_image",
              "forward_seconds_per_image", "attack_seconds_per_image", "certified_low", "certified_high"]


def rows_to_csv(rows: Sequence[ReportRow]) -> str:
    """CSV with exact values (accuracies as fractions, times in seconds per image)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = r.to_json()
        w.writerow({k: ("" if d[k] is None else (repr(d[k]) if isinstance(d[k], float) else d[k])) for k in CSV_FIELDS})
    return buf.getvalue()
