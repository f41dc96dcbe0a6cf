"""Tables and plots from certify (and attack) runs: the analysis step, apart from the runs.

Inputs are run directories written by ``patchcert certify --out RUN`` (``records.jsonl`` +
``summary.json``, see :mod:`patchcert.results`), possibly split into ``RUN/shard-i-of-n/``
(merged here in memory; nothing is written into a run), and optionally attack runs written by
``patchcert attack --out DIR`` (for the empirical robust accuracy). Outputs:

* ``results.md`` / ``results.csv`` -- one row per run x defense x patch: clean, certified and
  (with an attack run) robust accuracy, certification and forward seconds per image;
* ``certified_vs_square_patch.png`` -- certified accuracy against an s x s patch as a
  function of s, from the records' ``largest_square`` (BagCert Fig. 3);
* ``certified_vs_aspect_ratio.png`` -- certified accuracy against rectangles of one area as a
  function of their shape (BagCert Fig. 4), from ``--patch area=A`` results (per-rectangle
  certificates in the records) or from explicit rectangles ``--patch 1x24 --patch 2x12 ...``;
* ``clean_vs_certified.png`` -- clean vs certified accuracy across runs and defenses (Fig. 2);
* ``accuracy_bounds.png`` -- clean / robust (attack, upper bound) / certified (lower bound);
* ``vulnerability_<run>_<index>.png`` -- image, region scores of the true class and the
  worst-case margin over patch placements, worst placement outlined (Fig. 6); needs the run's
  ``scores.safetensors`` (``patchcert certify --save-scores``) and, for the image, the data.

Plots use matplotlib's Agg backend; the library never prints (it logs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import PatchcertError
from .results import (
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    ExampleRecord,
    ResultRow,
    RunMetadata,
    Summary,
    find_shards,
    read_json,
    read_records,
    read_summary,
    summarize,
)

log = logging.getLogger(__name__)

__all__ = [
    "CertifyRunData",
    "AttackRunData",
    "ReportRow",
    "ReportOutput",
    "load_certify_run",
    "load_attack_run",
    "report_rows",
    "rows_to_markdown",
    "rows_to_csv",
    "square_curve",
    "aspect_series",
    "plot_square_sizes",
    "plot_aspect_ratios",
    "plot_clean_vs_certified",
    "plot_bounds",
    "plot_vulnerability",
    "region_scores",
    "make_report",
]


# -- loading -----------------------------------------------------------------------------

@dataclass
class CertifyRunData:
    """A finished certify run (shards merged): ``summary``, ``records`` in index order."""

    path: Path
    summary: Summary
    records: list[ExampleRecord]
    shards: int = 0  # number of shards merged (0: a single directory)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name or str(self.path)


@dataclass
class AttackRunData:
    """A finished ``patchcert attack`` run: its summary (dict) and records (dicts)."""

    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name or str(self.path)


def _is_attack_summary(d: Path) -> bool:
    try:
        s = json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and isinstance(s.get("metadata"), dict) and s["metadata"].get("kind") == "attack"


def _load_single(d: Path) -> CertifyRunData:
    if _is_attack_summary(d):
        raise PatchcertError(f"{d} is a patchcert attack run; pass it with --attack DIR")
    summary = read_summary(d)
    if not (d / RECORDS_FILE).is_file():
        raise PatchcertError(f"{d}: summary.json but no records.jsonl (a damaged run?)")
    records = read_records(d / RECORDS_FILE)
    if len(records) != summary.n:
        raise PatchcertError(f"{d} is incomplete: summary.json says {summary.n} examples but records.jsonl "
                             f"holds {len(records)}")
    idx = [r.index for r in records]
    if len(set(idx)) != len(idx):
        raise PatchcertError(f"{d}: records.jsonl holds duplicate example indices")
    keys = {(r.defense, r.patch) for r in summary.results}
    for r in records:
        for key, patch in keys:
            o = r.defenses.get(key)
            if o is None or patch not in o.certified:
                raise PatchcertError(f"{d}: record {r.index} has no result for {key} / {patch!r}")
    records = sorted(records, key=lambda r: r.index)
    # the records are the truth; a summary that disagrees with them is a damaged run
    again = summarize(records, summary.results, summary.metadata)
    for a, b in zip(summary.results, again.results):
        if abs(a.clean_accuracy - b.clean_accuracy) > 1e-9 or abs(a.certified_accuracy - b.certified_accuracy) > 1e-9:
            raise PatchcertError(f"{d}: summary.json disagrees with records.jsonl for {a.defense} / {a.patch!r} "
                                 f"(certified {a.certified_accuracy:.6g} vs {b.certified_accuracy:.6g})")
        if b.shapes and not a.shapes:
            a.shapes = b.shapes
    return CertifyRunData(d, summary, records)


def load_certify_run(path: str | os.PathLike) -> CertifyRunData:
    """Load a finished certify run; shard directories ``RUN/shard-i-of-n/`` are merged in memory.

    Refuses (one-line :class:`PatchcertError`) a missing directory, a run without
    ``summary.json`` (unfinished), a record count that does not match the summary, missing
    or unfinished shards, and shards made with different models, defenses or patches.
    """
    d = Path(path)
    if not d.is_dir():
        raise PatchcertError(f"run directory {str(d)!r} does not exist")
    if (d / SUMMARY_FILE).is_file():
        return _load_single(d)
    shards = find_shards(d)
    if not shards:
        if (d / RECORDS_FILE).exists():
            try:
                done = len(read_records(d / RECORDS_FILE, allow_partial_tail=True))
            except PatchcertError:
                done = "?"
            raise PatchcertError(f"{d} is incomplete: no summary.json ({done} records so far); finish it with "
                                 f"patchcert certify --resume --out {d} (same options)")
        raise PatchcertError(f"{d} is not a patchcert certify run (no summary.json or records.jsonl)")
    parts: list[CertifyRunData] = []
    for i, p in shards.items():
        if not (p / SUMMARY_FILE).is_file():
            raise PatchcertError(f"{d} is incomplete: shard {i} of {len(shards)} has no summary.json (unfinished)")
        parts.append(_load_single(p))
    s0 = parts[0].summary
    sig0 = ([(r.defense, r.patch) for r in s0.results], s0.metadata.model_sha256, s0.metadata.dtype)
    for i, part in enumerate(parts[1:], 1):
        s = part.summary
        if ([(r.defense, r.patch) for r in s.results], s.metadata.model_sha256, s.metadata.dtype) != sig0:
            raise PatchcertError(f"cannot merge {d}: shard {i} was made with a different model, dtype, defenses or patches")
    records = sorted((r for part in parts for r in part.records), key=lambda r: r.index)
    idx = [r.index for r in records]
    if len(set(idx)) != len(idx):
        raise PatchcertError(f"cannot merge {d}: shards overlap (duplicate example indices)")

    def wavg(vals: list[tuple[float | None, int]]) -> float | None:
        vs = [(v, k) for v, k in vals if v is not None]
        tot = sum(k for _, k in vs)
        return sum(v * k for v, k in vs) / tot if vs and tot else None

    template = []
    for j, r in enumerate(s0.results):
        t = ResultRow.from_json(r.to_json())
        t.certify_seconds_per_image = wavg([(p.summary.results[j].certify_seconds_per_image, p.summary.n) for p in parts])
        template.append(t)
    md = RunMetadata.from_json(s0.metadata.to_json())
    md.shard, md.merged_from, md.num_examples = None, len(parts), len(records)
    md.forward_seconds_per_image = wavg([(p.summary.metadata.forward_seconds_per_image, p.summary.n) for p in parts])
    md.indices = [idx[0], idx[-1]] if idx else []
    summary = summarize(records, template, md)
    return CertifyRunData(d, summary, records, shards=len(parts))


def load_attack_run(path: str | os.PathLike) -> AttackRunData:
    """Load a finished ``patchcert attack`` run (one-line error if unfinished or not one)."""
    d = Path(path)
    if not d.is_dir():
        raise PatchcertError(f"attack run directory {str(d)!r} does not exist")
    if not (d / SUMMARY_FILE).is_file():
        if (d / RECORDS_FILE).exists():
            raise PatchcertError(f"{d} is incomplete: no summary.json; finish it with patchcert attack --resume --out {d}")
        raise PatchcertError(f"{d} is not a patchcert attack run (no summary.json)")
    s = read_json(d / SUMMARY_FILE)
    if not (isinstance(s, dict) and isinstance(s.get("metadata"), dict) and s["metadata"].get("kind") == "attack"):
        raise PatchcertError(f"{d} is not a patchcert attack run (its summary.json is not an attack summary)")
    try:
        n = int(s["n"])
        for r in s["results"]:
            _ = (r["defense"], r["patch"], float(r["robust_accuracy"]), float(r["clean_accuracy"]))
    except (KeyError, TypeError, ValueError) as e:
        raise PatchcertError(f"{d / SUMMARY_FILE}: not an attack summary ({type(e).__name__}: {e})") from None
    raw = (d / RECORDS_FILE).read_text(encoding="utf-8") if (d / RECORDS_FILE).is_file() else ""
    if raw and not raw.endswith("\n"):
        raise PatchcertError(f"{d}: records.jsonl ends in an unfinished line")
    try:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise PatchcertError(f"{d}: records.jsonl is corrupt ({e})") from None
    if len(records) != n:
        raise PatchcertError(f"{d} is incomplete: summary.json says {n} examples but records.jsonl holds {len(records)}")
    return AttackRunData(d, s, records)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


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
            row = ReportRow(
                run=run.name, model=md.model, data=_data_name(md.data), defense=r.defense, patch=r.patch,
                resolved=r.resolved, n=run.summary.n, clean_accuracy=r.clean_accuracy,
                certified_accuracy=r.certified_accuracy, certify_seconds_per_image=r.certify_seconds_per_image,
                forward_seconds_per_image=md.forward_seconds_per_image, shapes=r.shapes,
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
    cols = ["run", "model", "data", "defense", "patch", "n", "clean", "certified"]
    if has_att:
        cols += ["robust (attack)", "attack", "soundness"]
    cols += ["certify ms/img", "forward ms/img"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in ("n", "clean", "certified", "robust (attack)",
                                                                          "certify ms/img", "forward ms/img") else "---"
                                                           for c in cols) + "|"]
    for r in rows:
        patch = r.patch if r.resolved in ("", r.patch) or len(r.resolved) > 24 else f"{r.patch} ({r.resolved})"
        cells = [r.run, r.model, r.data, r.defense, patch, str(r.n), _pct(r.clean_accuracy), _pct(r.certified_accuracy)]
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
              "forward_seconds_per_image", "attack_seconds_per_image"]


def rows_to_csv(rows: Sequence[ReportRow]) -> str:
    """CSV with exact values (accuracies as fractions, times in seconds per image)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = r.to_json()
        w.writerow({k: ("" if d[k] is None else (repr(d[k]) if isinstance(d[k], float) else d[k])) for k in CSV_FIELDS})
    return buf.getvalue()


# -- curves ------------------------------------------------------------------------------

def square_curve(records: Sequence[ExampleRecord], key: str, cap: int) -> tuple[list[int], list[float]] | None:
    """Certified accuracy against an ``s x s`` patch for ``s = 0..cap``: the fraction of all
    examples that are correct with ``largest_square >= s`` (s = 0: defended clean accuracy).
    None when the run recorded no ``largest_square`` for ``key``."""
    n = len(records)
    if n == 0 or cap < 1:
        return None
    outs = [r.defenses[key] for r in records if key in r.defenses]
    if len(outs) != n or any(o.largest_square is None for o in outs):
        return None
    sides = torch.tensor([int(o.largest_square) for o in outs], dtype=torch.long)
    correct = torch.tensor([bool(o.correct) for o in outs])
    s = torch.arange(0, cap + 1)
    acc = ((sides[None, :] >= s[:, None]) & correct[None, :]).sum(1).double() / n
    return s.tolist(), [float(v) for v in acc.tolist()]


_RECT = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def aspect_series(run: CertifyRunData) -> dict[tuple[str, int], list[tuple[int, int, float]]]:
    """Certified accuracy per rectangle of one area, per (defense, area): ``[(h, w, acc), ...]``
    sorted by aspect ratio h/w. From ``area=A`` results (per-rectangle certificates) and from
    two or more explicit ``hxw`` patches of the same area."""
    out: dict[tuple[str, int], dict[tuple[int, int], float]] = {}
    for r in run.summary.results:
        if r.shapes:
            for name, acc in r.shapes.items():
                m = _RECT.match(name)
                if m:
                    h, w = int(m.group(1)), int(m.group(2))
                    out.setdefault((r.defense, h * w), {})[(h, w)] = float(acc)
        else:
            m = _RECT.match(r.resolved or "") or _RECT.match(r.patch)
            if m:
                h, w = int(m.group(1)), int(m.group(2))
                out.setdefault((r.defense, h * w), {}).setdefault((h, w), float(r.certified_accuracy))
    return {k: sorted(((h, w, a) for (h, w), a in v.items()), key=lambda t: t[0] / t[1])
            for k, v in out.items() if len(v) >= 2}


# -- plots -------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


_LINESTYLES = ["-", "--", "-.", ":"]
_LINE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _style(i: int, n: int) -> dict[str, Any]:
    """Distinct line style per series; earlier series get larger markers so that identical
    curves stay visible under later ones."""
    return {"linestyle": _LINESTYLES[i % len(_LINESTYLES)], "marker": _LINE_MARKERS[i % len(_LINE_MARKERS)],
            "markersize": 4 + 5 * (n - 1 - i) / max(1, n - 1), "linewidth": 1.6, "alpha": 0.9}


def _label(run: CertifyRunData | str, defense: str, multi_run: bool) -> str:
    name = run.name if isinstance(run, CertifyRunData) else run
    return f"{name}: {defense}" if multi_run else defense


def plot_square_sizes(runs: Sequence[CertifyRunData], path: str | os.PathLike) -> bool:
    """Certified accuracy vs square patch side (BagCert Fig. 3), one line per run x defense.
    Returns False (and writes nothing) if no run recorded ``largest_square``."""
    series = []
    multi = len(runs) > 1
    for run in runs:
        cap = int(run.summary.metadata.square_cap or 0)
        if cap < 1 and run.records:
            vals = [o.largest_square for r in run.records for o in r.defenses.values() if o.largest_square is not None]
            cap = max(vals) if vals else 0
        for key in dict.fromkeys(r.defense for r in run.summary.results):
            c = square_curve(run.records, key, cap)
            if c is not None:
                series.append((_label(run, key, multi), c))
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((label, (s, acc)), col) in enumerate(zip(series, _colors(len(series)))):
        ax.plot(s, [100 * a for a in acc], color=col, label=label, **_style(i, len(series)))
    ax.set_xlabel("square patch side s (pixels); s = 0: clean accuracy")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title("Certified accuracy vs square patch size (cf. BagCert Fig. 3)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_aspect_ratios(runs: Sequence[CertifyRunData], path: str | os.PathLike) -> bool:
    """Certified accuracy vs rectangle shape at fixed area (BagCert Fig. 4), one panel per
    area, one line per run x defense. False (nothing written) without such results."""
    multi = len(runs) > 1
    by_area: dict[int, list[tuple[str, list[tuple[int, int, float]]]]] = {}
    for run in runs:
        for (key, area), pts in aspect_series(run).items():
            by_area.setdefault(area, []).append((_label(run, key, multi), pts))
    if not by_area:
        return False
    plt = _plt()
    areas = sorted(by_area)
    fig, axes = plt.subplots(1, len(areas), figsize=(max(7, 5.5 * len(areas)), 4.5), squeeze=False)
    for ax, area in zip(axes[0], areas):
        series = by_area[area]
        shapes = sorted({(h, w) for _, pts in series for h, w, _ in pts}, key=lambda t: t[0] / t[1])
        xpos = {s: i for i, s in enumerate(shapes)}
        for i, ((label, pts), col) in enumerate(zip(series, _colors(len(series)))):
            ax.plot([xpos[(h, w)] for h, w, _ in pts], [100 * a for _, _, a in pts], color=col, label=label,
                    **_style(i, len(series)))
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{h}x{w}" for h, w in shapes], rotation=45)
        ax.set_xlabel(f"patch shape (rows x columns), area {area} pixels")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(f"Certified accuracy vs aspect ratio, area {area} (cf. BagCert Fig. 4)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def plot_clean_vs_certified(rows: Sequence[ReportRow], path: str | os.PathLike) -> bool:
    """Clean vs certified accuracy (BagCert Fig. 2): one point per run x defense x patch;
    colour = run/defense, marker = patch; points of one run/defense are joined."""
    pts = [r for r in rows if r.n > 0]
    if not pts:
        return False
    plt = _plt()
    multi = len({r.run for r in pts}) > 1
    groups = list(dict.fromkeys((r.run, r.defense) for r in pts))
    patches = list(dict.fromkeys(r.patch for r in pts))
    cols = dict(zip(groups, _colors(len(groups))))
    fig, ax = plt.subplots(figsize=(7, 5))
    for g in groups:
        gr = [r for r in pts if (r.run, r.defense) == g]
        if len(gr) > 1:
            ax.plot([100 * r.clean_accuracy for r in gr], [100 * r.certified_accuracy for r in gr], color=cols[g],
                    linewidth=0.8, alpha=0.6)
        for r in gr:
            ax.scatter(100 * r.clean_accuracy, 100 * r.certified_accuracy, color=cols[g], s=50,
                       marker=_MARKERS[patches.index(r.patch) % len(_MARKERS)], edgecolors="black", linewidths=0.5,
                       zorder=3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=cols[g], marker="o", linestyle="", label=_label(g[0], g[1], multi)) for g in groups]
    handles += [Line2D([], [], color="grey", marker=_MARKERS[i % len(_MARKERS)], linestyle="", label=f"patch {p}")
                for i, p in enumerate(patches)]
    lo = min(min(r.certified_accuracy for r in pts), min(r.clean_accuracy for r in pts))
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(max(0, 100 * lo - 5), 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title("Clean vs certified accuracy (cf. BagCert Fig. 2)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_bounds(rows: Sequence[ReportRow], path: str | os.PathLike) -> bool:
    """Per run x defense x patch: clean, robust (attack; an upper bound) and certified (a lower
    bound) accuracy as grouped bars. False without attack results."""
    sel = [r for r in rows if r.robust_accuracy is not None]
    if not sel:
        return False
    plt = _plt()
    multi = len({r.run for r in sel}) > 1
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(sel) + 2), 4.8))
    x = list(range(len(sel)))
    wdt = 0.26
    for off, (name, vals, col) in zip((-wdt, 0, wdt), (
            ("clean", [r.clean_accuracy for r in sel], "#9e9e9e"),
            ("robust to the attack (upper bound)", [r.robust_accuracy for r in sel], "#ef8a62"),
            ("certified (lower bound)", [r.certified_accuracy for r in sel], "#67a9cf"))):
        ax.bar([i + off for i in x], [100 * v for v in vals], wdt, label=name, color=col, edgecolor="black", linewidth=0.4)
    ax.set_xticks(x)
    ax.set_xticklabels([(f"{r.run}\n" if multi else "") + f"{r.defense}\n{r.patch}" for r in sel], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy bounds: certified (lower) <= true robust <= under attack (upper)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- vulnerability maps (Fig. 6) ----------------------------------------------------------

def region_scores(defense: Any, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-cell evidence the defense sums ``[N, K, H, W]`` (float64) and what it is called."""
    return defense.evidence(scores).to(torch.float64), defense.evidence_name


def _load_images(meta: RunMetadata, indices: Sequence[int], data_dir: str | os.PathLike | None
                 ) -> tuple[dict[int, torch.Tensor], list[str] | None]:
    """Images (uint8 [3, H, W]) of the run's dataset at ``indices``; empty if unavailable."""
    from .data import load_dataset

    data = meta.data or {}
    kind = str(data.get("dataset") or "")
    split = str(data.get("split") or "test")
    need = max(indices) + 1 if indices else 0
    try:
        if kind == "cifar10":
            ds = load_dataset("cifar10", data_dir, train=split == "train")
        elif kind == "synthetic":
            opts = {"n": int(data.get("n") or data.get("num_examples_total") or need),
                    "num_classes": meta.num_classes or len(meta.classes) or 10,
                    "size": int(data.get("size") or meta.image_size[0]), "seed": int(data.get("seed") or 0)}
            if data.get("pattern"):
                opts["pattern"] = str(data["pattern"])
            ds = load_dataset("synthetic", **opts)  # the recorded seed already names the split's draw
        elif kind == "imagenet":
            kw = {k: int(data[k]) for k in ("size", "resize") if data.get(k)}
            ds = load_dataset("imagenet", data_dir, train=split == "train", **kw)
        elif kind in ("imagefolder", "imagenette"):
            kw = {k: int(data[k]) for k in ("size", "resize") if data.get(k)}
            name = str(data.get("name") or "")
            if kind == "imagefolder" and data.get("root") and "imagenette" not in name:
                ds = load_dataset(f"imagefolder:{data['root']}", limit=need, **kw)
            else:
                ds = load_dataset("imagenette", data_dir, train=split == "train", limit=need, **kw)
        else:
            log.warning("images of dataset %r cannot be reloaded; vulnerability maps without the image", kind or "?")
            return {}, None
    except PatchcertError as e:
        log.warning("cannot load the run's images (%s); vulnerability maps without the image", e)
        return {}, None
    if tuple(ds.image_size) != tuple(meta.image_size):
        log.warning("reloaded images are %s, the run's %s; vulnerability maps without the image",
                    ds.image_size, meta.image_size)
        return {}, None
    return {i: ds[i][0] for i in indices if 0 <= i < len(ds)}, list(ds.classes)


def plot_vulnerability(
    run: CertifyRunData, indices: Sequence[int], out_dir: str | os.PathLike, patch: str | None = None,
    data_dir: str | os.PathLike | None = None, max_defenses: int = 4,
) -> list[Path]:
    """One PNG per example index: per defense (rows), the image with the worst pixel patch,
    the region scores of the true class with the worst window ``R(l)``, and the worst-case
    margin ``defense.margin_map`` over placements (< 0: a patch there may flip the image),
    worst placement outlined. Needs ``RUN/scores.safetensors``. Returns the files written."""
    from .attacks.selection import pixel_start
    from .defenses.base import defense_from_config
    from .geometry import Geometry
    from .results import load_scores

    sf_path = run.path / SCORES_FILE
    if not sf_path.is_file():
        raise PatchcertError(f"{run.path}: no {SCORES_FILE} for vulnerability maps; certify with --save-scores")
    sf = load_scores(sf_path)
    pos = {int(i): k for k, i in enumerate(sf.indices.tolist())}
    missing = [i for i in indices if i not in pos]
    if missing:
        raise PatchcertError(f"{run.path}: example index(es) {', '.join(map(str, missing[:5]))} are not in the run "
                             f"(it holds {run.summary.n} examples from index {min(pos) if pos else '-'})")
    md = run.summary.metadata
    geom = Geometry.from_dict(md.geometry)
    results = run.summary.results
    patches = list(dict.fromkeys(r.patch for r in results))
    if patch is None:
        patch = patches[0]
    if patch not in patches:
        raise PatchcertError(f"{run.path}: no results for patch {patch!r} (the run has {', '.join(patches)})")
    rows = [r for r in results if r.patch == patch][:max_defenses]
    defenses = []
    for r in rows:
        try:
            defenses.append(defense_from_config(dict(r.defense_config)))
        except (PatchcertError, TypeError, ValueError) as e:
            raise PatchcertError(f"{run.path}: cannot rebuild defense {r.defense} from its config ({e})") from None
    images, classes = _load_images(md, list(indices), data_dir)
    classes = classes or list(md.classes) or None
    recs = {r.index: r for r in run.records}
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    def cname(c: int) -> str:
        return classes[c] if classes and 0 <= c < len(classes) else str(c)

    out = Path(out_dir)
    written = []
    H_img, W_img = int(md.image_size[0]), int(md.image_size[1])
    for idx in indices:
        k = pos[idx]
        s = sf.scores[k:k + 1].to(torch.float64)
        y = sf.labels[k:k + 1]
        label = int(y[0])
        fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.9 * len(rows)), squeeze=False)
        for (r, d), ax in zip(zip(rows, defenses), axes):
            rec = recs[idx].defenses[r.defense]
            worst = rec.worst.get(patch)
            windows = [tuple(w) for w in r.windows]
            win = tuple(worst.window) if worst is not None else windows[0]
            shapes = [tuple(map(int, t.split("x"))) for t in r.resolved.split(",") if _RECT.match(t)]
            shape = next((sh for sh in shapes if geom.window(sh) == win), shapes[0] if shapes else (1, 1))
            ev, what = region_scores(d, s)
            mm = d.margin_map(s, y, win)[0]
            # panel 1: the image with the pixel patch of the worst placement
            a0, a1, a2 = ax
            if idx in images:
                a0.imshow(images[idx].permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                a0.text(0.5, 0.5, "image not available\n(--data-dir / $PATCHCERT_DATA)", ha="center", va="center",
                        transform=a0.transAxes)
                a0.set_xlim(-0.5, W_img - 0.5)
                a0.set_ylim(H_img - 0.5, -0.5)
            cert = rec.certified.get(patch, False)
            a0.set_title(f"#{idx}: label {cname(label)}, pred {cname(rec.pred)}\n"
                         f"{'CERTIFIED' if cert else 'not certified'} vs {patch}", fontsize=9)
            a0.set_xlabel("pixel column")
            a0.set_ylabel("pixel row")
            # panel 2: region scores of the true class
            im = a1.imshow(ev[0, label].numpy(), cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=a1, fraction=0.046, pad=0.04)
            a1.set_title(f"{r.defense}\n{what} of the true class ({cname(label)})", fontsize=9)
            a1.set_xlabel("score-map column")
            a1.set_ylabel("score-map row")
            # panel 3: worst-case margin over placements
            if mm is not None and mm.numel() and bool(torch.isfinite(mm).any()):
                finite = mm[torch.isfinite(mm)]
                lo, hi = float(finite.min()), float(finite.max())
                norm = TwoSlopeNorm(vcenter=0.0, vmin=min(lo, -1e-9), vmax=max(hi, 1e-9))
                im2 = a2.imshow(mm.clamp(lo, hi).numpy(), cmap="RdBu", norm=norm, interpolation="nearest")
                fig.colorbar(im2, ax=a2, fraction=0.046, pad=0.04, label="worst-case margin")
                flat = int(torch.nan_to_num(mm, nan=float("inf")).flatten().argmin())
                wr, wc = divmod(flat, mm.shape[1])
                a2.add_patch(Rectangle((wc - 0.5, wr - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
                aw = tuple(d.analysis_window(win))
                a1.add_patch(Rectangle((wc - 0.5, wr - 0.5), aw[1], aw[0], fill=False, edgecolor="red", linewidth=1.8))
                py = int(pixel_start(geom, 0, torch.tensor([wr]), aw[0], shape[0], H_img)[0])
                px = int(pixel_start(geom, 1, torch.tensor([wc]), aw[1], shape[1], W_img)[0])
                a0.add_patch(Rectangle((px - 0.5, py - 0.5), shape[1], shape[0], fill=False, edgecolor="red",
                                       linewidth=1.8))
                a2.set_title(f"worst-case margin per placement ({aw[0]}x{aw[1]} window)\n"
                             f"min {lo:.4g} at ({wr}, {wc}); > 0 everywhere = certified", fontsize=9)
            else:
                a2.text(0.5, 0.5, "no placement fits\n(nothing certifiable)", ha="center", va="center",
                        transform=a2.transAxes)
                a2.set_title("worst-case margin per placement", fontsize=9)
            a2.set_xlabel("placement column (top-left cell)")
            a2.set_ylabel("placement row")
            for a in (a1, a2):
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
                a.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{run.name}: example {idx}; red = worst patch / the cells it reaches, black = worst placement",
                     fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.04 / len(rows)))
        p = out / f"vulnerability_{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}_{idx}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


# -- everything --------------------------------------------------------------------------

@dataclass
class ReportOutput:
    """What :func:`make_report` wrote."""

    rows: list[ReportRow]
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # plots not made, with the reason
    markdown: str = ""


def make_report(
    runs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    attacks: Sequence[str | os.PathLike] = (),
    examples: Sequence[int] = (),
    map_patch: str | None = None,
    data_dir: str | os.PathLike | None = None,
    plots: bool = True,
) -> ReportOutput:
    """Load every run (merging shards), write tables and plots into ``out_dir``.

    ``plots=False`` skips the summary plots; vulnerability maps are drawn whenever
    ``examples`` are given. Every run is loaded (and validated) before anything is written.
    """
    from .checkpoint import atomic_write_text

    if not runs and not attacks:
        raise PatchcertError("no run given")
    run_paths = [Path(p) for p in runs]
    att_paths = [Path(p) for p in attacks]
    loaded = [load_certify_run(p) for p in run_paths]
    for run, name in zip(loaded, _unique_names(run_paths)):
        run.name = name
    att = [load_attack_run(p) for p in att_paths]
    for a, name in zip(att, _unique_names(att_paths)):
        a.name = name
    bad_ex = [e for e in examples if not isinstance(e, int) or e < 0]
    if bad_ex:
        raise PatchcertError(f"example indices must be non-negative integers, got {bad_ex}")
    from .rundir import prepare

    out = prepare(out_dir)
    rows = report_rows(loaded, att)
    res = ReportOutput(rows=rows)
    md_table = rows_to_markdown(rows)
    atomic_write_text(out / "results.csv", rows_to_csv(rows))
    res.files.append(out / "results.csv")
    images: list[tuple[str, Path]] = []
    if plots:
        for fname, title, fn, arg, why in (
            ("certified_vs_square_patch.png", "Certified accuracy vs square patch size", plot_square_sizes, loaded,
             "no largest_square in the records (certify with --square-cap > 0)"),
            ("certified_vs_aspect_ratio.png", "Certified accuracy vs aspect ratio at fixed area", plot_aspect_ratios,
             loaded, "no per-rectangle results (certify with --patch area=24, or --patch 1x24 --patch 2x12 ...)"),
            ("clean_vs_certified.png", "Clean vs certified accuracy", plot_clean_vs_certified, rows, "no results"),
            ("accuracy_bounds.png", "Certified (lower) and attacked (upper) bounds", plot_bounds, rows,
             "no attack run (--attack DIR)"),
        ):
            if fn(arg, out / fname):
                images.append((title, out / fname))
            else:
                res.skipped.append(f"{fname}: {why}")
    if examples:
        for run in loaded:
            if not (run.path / SCORES_FILE).is_file():
                res.skipped.append(f"vulnerability maps of {run.name}: no {SCORES_FILE} (certify with --save-scores)")
                continue
            for p in plot_vulnerability(run, list(examples), out, patch=map_patch, data_dir=data_dir):
                images.append((f"Vulnerability map: {p.stem.removeprefix('vulnerability_')}", p))
    res.files += [p for _, p in images]
    lines = ["# patchcert report", "", "Runs: " + ", ".join(f"`{r.path}`" for r in loaded)]
    if att:
        lines.append("Attack runs: " + ", ".join(f"`{a.path}`" for a in att))
    lines += ["", "Accuracies over the run's examples; certified = a lower bound on robust accuracy, robust (attack) "
              "= accuracy under the heuristic patch attack, an upper bound.", "", md_table]
    for title, p in images:
        lines += [f"## {title}", "", f"![{title}]({p.name})", ""]
    if res.skipped:
        lines += ["## Not plotted", ""] + [f"- {s}" for s in res.skipped] + [""]
    res.markdown = md_table
    atomic_write_text(out / "results.md", md_table)
    atomic_write_text(out / "report.md", "\n".join(lines))
    res.files = [out / "report.md", out / "results.md"] + res.files
    return res
