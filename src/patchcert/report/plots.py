"""Plots on standalone matplotlib Figures (the backend is never switched): curves vs square
size and aspect ratio, clean vs certified, accuracy bounds, one attacked example."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..results import ExampleRecord
from .load import CertifyRunData
from .tables import ReportRow

log = logging.getLogger(__name__)


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

def _figure(figsize: tuple[float, float]):
    """A standalone ``matplotlib.figure.Figure`` (no pyplot state, no backend switch: safe in
    notebooks and servers alike; ``fig.savefig`` renders with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
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
    fig = _figure((7, 4.5))
    ax = fig.subplots()
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
    areas = sorted(by_area)
    fig = _figure((max(7, 5.5 * len(areas)), 4.5))
    axes = fig.subplots(1, len(areas), squeeze=False)
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
    return True


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def plot_clean_vs_certified(rows: Sequence[ReportRow], path: str | os.PathLike) -> bool:
    """Clean vs certified accuracy (BagCert Fig. 2): one point per run x defense x patch;
    colour = run/defense, marker = patch; points of one run/defense are joined."""
    pts = [r for r in rows if r.n > 0]
    if not pts:
        return False
    multi = len({r.run for r in pts}) > 1
    groups = list(dict.fromkeys((r.run, r.defense) for r in pts))
    patches = list(dict.fromkeys(r.patch for r in pts))
    cols = dict(zip(groups, _colors(len(groups))))
    fig = _figure((7, 5))
    ax = fig.subplots()
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
    return True


def plot_bounds(rows: Sequence[ReportRow], path: str | os.PathLike) -> bool:
    """Per run x defense x patch: clean, robust (attack; an upper bound) and certified (a lower
    bound) accuracy as grouped bars. False without attack results."""
    sel = [r for r in rows if r.robust_accuracy is not None]
    if not sel:
        return False
    multi = len({r.run for r in sel}) > 1
    fig = _figure((max(7.5, 1.3 * len(sel) + 2), 4.8))
    ax = fig.subplots()
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
    return True


def plot_attack_example(path: str | os.PathLike, image: torch.Tensor, adv: torch.Tensor, ev_clean: torch.Tensor,
                        ev_adv: torch.Tensor, res: Any, label: int, pred: int, classes: Sequence[str],
                        defense_key: str, patch: str, certified: bool, reach: torch.Tensor | None,
                        what: str = "votes") -> Path:
    """One attacked example: original (patch outlined) / attacked / the target class's region
    scores (``ev_clean``, ``ev_adv`` ``[H, W]``) before and after, the cells the patch can
    reach outlined. ``res`` is the example's attack outcome (an
    :class:`~patchcert.results.AttackOutcome` or its JSON). Returns the file written."""
    if hasattr(res, "to_json"):
        res = res.to_json()
    from matplotlib.patches import Rectangle

    def name(c: int) -> str:
        return classes[c] if 0 <= c < len(classes) else str(c)

    fig = _figure((13, 3.6))
    ax = fig.subplots(1, 4)
    ax[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax[0].set_title(f"original: {name(label)}\ndefended pred {name(pred)}" + (" (certified)" if certified else ""),
                    fontsize=9)
    ax[1].imshow(adv.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    if not res["attacked"]:
        ax[1].set_title("not attacked\n(already misclassified)", fontsize=9)
    else:
        ok = "attack succeeded" if res["success"] else "attack failed"
        ax[1].set_title(f"attacked: pred {name(res['adv_pred'])}\n{ok}", fontsize=9,
                        color="red" if res["success"] else "black")
    tgt = res.get("target")
    who = f"target {name(tgt)}" if tgt is not None else f"predicted {name(pred)}"
    lo = float(min(ev_clean.min(), ev_adv.min()))
    hi = float(max(ev_clean.max(), ev_adv.max()))
    for k, (v, title) in enumerate(((ev_clean, "before"), (ev_adv, "after"))):
        im = ax[2 + k].imshow(v.numpy(), cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-9), interpolation="nearest")
        ax[2 + k].set_title(f"{what} of {who}\n({title} the attack)", fontsize=9)
        fig.colorbar(im, ax=ax[2 + k], fraction=0.046, pad=0.04)
    if res.get("pixel") is not None:
        (py, px), (ph, pw) = res["pixel"], res["patch"]
        for a in ax[:2]:
            a.add_patch(Rectangle((px - 0.5, py - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=1.5))
        if reach is not None:
            rows = reach.any(1).nonzero().flatten()
            cols = reach.any(0).nonzero().flatten()
            if len(rows) and len(cols):
                r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
                for a in ax[2:]:
                    a.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                          edgecolor="red", linewidth=1.5))
    for a in ax[:2]:
        a.set_xlabel("pixel column")
        a.set_ylabel("pixel row")
    for a in ax[2:]:
        a.set_xlabel("map column")
        a.set_ylabel("map row")
    shape = f"{res['patch'][0]}x{res['patch'][1]}" if res.get("patch") else None
    fig.suptitle(f"{defense_key}, patch {patch}" + (f" ({shape})" if shape and shape != patch else "")
                 + ("; red: patch / score-map cells it can reach" if shape else ""), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
