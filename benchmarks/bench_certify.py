"""End-to-end cost of ``certify`` against the model's forward pass plus data loading (issue 10).

    PATCHCERT_DATA=../shared/data python benchmarks/bench_certify.py -n 2000 --threads 2
    python benchmarks/bench_certify.py --dataset synthetic -n 256                 # no data needed

One process, the same images throughout (CIFAR-10 test, the shipped model unless --model or
--random-width is given). Measured, wall clock, in this order:

1. **data loading**: ``load_dataset`` + ``subset`` (what ``patchcert certify`` does before its
   loop);
2. **forward**: the model's score maps for every image, in batches of ``--batch-size`` (the
   baseline: what any certification has to pay);
3. ``certify_dataset`` writing a run directory (records, progress, summary) for two settings:
   the CLI default (``voting``, ``5x5``, largest-square search up to the image size) and the
   issue's setting (4 defenses x 2 patches, largest-square search on) -- each with the square
   search as shipped (``bisect``: bisection reusing the patches' certificates, the predictions
   and window classes) and with the straightforward reference (``scan``: every square size for
   every image). Both must give identical records (asserted). Runs keep no records in memory,
   as the CLI's (``keep_records=False``).

Reported: seconds and ms/image of each, and the ratio ``(data loading + certify run) / (data
loading + forward)`` -- the goal is <= 1.25 -- plus the per-defense breakdown (prediction,
certificate per patch, square search) from the run's own timers. ``--json`` prints the numbers
as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "cli-default": (["voting"], ["5x5"]),
    "issue-4x2": (["voting", "voting:condition=3.3", "clipping:clip=tanh", "masking"], ["2x2", "5x5"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--random-width", type=int, help="use a random bagcert_cifar (rf 7) of this width instead")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("-n", "--num-examples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128, help="as the CLI (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    p.add_argument("--no-scan", action="store_true", help="skip the straightforward square-search reference")
    p.add_argument("--json", action="store_true", help="print one JSON line with the numbers")
    args = p.parse_args(argv)

    import patchcert
    from patchcert.certify import certify_dataset
    from patchcert.checkpoint import load_model
    from patchcert.data import load_dataset, to_float
    from patchcert.pretrained import load_pretrained
    from patchcert.runtime import harden, tune_allocator

    tune_allocator()
    harden(0)
    torch.set_num_threads(args.threads)
    if args.random_width:
        model = patchcert.create_model("bagcert_cifar", num_classes=10, rf=7, width=args.random_width)
    elif args.model:
        model = load_model(args.model)
    else:
        model = load_pretrained()
    model.eval()

    t0 = time.perf_counter()
    if args.dataset == "synthetic":
        data = load_dataset("synthetic", n=args.num_examples, num_classes=model.num_classes, size=32)
    else:
        data = load_dataset(args.dataset, args.data_dir)
    data = data.subset(args.num_examples)
    t_load = time.perf_counter() - t0
    n = len(data)

    with torch.no_grad():  # warm-up, then the baseline forward pass over every image
        model.score_map(to_float(data.images[: args.batch_size]))
        t0 = time.perf_counter()
        for i in range(0, n, args.batch_size):
            model.score_map(to_float(data.images[i : i + args.batch_size]))
        t_fwd = time.perf_counter() - t0
    base = t_load + t_fwd
    out = {"n": n, "threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__,
           "data_loading_s": t_load, "forward_s": t_fwd, "forward_ms_per_image": 1000 * t_fwd / n, "runs": {}}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{n} images, {args.threads} thread(s), batch {args.batch_size}, torch {torch.__version__}")
    log(f"data loading {t_load:.2f} s; forward {t_fwd:.2f} s ({1000 * t_fwd / n:.3f} ms/img); "
        f"baseline (loading + forward) {base:.2f} s")
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        defenses, patches = SETTINGS[name]
        recs = {}
        for method in (["bisect"] if args.no_scan else ["bisect", "scan"]):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run = certify_dataset(model, data, defenses=defenses, patches=patches, batch_size=args.batch_size,
                                      device="cpu", out_dir=Path(tmp) / "run", square_method=method,
                                      keep_records=False)  # as the CLI: records only in records.jsonl
                wall = time.perf_counter() - t0
                recs[method] = (Path(tmp) / "run" / "records.jsonl").read_bytes()
            md = run.summary.metadata
            ratio = (t_load + wall) / base
            entry = {"defenses": defenses, "patches": patches, "wall_s": wall, "ms_per_image": 1000 * wall / n,
                     "ratio_to_loading_plus_forward": ratio,
                     "forward_ms_in_run": 1000 * (md.forward_seconds_per_image or 0.0), "parts_ms": {},
                     "certify_ms": {}, "certified": {}, "square_curves": run.summary.square_curves}
            log(f"\n[{name}, square search {method}] certify_dataset {wall:.2f} s ({1000 * wall / n:.3f} ms/img); "
                f"(loading + run) / (loading + forward) = {ratio:.3f}")
            for k, parts in md.defense_seconds_per_image.items():
                entry["parts_ms"][k] = {part: 1000 * (sec or 0.0) for part, sec in parts.items()}
                log("  " + k + ": " + ", ".join(f"{part} {1000 * (sec or 0.0):.3f}" for part, sec in parts.items())
                    + " ms/img")
            for r in run.summary.results:
                ms = 1000 * (r.certify_seconds_per_image or 0.0)
                entry["certify_ms"].setdefault(r.defense, {})[r.patch] = ms
                entry["certified"].setdefault(r.defense, {})[r.patch] = r.certified_accuracy
                log(f"  {r.defense} {r.patch}: certify {ms:.3f} ms/img ({100 * ms / out['forward_ms_per_image']:.1f}% "
                    f"of the forward pass), certified {100 * r.certified_accuracy:.2f}%")
            out["runs"][f"{name}/{method}"] = entry
        if "scan" in recs:
            assert recs["scan"] == recs["bisect"], f"{name}: bisect and scan records differ"
            a, b = out["runs"][f"{name}/bisect"], out["runs"][f"{name}/scan"]
            sq = lambda e: sum(p.get("largest_square", 0.0) for p in e["parts_ms"].values())  # noqa: E731
            log(f"  square search: bisect {sq(a):.3f} ms/img vs scan {sq(b):.3f} ms/img "
                f"({sq(b) / max(sq(a), 1e-9):.1f}x); identical records")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
