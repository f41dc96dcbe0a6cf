"""``patchcert attack``: heuristic patch attacks (BagCert A.2 and a stronger setting) beside
the certificates: empirical robust accuracy (an upper bound) next to certified accuracy (a
lower bound), and a loud SOUNDNESS FAILURE if a certified image is ever broken."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from ..errors import PatchcertError
from .certify import default_defenses

log = logging.getLogger("patchcert.cli.attack")

EXIT_SOUNDNESS = 3

EPILOG = """\
Model, data, --defense and --patch take the same specs as `patchcert certify` (see its --help).
The attack (per defense x patch, on every correctly classified example):
  1. location and target: the placement and class with the smallest worst-case margin
     (BagCert Condition 3.2 / the defense's margin map) on the clean score map, mapped back
     to the pixel patch whose feature window it is;
  2. PGD on the patch pixels (--steps, --step-size, pixels in [0, 1]) on a smooth margin
     (BagCert's L_R with M=1 on a sigmoid relaxation of the votes);
  3. success = the real defended prediction changes, re-checked on a fresh forward pass.
--strong: 4 locations x 2 targets, 2 restarts (sigmoid and hinge surrogates), 200 steps
(each overridable). Results: robust accuracy = correct and not broken (an upper bound on
the true robust accuracy); certified accuracy is the lower bound. A certified example the
attack breaks is a SOUNDNESS FAILURE: reported loudly, exit status 3.
pixel defenses (double-masking, PatchCleanser): per correctly classified example, PGD on the
patch pixels (--steps of --step-size, --restarts random starts) against the undefended
classifier plus the masked images whose mask does not cover the patch, at --locations
placements (the corners of the masks of the first failing pair first, then random ones);
success = the real defended prediction changes.
run directory (--out DIR): config.json, records.jsonl (one line per example, per batch), progress.json,
summary.json (at the end), png/ (--save-png N). --resume continues an interrupted run.
--json: the last stdout line is {"n": N, "results": [{"defense", "patch", "clean_accuracy",
"certified_accuracy", "robust_accuracy", ...}], "soundness_failures": K}.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "attack", help="heuristic patch attack: empirical robust accuracy and a soundness check",
        description="Attack a model under patch defenses (BagCert A.2 and a stronger setting); "
                    "compare with the certificates.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .certify import add_model_data_arguments

    add_model_data_arguments(p.add_argument_group("model and data (as patchcert certify)"), scores=False)
    t = p.add_argument_group("threat and defenses (as patchcert certify)")
    t.add_argument("--defense", action="append", metavar="SPEC", help="defense spec, repeatable (default: voting; double-masking for a global classifier)")
    t.add_argument("--patch", action="append", metavar="SPEC", help="patch spec, repeatable (default: 5x5)")
    a = p.add_argument_group("attack")
    a.add_argument("--strong", action="store_true", help="several locations/targets, restarts, more steps")
    a.add_argument("--steps", type=int, help="PGD steps per attempt (default 100; strong 200)")
    a.add_argument("--step-size", type=float, help="PGD step on the gradient sign (default 0.025)")
    a.add_argument("--restarts", type=int, help="restarts per location/target (default 1; strong 2)")
    a.add_argument("--locations", type=int, metavar="K", help="placements tried per example (default 1; strong 4)")
    a.add_argument("--targets", type=int, help="target classes tried per placement (default 1; strong 2)")
    a.add_argument("--init", choices=["random", "grey", "image"], help="first patch init (default random)")
    a.add_argument("--surrogate", action="append", metavar="NAME",
                   help="smooth objective per restart (cycled): auto | defense (the defense's own relaxation) | "
                        "sigmoid | softmax | hinge | logits (default: the defense's choice)")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    r.add_argument("--batch-size", type=int, default=64, help="images per attack batch (default 64)")
    r.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the defense computations (the model runs in float32); default float64")
    r.add_argument("--seed", type=int, default=0, help="seed of the random patch initialisations (default 0)")
    r.add_argument("--out", metavar="DIR", help="run directory (default: runs/attack-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    o = p.add_argument_group("output")
    o.add_argument("--save-png", type=int, default=0, metavar="N",
                   help="write PNGs (original / attacked / votes) of the first N examples to DIR/png/")
    o.add_argument("--json", action="store_true", help="print the results as one JSON line (last line of stdout)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# -- helpers -----------------------------------------------------------------------------

def _with_certify_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` completed with the defaults of every ``patchcert certify`` option, so that its
    model/data helpers (reused here) find every attribute they read."""
    from . import certify

    p = argparse.ArgumentParser(add_help=False)
    certify.register(p.add_subparsers(dest="verb"))
    base = p.parse_args(["certify"])
    return argparse.Namespace(**{**vars(base), **vars(args)})


def _attack_config(args: argparse.Namespace):
    from ..attacks import PatchAttackConfig

    over: dict[str, Any] = {}
    for flag, key in (("steps", "steps"), ("step_size", "step_size"), ("restarts", "restarts"),
                      ("locations", "locations"), ("targets", "targets"), ("init", "init")):
        v = getattr(args, flag)
        if v is not None:
            over[key] = v
    if args.surrogate:
        over["surrogates"] = tuple(args.surrogate)
    over["seed"] = int(args.seed)
    return PatchAttackConfig.strong(**over) if args.strong else PatchAttackConfig(**over)


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    md = summary["metadata"]
    from ..defenses import defense_class

    def kind(r: dict) -> str:
        if defense_class(r["defense_config"]["name"]).evidence_source == "images":
            return "PGD through the defense"
        return "strong" if md["attack"].get("strong") else "BagCert A.2"

    kinds = [kind(r) for r in summary["results"]]
    kinds = list(dict.fromkeys(kinds))
    t = Table(title=f"patch attack: {md['model']} on {md['data'].get('name', '?')}, n={summary['n']}, "
                    f"{' / '.join(kinds) or 'BagCert A.2'} attack", title_justify="left")
    for col in ("defense", "patch", "clean", "certified (lower)", "robust (upper)", "attack success", "soundness",
                "s/img"):
        t.add_column(col, justify="left" if col in ("defense", "patch") else "right")
    for r in summary["results"]:
        sec = r.get("attack_seconds_per_image")
        t.add_row(r["defense"], r["patch"], f"{100 * r['clean_accuracy']:.2f}%", f"{100 * r['certified_accuracy']:.2f}%",
                  f"{100 * r['robust_accuracy']:.2f}%",
                  "-" if r["attack_success_rate"] is None else f"{100 * r['attack_success_rate']:.1f}%",
                  "[bold red]FAILED " + str(r["soundness_failures"]) + "[/]" if r["soundness_failures"] else "ok",
                  "-" if sec is None else f"{sec:.3f}")
    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(t)


# -- the verb ----------------------------------------------------------------------------

def _safe(name: str) -> str:
    """A defense key or patch spec as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "x"


def run(args: argparse.Namespace) -> int:
    from ..attacks.run import attack_dataset
    from ..runtime import harden, resolve_device
    from ._model_args import selection_kwargs
    from .certify import _load_model_and_data

    if args.num_examples is not None and args.num_examples < 1:
        raise PatchcertError(f"--num-examples must be positive, got {args.num_examples}")
    if args.batch_size < 1:
        raise PatchcertError(f"--batch-size must be positive, got {args.batch_size}")
    if args.start < 0:
        raise PatchcertError(f"--start must be non-negative, got {args.start}")
    if args.workers is not None and args.workers < 0:
        raise PatchcertError(f"--workers must be >= 0, got {args.workers}")
    if args.save_png < 0:
        raise PatchcertError(f"--save-png must be non-negative, got {args.save_png}")
    if args.resume and not args.out:
        raise PatchcertError("--resume needs --out DIR")
    cfg = _attack_config(args)
    device = resolve_device(args.device)
    harden(args.seed)
    model, data = _load_model_and_data(_with_certify_defaults(args), device)
    out = Path(args.out or f"runs/attack-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=done, desc="attack", unit="img", file=sys.stderr, dynamic_ncols=True)
        else:
            bar.update(done - bar.n)

    def draw(ex: Any) -> None:  # --save-png: the attack hands over each example, the report draws it
        from ..report import plot_attack_example

        plot_attack_example(out / "png" / f"{ex.index:06d}_{_safe(ex.defense)}_{_safe(ex.patch)}.png", ex.image,
                            ex.adv, ex.ev_clean, ex.ev_adv, ex.record, ex.label, ex.pred, ex.classes, ex.defense,
                            ex.patch, ex.certified, ex.reach, ex.evidence_name)

    try:
        res = attack_dataset(
            model, data, defenses=args.defense or default_defenses(model), patches=args.patch or ["5x5"], config=cfg,
            strong=bool(args.strong), batch_size=args.batch_size, device=device, dtype=args.dtype,
            num_examples=args.num_examples, start=args.start, out_dir=out, resume=args.resume,
            save_png=args.save_png, seed=args.seed,
            command="patchcert " + " ".join(shlex.quote(a) for a in sys.argv[1:]), progress=progress,
            num_workers=args.workers, on_example=draw if args.save_png else None, keep_records=False,
            **selection_kwargs(args))
    finally:
        if bar is not None:
            bar.close()
    summary = res.summary
    if args.json:
        from ._output import print_json

        rows = [{k: r[k] for k in ("defense", "patch", "clean_accuracy", "certified_accuracy", "robust_accuracy",
                                   "attack_success_rate", "soundness_failures")} for r in summary["results"]]
        print_json("attack", rows, n=summary["n"], soundness_failures=summary["soundness_failures"], out_dir=str(out))
    else:
        _print_table(summary)
        print(f"run directory: {out}")
    failures, count = res.failures, int(summary["soundness_failures"])
    if count:
        lines = [f"patchcert attack: SOUNDNESS FAILURE: the attack broke {count} example(s) that the defense "
                 "CERTIFIED. A certificate (or the model's declared receptive field) is wrong:"]
        for key, patch, i in failures[:20]:
            lines.append(f"  example {i}: {key}, patch {patch}")
        if count > 20:
            lines.append(f"  ... and {count - 20} more (see {out / 'records.jsonl'}, 'soundness_failure')")
        lines.append("  Do not trust certified accuracies from this defense until this is fixed; please report it.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        return EXIT_SOUNDNESS
    return 0
