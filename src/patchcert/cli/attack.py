"""``patchcert attack``: heuristic patch attacks (BagCert A.2 and a stronger setting) beside
the certificates: empirical robust accuracy (an upper bound) next to certified accuracy (a
lower bound), and a loud SOUNDNESS FAILURE if a certified image is ever broken."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PatchcertError
from ..rundir import append_jsonl, check_resume, hold, read_jsonl

log = logging.getLogger("patchcert.cli.attack")

RECORDS = "records.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
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
run directory (--out DIR): config.json, records.jsonl (one line per example, per batch),
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
    t.add_argument("--defense", action="append", metavar="SPEC", help="defense spec, repeatable (default: voting)")
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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "x"


def _save_png(path: Path, image, adv, votes_clean, votes_adv, res_i: dict, label: int, pred: int,
              classes: list[str], defense_key: str, patch: str, certified: bool, reach, what: str = "votes") -> None:
    """Original (patch outlined) / attacked / the target class's region scores (votes for
    voting) before and after the attack, the cells the patch can reach outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    def name(c: int) -> str:
        return classes[c] if 0 <= c < len(classes) else str(c)

    fig, ax = plt.subplots(1, 4, figsize=(13, 3.6))
    ax[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax[0].set_title(f"original: {name(label)}\ndefended pred {name(pred)}" + (" (certified)" if certified else ""),
                    fontsize=9)
    ax[1].imshow(adv.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    if not res_i["attacked"]:
        ax[1].set_title("not attacked\n(already misclassified)", fontsize=9)
    else:
        ok = "attack succeeded" if res_i["success"] else "attack failed"
        ax[1].set_title(f"attacked: pred {name(res_i['adv_pred'])}\n{ok}", fontsize=9,
                        color="red" if res_i["success"] else "black")
    tgt = res_i.get("target")
    who = f"target {name(tgt)}" if tgt is not None else f"predicted {name(pred)}"
    lo = float(min(votes_clean.min(), votes_adv.min()))
    hi = float(max(votes_clean.max(), votes_adv.max()))
    for k, (v, title) in enumerate(((votes_clean, "before"), (votes_adv, "after"))):
        im = ax[2 + k].imshow(v.numpy(), cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-9), interpolation="nearest")
        ax[2 + k].set_title(f"{what} of {who}\n({title} the attack)", fontsize=9)
        fig.colorbar(im, ax=ax[2 + k], fraction=0.046, pad=0.04)
    if res_i.get("pixel") is not None:
        (py, px), (ph, pw) = res_i["pixel"], res_i["patch"]
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
    shape = f"{res_i['patch'][0]}x{res_i['patch'][1]}" if res_i.get("patch") else None
    fig.suptitle(f"{defense_key}, patch {patch}" + (f" ({shape})" if shape and shape != patch else "")
                 + ("; red: patch / score-map cells it can reach" if shape else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    md = summary["metadata"]
    t = Table(title=f"patch attack: {md['model']} on {md['data'].get('name', '?')}, n={summary['n']}, "
                    f"{'strong' if md['attack'].get('strong') else 'BagCert A.2'} attack", title_justify="left")
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

def run(args: argparse.Namespace) -> int:
    from ..certify import DTYPES, _state_dict_sha256, plan_threat
    from ..checkpoint import file_sha256
    from ..data import to_float
    from ..loader import load_batches
    from ..runtime import harden, resolve_device
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
    geom = model.geometry
    image_size = data.image_size
    if int(model.num_classes) != data.num_classes:
        raise PatchcertError(f"the model has {model.num_classes} classes but {data.name} has {data.num_classes}")
    if geom.input_size is not None and tuple(geom.input_size) != tuple(image_size):
        raise PatchcertError(f"the model expects {geom.input_size[0]}x{geom.input_size[1]} images but {data.name} "
                             f"has {image_size[0]}x{image_size[1]}")
    if args.start >= len(data):
        raise PatchcertError(f"--start {args.start} is past the end of {data.name} ({len(data)} examples)")
    n = len(data) - args.start if args.num_examples is None else args.num_examples
    if args.start + n > len(data):
        raise PatchcertError(f"{n} examples from {args.start} exceed the {len(data)} examples of {data.name}")
    # exactly the defenses `certify` builds for this model (wrap-around windows on DS maps)
    defenses, patches = plan_threat(args.defense or ["voting"], args.patch or ["5x5"], geom, image_size)
    dtype = DTYPES[args.dtype]
    model.eval()

    ckpt = getattr(model, "checkpoint_path", None)
    config = {
        "format": 1, "kind": "attack",
        "model": str(getattr(model, "arch", type(model).__name__)),
        "model_sha256": file_sha256(ckpt) if ckpt else _state_dict_sha256(model),
        "model_hash_of": "file" if ckpt else "state_dict", "checkpoint": str(ckpt) if ckpt else None,
        "model_config": dict(getattr(model, "config", {}) or {}),
        "data": {"name": data.name, "num_examples_total": len(data), **data.info},
        "start": args.start, "num_examples": n, "split": args.split,
        "defenses": [{"key": d.key, "config": d.config} for d in defenses],
        "patches": [{"patch": p.text, "resolved": p.resolved, "windows": [list(w) for w in p.windows]} for p in patches],
        "attack": {**cfg.to_dict(), "strong": bool(args.strong)},
        "dtype": args.dtype, "batch_size": args.batch_size, "seed": args.seed,
        "geometry": geom.to_dict(), "image_size": list(image_size),
    }
    config = json.loads(json.dumps(config, default=str))
    out = Path(args.out or f"runs/attack-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with hold(out):  # one process per run folder, for the whole run
        return _run_held(args, out, config, model, data, geom, defenses, patches, cfg, dtype, device, n)


def _run_held(args, out: Path, config: dict, model, data, geom, defenses, patches, cfg, dtype, device, n: int) -> int:
    import torch

    from ..attacks import affected_mask, attack_and_check
    from ..checkpoint import atomic_write_text, versions
    from ..data import to_float
    from ..report import region_scores

    done: list[dict] = []
    if check_resume(out, config, args.resume, CONFIG, markers=(CONFIG, RECORDS)):
        done = read_jsonl(out / RECORDS, tail="repair")
        if [r.get("index") for r in done] != list(range(args.start, args.start + len(done))):
            raise PatchcertError(f"cannot resume {out}: records.jsonl does not hold the first examples in order")
    (out / SUMMARY).unlink(missing_ok=True)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    (out / RECORDS).touch()

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=len(done), desc="attack", unit="img", file=sys.stderr, dynamic_ncols=True)
    seconds: dict[str, float] = {}
    classes = list(data.classes)
    records = list(done)
    pos0 = args.start + len(done)
    batches = [range(lo, min(lo + args.batch_size, args.start + n)) for lo in range(pos0, args.start + n, args.batch_size)]
    images = load_batches(data, batches, args.workers, pin_memory=device.type == "cuda")
    try:
        for xb, yb, idx in images:
            x = to_float(xb.to(device))
            y = yb.to(device)
            with torch.no_grad():
                s32 = model.score_map(x).float()
            s = s32.to(dtype)
            und = s.mean((2, 3)).argmax(1)
            png_rows = [k for k, i in enumerate(idx.tolist()) if i - args.start < args.save_png]
            batch = [{"index": int(i), "label": int(y[k]), "clean_pred": int(und[k]), "defenses": {}}
                     for k, i in enumerate(idx.tolist())]
            for dp in defenses:
                d = dp.defense
                pred = d.predict(s)
                for k in range(len(batch)):
                    batch[k]["defenses"][dp.key] = {"pred": int(pred[k]), "correct": bool(pred[k] == y[k]),
                                                    "certified": {}, "attack": {}}
                for pp in patches:
                    t0 = time.perf_counter()
                    cert = d.certify(s, y, pp.windows)
                    chk = attack_and_check(model, d, x, y, pp.text, cfg, clean_scores=s32, indices=idx,
                                           keep_images=bool(png_rows), certified=cert, score_dtype=dtype)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    key = f"{dp.key}|{pp.text}"
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
                    res = chk.result
                    for k in range(len(batch)):
                        e = res.example(k)
                        e["soundness_failure"] = bool(chk.soundness_failure[k])
                        batch[k]["defenses"][dp.key]["certified"][pp.text] = bool(chk.certified[k])
                        batch[k]["defenses"][dp.key]["attack"][pp.text] = e
                    if png_rows:
                        with torch.no_grad():
                            adv_s = model.score_map(res.adv_images[png_rows]).to(dtype)
                        (ev_c, what), (ev_a, _) = region_scores(d, s[png_rows]), region_scores(d, adv_s)
                        for j, k in enumerate(png_rows):
                            e = batch[k]["defenses"][dp.key]["attack"][pp.text]
                            tgt = e["target"] if e["target"] is not None else int(pred[k])
                            reach = None
                            if e["pixel"] is not None:
                                reach = affected_mask(geom, torch.tensor([e["pixel"][0]]), torch.tensor([e["pixel"][1]]),
                                                      e["patch"][0], e["patch"][1], tuple(s.shape[-2:]))[0]
                            _save_png(out / "png" / f"{int(idx[k]):06d}_{_safe(dp.key)}_{_safe(pp.text)}.png",
                                      x[k].cpu(), res.adv_images[k].cpu(), ev_c[j, tgt].cpu(), ev_a[j, tgt].cpu(), e,
                                      int(y[k]), int(pred[k]), classes, dp.key, pp.text, bool(chk.certified[k]), reach,
                                      what)
            append_jsonl(out / RECORDS, [json.dumps(r, separators=(",", ":"), allow_nan=False) for r in batch])
            records.extend(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        images.close()  # stops DataLoader workers early if the loop raised
        if bar is not None:
            bar.close()

    # ---- summary ----------------------------------------------------------------------
    results = []
    failures: list[tuple[str, str, int]] = []
    for dp in defenses:
        for pp in patches:
            outs = [r["defenses"][dp.key] for r in records]
            att = [o["attack"][pp.text] for o in outs]
            correct = sum(o["correct"] for o in outs)
            certified = sum(o["certified"][pp.text] for o in outs)
            robust = sum(o["correct"] and not a["success"] for o, a in zip(outs, att))
            broken = sum(a["attacked"] and a["success"] for a in att)
            sf = [r["index"] for r, a in zip(records, att) if a["soundness_failure"]]
            failures += [(dp.key, pp.text, i) for i in sf]
            key = f"{dp.key}|{pp.text}"
            new = len(records) - len(done)
            results.append({
                "defense": dp.key, "patch": pp.text, "resolved": pp.resolved,
                "clean_accuracy": correct / n, "certified_accuracy": certified / n, "robust_accuracy": robust / n,
                "attack_success_rate": broken / correct if correct else None,
                "soundness_failures": len(sf), "soundness_failure_indices": sf[:100],
                "n": n, "num_correct": correct, "num_certified": certified, "num_robust": robust,
                "mean_steps": sum(a["steps"] for a in att) / n,
                "attack_seconds_per_image": seconds[key] / new if new and key in seconds else None,
                "defense_config": dp.config,
            })
    summary = {"n": n, "results": results, "soundness_failures": len(failures),
               "metadata": {**{k: config[k] for k in ("model", "model_sha256", "model_hash_of", "checkpoint",
                                                        "model_config", "data",
                                                        "start", "geometry", "image_size", "dtype", "seed")},
                            "num_examples": n, "attack": config["attack"], "device": str(device),
                            "versions": versions(), "command": "patchcert " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "kind": "attack"}}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")

    if args.json:
        short = {"n": n, "results": [{k: r[k] for k in ("defense", "patch", "clean_accuracy", "certified_accuracy",
                                                          "robust_accuracy", "attack_success_rate", "soundness_failures")}
                                     for r in results], "soundness_failures": len(failures)}
        sys.stdout.flush()
        print(json.dumps(short), flush=True)
    else:
        _print_table(summary)
        print(f"run directory: {out}")
    if failures:
        lines = [f"patchcert attack: SOUNDNESS FAILURE: the attack broke {len(failures)} example(s) that the defense "
                 "CERTIFIED. A certificate (or the model's declared receptive field) is wrong:"]
        for key, patch, i in failures[:20]:
            lines.append(f"  example {i}: {key}, patch {patch}")
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more (see {out / RECORDS}, 'soundness_failure')")
        lines.append("  Do not trust certified accuracies from this defense until this is fixed; please report it.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        return EXIT_SOUNDNESS
    return 0
