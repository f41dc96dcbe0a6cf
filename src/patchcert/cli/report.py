"""``patchcert report RUN [RUN...] --out DIR``: tables and plots from certify (and attack) runs."""

from __future__ import annotations

import argparse
import sys

from ..errors import PatchcertError

EPILOG = """\
RUN: a finished `patchcert certify --out RUN` directory; a run split with --shard i/n
(RUN/shard-i-of-n/) is merged in memory (all shards must be finished). Unfinished runs are
refused. Writes into DIR: report.md (everything), results.md and results.csv (one row per
run x defense x patch), and PNG plots:
  certified_vs_square_patch.png   from the records' largest_square (any certify run)
  certified_vs_aspect_ratio.png   needs per-rectangle results of one area:
                                  patchcert certify --patch area=24 ...  (or --patch 1x24 --patch 2x12 ...)
  clean_vs_certified.png          every run x defense x patch
  accuracy_bounds.png             with --attack DIR (a `patchcert attack --out DIR` run)
  vulnerability_<run>_<i>.png     score-map defenses, with --examples i,j,...; needs
                                  RUN/scores.safetensors (patchcert certify --save-scores) and the
                                  data (--data-dir)
  masks_<run>_<i>.png             pixel defenses (double masking), with --examples i,j,...: where
                                  the masks disagree with the label, straight from the records
                                  (no score file, no model; the image from --data-dir)
"""


def register(sub) -> None:
    p = sub.add_parser("report", help="tables and plots from certify/attack runs",
                       description="Merge shards, tabulate and plot certify runs (and attack runs).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN", help="certify run directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--attack", action="append", default=[], metavar="DIR",
                   help="attack run directory (patchcert attack --out DIR), repeatable: adds robust accuracy")
    p.add_argument("--examples", metavar="I,J,...", help="dataset indices for per-example maps (e.g. 0,1,2)")
    p.add_argument("--map-patch", metavar="SPEC", help="patch of the vulnerability maps (default: the run's first)")
    p.add_argument("--data-dir", help="data folder for the images of the maps (default: $PATCHCERT_DATA)")
    p.add_argument("--no-plots", action="store_true", help="no summary plots (vulnerability maps still with --examples)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line (last line of stdout)")
    p.set_defaults(func=run)


def _examples(text: str | None) -> list[int]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise PatchcertError(f"--examples expects comma-separated indices like 0,1,2, got {text!r}") from None
        if v < 0:
            raise PatchcertError(f"--examples: indices must be non-negative, got {v}")
        out.append(v)
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    from ..report import make_report

    if not args.runs and not args.attack:
        raise PatchcertError("give at least one RUN directory (or --attack DIR)")
    res = make_report(args.runs, args.out, attacks=args.attack, examples=_examples(args.examples),
                      map_patch=args.map_patch, data_dir=args.data_dir, plots=not args.no_plots)
    if args.json:
        from ._output import print_json

        print_json("report", [r.to_json() for r in res.rows], files=[str(f) for f in res.files])
        return 0
    from rich.console import Console
    from rich.table import Table

    has_att = any(r.robust_accuracy is not None for r in res.rows)
    t = Table(title="patchcert report", title_justify="left")
    cols = ["run", "defense", "patch", "n", "clean", "certified"] + (["robust (attack)"] if has_att else []) + ["ms/img"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("run", "defense", "patch") else "right")
    for r in res.rows:
        cells = [r.run, r.defense, r.patch, str(r.n), f"{100 * r.clean_accuracy:.2f}%", f"{100 * r.certified_accuracy:.2f}%"]
        if has_att:
            cells.append("" if r.robust_accuracy is None else f"{100 * r.robust_accuracy:.2f}%")
        sec = r.certify_seconds_per_image
        cells.append("" if sec is None else f"{1000 * sec:.3f}")
        t.add_row(*cells)
    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(t)
    for f in res.files:
        print(f"wrote {f}")
    for s in res.skipped:
        print(f"skipped {s}")
    return 0
