"""Where a pixel defense (double masking) fails over a whole run, from its records alone.

A double-masking record of an image that is classified right but not certified names the first
mask pair that disagrees with the label and every mask whose one-mask prediction disagrees
(:class:`patchcert.results.MaskPairCase`). Over a run this splits the failures into two kinds
that call for different remedies -- the model is already fooled by *one* mask of the set (the
first round disagrees), or only by some *pair* of masks -- and shows which masks (which parts of
the image) break the prediction alone most often. ``report.md`` tabulates both
(:func:`failure_sections`); ``mask_failures_<run>.png`` maps the one-mask failures over the image.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import PatchcertError
from ..results import MaskPairCase
from .disagreement import _rebuild, pixel_rows
from .load import CertifyRunData
from .plots import _figure

__all__ = ["MaskFailures", "mask_failures", "failure_sections", "plot_mask_failures"]


@dataclass
class MaskFailures:
    """One run x pixel defense x patch: how its examples split, and which masks fail.

    ``one_mask``: correct, uncertified, some one-mask prediction disagrees with the label;
    ``pair_only``: correct, uncertified, every one-mask prediction agrees (only a pair fails).
    ``disagree[m]``: correct, uncertified examples whose one-mask prediction under mask ``m``
    disagrees; ``first_pair[m]``: pair-only failures whose first failing pair (in the
    certificate's order, so biased towards low indices) contains ``m`` (once if ``(m, m)``);
    ``one_mask_sets``: per one-mask failure, its disagreeing masks (for the map)."""

    defense: str
    patch: str
    n: int = 0
    certified: int = 0
    misclassified: int = 0
    one_mask: int = 0
    pair_only: int = 0
    disagree: Counter = field(default_factory=Counter)
    first_pair: Counter = field(default_factory=Counter)
    one_mask_sets: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def uncertified_correct(self) -> int:
        return self.one_mask + self.pair_only


def mask_failures(records: Sequence[Any], defense: str, patch: str) -> MaskFailures | None:
    """Tally the records' double-masking failures for ``defense`` and ``patch`` (records without
    them are left out). None if a correct, uncertified record carries no mask pair (the defense is
    not a mask-pair defense)."""
    out = MaskFailures(defense=defense, patch=patch)
    for r in records:
        o = r.defenses.get(defense)
        if o is None or patch not in o.certified:
            continue
        out.n += 1
        if o.certified[patch]:
            out.certified += 1
            continue
        if not o.correct:
            out.misclassified += 1
            continue
        w = o.worst.get(patch)
        if not isinstance(w, MaskPairCase):
            return None
        if w.first_round:
            out.one_mask += 1
            out.disagree.update(set(w.disagree))
            out.one_mask_sets.append(tuple(sorted(set(w.disagree))))
        else:
            out.pair_only += 1
            out.first_pair.update(set(w.pair))
    return out


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "-"


def _rect(defense: Any, m: int) -> str:
    if defense is None:
        return ""
    t, left, h, w = defense.masks.rects[m]
    return f"rows {t}-{t + h - 1}, cols {left}-{left + w - 1}"


def _tallies(run: CertifyRunData, patch: str | None = None) -> list[tuple[MaskFailures, Any]]:
    out = []
    for row in pixel_rows(run, patch):
        f = mask_failures(run.records, row.defense, row.patch)
        if f is None or f.n == 0:
            continue
        try:
            d = _rebuild(run, row)
            d = d if hasattr(d, "masks") else None
        except PatchcertError:  # the counts stand without the geometry
            d = None
        out.append((f, d))
    return out


def failure_sections(runs: Sequence[CertifyRunData], top: int = 5) -> list[str]:
    """report.md: for every run x pixel defense, how its examples split (certified /
    misclassified / fails under one mask / only under a pair) and the masks that fail most often."""
    lines: list[str] = []
    for run in runs:
        for f, d in _tallies(run):
            u = f.uncertified_correct
            lines += [f"## Where {f.defense} fails: {run.name}, {f.patch}", "",
                      "From the records: an image classified right but not certified fails either under one mask "
                      "of the set (the first round already disagrees with the label) or only under some pair of "
                      "masks.", "",
                      "| examples | n | of all | of correct, uncertified |", "|---|---:|---:|---:|",
                      f"| certified | {f.certified} | {_pct(f.certified, f.n)} | |",
                      f"| misclassified (by the defense) | {f.misclassified} | {_pct(f.misclassified, f.n)} | |",
                      f"| correct, uncertified: fails under one mask | {f.one_mask} | {_pct(f.one_mask, f.n)} "
                      f"| {_pct(f.one_mask, u)} |",
                      f"| correct, uncertified: only under a pair | {f.pair_only} | {_pct(f.pair_only, f.n)} "
                      f"| {_pct(f.pair_only, u)} |",
                      f"| all | {f.n} | | |", ""]
            if f.disagree:
                lines += ["Masks whose one-mask prediction disagrees most often (share of the one-mask failures; "
                          "the pair-only failures are not ranked: a record names only the first failing pair in "
                          "the certificate's order, which favours low mask indices):", "",
                          "| mask | where | images | share |", "|---:|---|---:|---:|"]
                for m, c in sorted(f.disagree.items(), key=lambda t: (-t[1], t[0]))[:top]:
                    lines.append(f"| {m} | {_rect(d, m)} | {c} | {_pct(c, f.one_mask)} |")
                lines.append("")
    return lines


def plot_mask_failures(run: CertifyRunData, out_dir: str | os.PathLike) -> list[Path]:
    """``mask_failures_<run>.png``, one panel per pixel defense with a mask geometry: per pixel,
    the share of the images that fail under one mask whose prediction a disagreeing mask covering
    that pixel breaks. (Pair-only failures are not mapped: a record names only the first failing
    pair in the certificate's order, a biased sample of the failing pairs.)"""
    import torch

    tallies = [(f, d) for f, d in _tallies(run) if d is not None and f.one_mask]
    if not tallies:
        return []
    fig = _figure((4.8 * len(tallies), 4.4))
    axes = fig.subplots(1, len(tallies), squeeze=False)[0]
    for (f, d), ax in zip(tallies, axes):
        masks = d.masks.boolean()  # [M, H, W]
        sizes = torch.tensor([len(ms) for ms in f.one_mask_sets], dtype=torch.long)
        chosen = torch.zeros(len(f.one_mask_sets), masks.shape[0], dtype=torch.float64)  # [failures, M]
        chosen[torch.repeat_interleave(torch.arange(len(sizes)), sizes),
               torch.tensor([m for ms in f.one_mask_sets for m in ms], dtype=torch.long)] = 1.0
        # per failure, the union of its disagreeing masks; summed over failures
        heat = ((chosen @ masks.flatten(1).double()) > 0).double().sum(0).view(masks.shape[1:])
        im = ax.imshow((100 * heat / f.one_mask).numpy(), cmap="magma", interpolation="nearest", vmin=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the one-mask failures")
        ax.set_title(f"{f.defense}, {f.patch}\n{f.one_mask} of {f.n} images fail under one mask", fontsize=9)
    fig.suptitle(f"{run.name}: where one mask breaks a correct prediction", fontsize=10)
    fig.tight_layout()
    p = Path(out_dir) / f"mask_failures_{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}.png"
    fig.savefig(p, dpi=110)
    return [p]
