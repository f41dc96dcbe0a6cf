"""Tables and plots from certify (and attack) runs: the analysis step, apart from the runs.

Inputs are run directories written by ``patchcert certify --out RUN`` (``records.jsonl`` +
``summary.json``, see :mod:`patchcert.results`), possibly split into ``RUN/shard-i-of-n/``
(merged here in memory; nothing is written into a run), and optionally attack runs written by
``patchcert attack --out DIR`` (for the empirical robust accuracy). Outputs:

* ``results.md`` / ``results.csv`` -- one row per run x defense x patch: clean, certified (with
  its 95% Wilson interval) and (with an attack run) robust accuracy, certification and forward
  seconds per image;
* ``report.md`` also tabulates, for runs of at least 200 examples, the certified accuracy over
  consecutive blocks of the examples with a chi-square test that the blocks agree within noise
  (:mod:`patchcert.report.stats`), and, where two or more run x defense arms share examples and
  a patch, the paired comparison of their certificates on the shared examples (only A / only
  B, McNemar's exact test): the fair comparison of two defenses or models on the same images;
* ``certified_vs_square_patch.png`` -- certified accuracy against an s x s patch as a
  function of s, from the records' ``largest_square`` (BagCert Fig. 3);
* ``certified_vs_aspect_ratio.png`` -- certified accuracy against rectangles of one area as a
  function of their shape (BagCert Fig. 4), from ``--patch area=A`` results (per-rectangle
  certificates in the records) or from explicit rectangles ``--patch 1x24 --patch 2x12 ...``;
* ``clean_vs_certified.png`` -- clean vs certified accuracy across runs and defenses (Fig. 2);
* ``accuracy_bounds.png`` -- clean / robust (attack, upper bound) / certified (lower bound);
* ``mask_failures_<run>.png`` -- pixel defenses (double masking), over the whole run: where the
  single masks that break correct predictions lie; the split of the uncertified images into
  one-mask and pair-only failures and the masks that fail most often are in
  ``report.md`` (:mod:`patchcert.report.failures`);
* ``masks_<run>_<index>.png`` -- pixel defenses (double masking): the image with the first
  mask pair that disagrees with the label, and how many disagreeing one-mask predictions cover
  each pixel, straight from the records (no score file, no model);
* ``vulnerability_<run>_<index>.png`` -- image, region scores of the true class and the
  worst-case margin over patch placements, worst placement outlined (Fig. 6); needs the run's
  ``scores.safetensors`` (``patchcert certify --save-scores``) and, for the image, the data.

Plots are drawn on standalone ``matplotlib.figure.Figure`` objects (the library never switches
matplotlib's backend or touches pyplot state) and never prints (it logs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import PatchcertError
from ..results import SCORES_FILE
from .load import AttackRunData, CertifyRunData, _unique_names, load_attack_run, load_certify_run
from .plots import (
    aspect_series,
    plot_aspect_ratios,
    plot_attack_example,
    plot_bounds,
    plot_clean_vs_certified,
    plot_square_sizes,
    square_curve,
)
from .stats import BlockTest, PairedComparison, certified_by_block, paired_certified, sign_test_p, wilson_interval
from .tables import CSV_FIELDS, ReportRow, _data_name, report_rows, rows_to_csv, rows_to_markdown
from .disagreement import plot_disagreement
from .failures import MaskFailures, failure_sections, mask_failures, plot_mask_failures
from .vulnerability import plot_vulnerability, region_scores, scoremap_rows

log = logging.getLogger(__name__)

__all__ = [
    "CertifyRunData",
    "AttackRunData",
    "ReportRow",
    "ReportOutput",
    "CSV_FIELDS",
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
    "plot_attack_example",
    "plot_vulnerability",
    "plot_disagreement",
    "plot_mask_failures",
    "mask_failures",
    "MaskFailures",
    "region_scores",
    "wilson_interval",
    "certified_by_block",
    "BlockTest",
    "paired_certified",
    "PairedComparison",
    "sign_test_p",
    "paired_comparisons",
    "make_report",
]


# -- everything --------------------------------------------------------------------------

def _block_sections(runs: Sequence[CertifyRunData], per_block: int = 100, max_blocks: int = 10) -> list[str]:
    """report.md: the certified accuracy of every run x defense x patch over consecutive blocks
    of its examples (at least ``per_block`` each, at most ``max_blocks``), with a homogeneity test."""
    lines: list[str] = []
    for run in runs:
        nb = min(max_blocks, len(run.records) // per_block)
        if nb < 2:
            continue
        for r in run.summary.results:
            if not all(r.defense in rec.defenses and r.patch in rec.defenses[r.defense].certified
                       for rec in run.records):
                continue
            t = certified_by_block(run.records, r.defense, r.patch, nb)
            lo, hi = wilson_interval(t.certified, t.n)
            lines += [f"## Certified accuracy by block: {run.name}, {r.defense}, {r.patch}", "",
                      f"{t.n} examples in {len(t.blocks)} blocks (dataset order); overall {100 * t.certified / t.n:.2f}% "
                      f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%). Homogeneity (chi-square, {t.df} df): "
                      f"{t.chi2:.2f}, p = {t.p_value:.3g}" + (" -- the blocks differ by more than noise." if
                                                              t.p_value < 0.01 else "."), "",
                      "| examples | n | certified | 95% CI |", "|---|---:|---:|---:|"]
            for b in t.blocks:
                blo, bhi = b.interval()
                lines.append(f"| {b.first}-{b.last} | {b.n} | {100 * b.accuracy:.2f}% | {100 * blo:.1f}-{100 * bhi:.1f}% |")
            lines.append("")
    return lines


def _same_images(a: CertifyRunData, b: CertifyRunData) -> bool:
    """Whether two runs' example indices name the same images (same dataset and split; the same
    pixels where both runs carry a content hash)."""
    da, db = a.summary.metadata.data or {}, b.summary.metadata.data or {}
    if _data_name(da) != _data_name(db):
        return False
    ha, hb = da.get("content_sha256"), db.get("content_sha256")
    return ha is None or hb is None or ha == hb


def paired_comparisons(runs: Sequence[CertifyRunData], min_common: int = 20,
                       max_pairs: int = 45) -> list[PairedComparison]:
    """Every pair of run x defense arms with a patch in common, on the examples both hold (at
    least ``min_common``), at most ``max_pairs`` (in run and defense order)."""
    arms = [(run, r.defense, r.patch) for run in runs for r in run.summary.results]
    out: list[PairedComparison] = []
    multi = len(runs) > 1
    for i, (ra, da, pa) in enumerate(arms):
        for rb, db, pb in arms[i + 1:]:
            if pa != pb or (ra is rb and da == db) or not _same_images(ra, rb):
                continue
            c = paired_certified(ra.records, da, rb.records, db, pa,
                                 a=f"{ra.name}: {da}" if multi else da, b=f"{rb.name}: {db}" if multi else db)
            if c.n >= min_common:
                out.append(c)
            if len(out) == max_pairs:
                return out
    return out


def _paired_section(runs: Sequence[CertifyRunData]) -> list[str]:
    pairs = paired_comparisons(runs)
    if not pairs:
        return []
    lines = ["## Paired comparisons (certified, on the examples both arms hold)", "",
             "Only the examples certified by one arm and not the other tell two arms apart; p is McNemar's "
             "exact test on them (two-sided sign test). At most 45 pairs are listed.", "",
             "| A | B | patch | n | certified A | certified B | both | only A | only B | p |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in pairs:
        lines.append(f"| {c.a} | {c.b} | {c.patch} | {c.n} | {100 * c.certified_a:.2f}% | {100 * c.certified_b:.2f}% "
                     f"| {c.both} | {c.only_a} | {c.only_b} | {c.p_value:.3g} |")
    return lines + [""]


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
    from ..checkpoint import atomic_write_text

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
    from ..rundir import prepare

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
             "no largest_square in the records (certify with --square-cap > 0; a defense that does not search "
             "squares has none)"),
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
        for run in loaded:
            for p in plot_mask_failures(run, out):
                images.append((f"Where masks break predictions: {run.name}", p))
    if examples:
        for run in loaded:
            for p in plot_disagreement(run, list(examples), out, patch=map_patch, data_dir=data_dir):
                images.append((f"Mask disagreement: {p.stem.removeprefix('masks_')}", p))
            if not scoremap_rows(run, map_patch):
                continue
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
    lines += _paired_section(loaded)
    lines += _block_sections(loaded)
    lines += failure_sections(loaded)
    for r in loaded:  # images that could not be decoded (certify --skip-bad-images): in no count
        sk = r.summary.metadata.skipped
        if sk:
            lines += [f"Run `{r.path}` skipped {len(sk)} unreadable image(s), counted nowhere above:", ""]
            lines += [f"- example {e['index']}: {e['reason']}" for e in sk[:50]]
            lines += ([f"- ... and {len(sk) - 50} more (summary.json lists them all)"] if len(sk) > 50 else []) + [""]
    for title, p in images:
        lines += [f"## {title}", "", f"![{title}]({p.name})", ""]
    if res.skipped:
        lines += ["## Not plotted", ""] + [f"- {s}" for s in res.skipped] + [""]
    res.markdown = md_table
    atomic_write_text(out / "results.md", md_table)
    atomic_write_text(out / "report.md", "\n".join(lines))
    res.files = [out / "report.md", out / "results.md"] + res.files
    return res
