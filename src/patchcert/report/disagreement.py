"""Where a pixel defense (double masking) fails, per example, straight from a certify run.

No score file and no model are needed: a double-masking record names the first mask pair that
disagrees with the label and the masks whose one-mask prediction disagrees
(:class:`patchcert.results.MaskPairCase`); the defense, rebuilt from the run's config for the
run's threat, turns that into a map over the image (:meth:`PixelDefense.disagreement`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import PatchcertError
from .load import CertifyRunData
from .plots import _figure

__all__ = ["pixel_rows", "plot_disagreement"]


def pixel_rows(run: CertifyRunData, patch: str | None = None) -> list[Any]:
    """The run's summary rows of pixel defenses (for ``patch``, default: the run's first patch)."""
    from ..defenses import defense_class

    results = run.summary.results
    patch = patch or (results[0].patch if results else None)
    return [r for r in results if r.patch == patch
            and defense_class(str(r.defense_config.get("name"))).evidence_source == "images"]


def _rebuild(run: CertifyRunData, row: Any) -> Any:
    """The defense as the run built it (same options, same threat, hence the same mask set)."""
    from ..geometry import Geometry
    from ..planning import plan_threat
    from ..specs import DefenseSpec

    md = run.summary.metadata
    cfg = dict(row.defense_config)
    name = str(cfg.pop("name"))
    from ..defenses import defense_class

    opts = defense_class(name).options_from_json(cfg)
    patches = list(dict.fromkeys(r.patch for r in run.summary.results))
    try:
        plans, _ = plan_threat([DefenseSpec(name, opts, name)], patches, Geometry.from_dict(md.geometry),
                               (int(md.image_size[0]), int(md.image_size[1])))
    except PatchcertError as e:
        raise PatchcertError(f"{run.path}: cannot rebuild defense {row.defense} ({e})") from None
    return plans[0].defense


def plot_disagreement(run: CertifyRunData, indices: Sequence[int], out_dir: str | os.PathLike,
                      patch: str | None = None, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """One PNG per example: per pixel defense (rows), the image with the masks of the first
    failing pair outlined, and how many disagreeing one-mask predictions cover each pixel."""
    from matplotlib.patches import Rectangle

    from .vulnerability import _load_images

    rows = pixel_rows(run, patch)
    if not rows:
        return []
    patch = rows[0].patch
    recs = {r.index: r for r in run.records}
    missing = [i for i in indices if i not in recs]
    if missing:
        raise PatchcertError(f"{run.path}: example index(es) {', '.join(map(str, missing[:5]))} are not in the run")
    md = run.summary.metadata
    defenses = [_rebuild(run, r) for r in rows]
    images, classes = _load_images(md, list(indices), data_dir)
    classes = classes or list(md.classes) or None

    def cname(c: int) -> str:
        return classes[c] if classes and 0 <= c < len(classes) else str(c)

    written = []
    for idx in indices:
        fig = _figure((9, 3.9 * len(rows)))
        axes = fig.subplots(len(rows), 2, squeeze=False)
        for (r, d), (a0, a1) in zip(zip(rows, defenses), axes):
            rec = recs[idx]
            o = rec.defenses[r.defense]
            worst = o.worst.get(patch)
            if idx in images:
                a0.imshow(images[idx].permute(1, 2, 0).numpy(), interpolation="nearest")
            cert = o.certified.get(patch, False)
            a0.set_title(f"#{idx}: label {cname(rec.label)}, pred {cname(o.pred)}\n"
                         f"{'CERTIFIED' if cert else 'not certified'} vs {patch}", fontsize=9)
            drawn = d.disagreement(worst)
            if drawn is None:
                a1.text(0.5, 0.5, "every mask pair agrees with the label" if cert else "no failing mask pair",
                        ha="center", va="center", transform=a1.transAxes)
                a1.set_title(r.defense, fontsize=9)
                continue
            heat, rects = drawn
            im = a1.imshow(heat.numpy(), cmap="magma", interpolation="nearest", vmin=0)
            fig.colorbar(im, ax=a1, fraction=0.046, pad=0.04, label="disagreeing one-mask predictions")
            for t, left, h, w in rects:
                for a in (a0, a1):
                    a.add_patch(Rectangle((left - 0.5, t - 0.5), w, h, fill=False, edgecolor="cyan", linewidth=1.8))
            a1.set_title(f"{r.defense}: first failing pair {tuple(worst.pair)} -> {cname(worst.cls)}\n"
                         f"{'the first round already disagrees' if worst.first_round else 'first round agrees'}",
                         fontsize=9)
        fig.suptitle(f"{run.name}: example {idx}; cyan = masks of the first pair that disagrees with the label",
                     fontsize=10)
        fig.tight_layout()
        p = Path(out_dir) / f"masks_{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}_{idx}.png"
        fig.savefig(p, dpi=110)
        written.append(p)
    return written
