"""``patchcert certify``: certify a model (or cached score maps) on a dataset against every
requested defense and patch; resumable, shardable (``--shard``, torchrun), mergeable."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import PatchcertError

log = logging.getLogger("patchcert.cli.certify")

EPILOG = """\
defense specs (--defense, repeatable; default: voting, or double-masking for a model whose
score map is one cell, e.g. --model doublemask_cifar10):
  NAME[:KEY=VALUE[,KEY=VALUE...]]   values: int, float, true/false, none, AxB (a pair),
                                    lo:hi (a numeric range), anything else is a string
  voting                            BagCert: sign votes, Condition 3.2 (exact per window)
  voting:condition=3.3              the global condition (De-randomized smoothing's rule)
  voting:binarize=argmax            one vote per location;  voting:binarize=0.2  DS threshold
  masking:threshold=0.0,features=logits
                                    PatchGuard robust masking; features logits|confidence|
                                    prediction, clip_max=..., window=11x11 (feature window;
                                    default: the smallest window covering every --patch's
                                    windows; a patch window outside it is never certified)
  clipping:clip=tanh                Clipped BagNet, tanh(0.05u-1);  clipping:clip=-1:1  clamp
  double-masking:k=6,fill=0.5       PatchCleanser double masking on pixels, any classifier:
                                    k masks per axis, masked pixels = fill; patch=5x5 (the
                                    threat its mask set is built for; default: the --patch
                                    threats); bf16=true runs the masked images in bf16;
                                    flip=true certifies the mean of the logits on the image
                                    and its mirror (default defense for a global-receptive-
                                    field model; a checkpoint's measured options apply)
patch specs (--patch, repeatable; default: 5x5):
  5x5 | 24x1 | 5 (square) | 2% (square covering 2% of the image) | area=24 (every rectangle
  of 24 pixels; certified = against all of them, per-rectangle results in the records)
models (--model): a checkpoint file (.safetensors; legacy .pth only as plain tensors), a
  shipped pretrained name (patchcert.pretrained), or a registry name (randomly initialised,
  with a warning; --model-cfg '{"width": 32}'). Default: the shipped CIFAR-10 model.
  Your own classifier (float images in [0, 1] -> logits [N, K]; double masking only):
  --model mynet.py:build | mypkg.nets:build | torchvision:resnet18 | timm:resnet18 (FACTORY
  called with --model-cfg's options), --weights w.safetensors (or a state dict .pt),
  --mean/--std imagenet|cifar10|none|0.5,0.5,0.5; classes from its output, size from the data.
selection: --start/-n (first examples), --indices 3,17,40-49, --subset random:N (seeded by
  --seed, recorded, resumable; -n/--start then count within the selection).
run directory (--out RUN): records.jsonl (one JSON object per example, written per batch),
  progress.json, config.json, and at the very end summary.json + summary.csv (absent =
  unfinished; --resume continues, with the same options). --shard i/n (0 <= i < n) writes RUN/shard-i-of-n/ with a
  contiguous block of batches; under torchrun every rank takes shard RANK/WORLD_SIZE and rank 0
  merges. --merge RUN joins finished shards into RUN/ (records identical to a single run).
--json: the last stdout line is one JSON object, {"verb": "certify", "n": N, "results":
  [{"defense", "patch", "clean_accuracy", "certified_accuracy"}, ...], "out_dir": RUN}
  (the shape every verb's --json shares; see the README).
"""


def default_defenses(model: Any) -> list[str]:
    """The model's default defenses (:func:`patchcert.defenses.default_defense_specs`)."""
    from ..defenses import default_defense_specs

    return default_defense_specs(getattr(model, "geometry", None))


def register(sub) -> None:
    p = sub.add_parser(
        "certify", help="certify a model or cached score maps against patch attacks",
        description="Certified accuracy of a model under patch defenses: per-example records and a summary.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_arguments(p.add_argument_group("model and data"), scores=True)
    t = p.add_argument_group("threat and defenses")
    t.add_argument("--defense", action="append", metavar="SPEC", help="defense spec, repeatable (see below)")
    t.add_argument("--patch", action="append", metavar="SPEC", help="patch spec, repeatable (see below)")
    t.add_argument("--square-cap", type=int, help="largest square side searched for largest_square "
                                                  "(default: the image's smaller side; 0 = skip)")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    r.add_argument("--batch-size", type=int, default=128, help="images per model pass (default 128)")
    r.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the defense computations (the model runs in float32); default float64")
    r.add_argument("--seed", type=int, default=0, help="seed (random models, synthetic data); recorded")
    r.add_argument("--out", metavar="RUN", help="run directory (default: runs/certify-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--shard", metavar="i/n", help="certify shard i of n (0-based) into RUN/shard-i-of-n/")
    r.add_argument("--merge", metavar="RUN", help="merge the finished shards of RUN and print the results")
    r.add_argument("--skip-bad-images", action="store_true",
                   help="record images that cannot be decoded as skipped (RUN/skipped.jsonl, listed in the "
                        "summary, in no count) instead of stopping at the first")
    r.add_argument("--save-scores", action="store_true", help="also write RUN/scores.safetensors (the score maps)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the results as one JSON line (last line of stdout)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_model_data_arguments(g, scores: bool = True) -> None:
    """The model and data options shared by ``patchcert certify`` and ``patchcert attack``."""
    g.add_argument("--model", help="checkpoint path, shipped pretrained name or registry name (default: shipped model)")
    g.add_argument("--model-cfg", metavar="JSON", help="options of a registry model, e.g. '{\"width\": 32}'")
    if scores:
        g.add_argument("--scores", metavar="FILE", help="certify cached score maps (scores.safetensors) instead of a model")
    g.add_argument("--dataset", help="cifar10 | imagenette | imagefolder:PATH | synthetic "
                                     "(default: the checkpoint's, else cifar10)")
    g.add_argument("--dataset-cfg", metavar="JSON", help="dataset loader options, e.g. '{\"pattern\": \"colour\"}' "
                                                        "(synthetic) or '{\"size\": 224, \"resize\": 256}' (folders)")
    g.add_argument("--data-dir", help="data folder (default: $PATCHCERT_DATA)")
    g.add_argument("--split", choices=["test", "train"], default="test", help="dataset split (default: test)")
    g.add_argument("--start", type=int, default=0, help="first example index (default 0)")
    g.add_argument("--num-examples", "-n", type=int, help="number of examples (default: all from --start)")
    from ._model_args import add_user_model_arguments

    add_user_model_arguments(g)
    g.add_argument("--workers", type=int, metavar="N",
                   help="data loader processes decoding images ahead of the model (default: 0 for in-memory "
                        "data such as CIFAR-10, min(4, cpus) for image folders)")


# -- model and data ----------------------------------------------------------------------

_CKPT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".tar", ".bin")


def _model_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return _json_object(args.model_cfg, "--model-cfg")


def _classify_model(name: str | None) -> str:
    """'pretrained-default' | 'checkpoint' | 'registry' | 'pretrained'."""
    from ..models import list_models
    from ..pretrained import list_pretrained

    if name is None:
        return "pretrained-default"
    if Path(name).suffix.lower() in _CKPT_SUFFIXES or os.sep in name or Path(name).exists():
        return "checkpoint"
    if name in list_models():
        return "registry"
    if name in {m["name"] for m in list_pretrained()}:
        return "pretrained"
    known = ", ".join(list_models())
    raise PatchcertError(f"unknown model {name!r}: not a file, a shipped model or a registry name ({known})")


def _checkpoint_dataset(model: Any) -> str | None:
    meta = getattr(model, "checkpoint_meta", None) or {}
    data = meta.get("data") if isinstance(meta, dict) else None
    if not isinstance(data, dict):
        return None
    ds = data.get("dataset")
    if ds in ("cifar10", "imagenette", "imagenet", "synthetic"):
        return ds
    if ds == "imagefolder" and data.get("root") and Path(str(data["root"])).is_absolute():  # older checkpoints
        return f"imagefolder:{data['root']}"
    return None


def _checkpoint_dataset_cfg(model: Any) -> dict[str, Any]:
    meta = getattr(model, "checkpoint_meta", None) or {}
    tc = meta.get("train_config") if isinstance(meta, dict) else None
    cfg = tc.get("dataset_cfg") if isinstance(tc, dict) else None
    return dict(cfg) if isinstance(cfg, dict) else {}


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PatchcertError(f"{flag} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PatchcertError(f"{flag} must be a JSON object")
    return obj


def _load_data(name: str, args: argparse.Namespace, num_classes: int | None, input_size: Any,
               ckpt_cfg: dict[str, Any] | None = None):
    """The dataset: loader options from the model (input size, classes), then the checkpoint's
    training ``dataset_cfg`` (same dataset only), then ``--dataset-cfg``."""
    from ..data import dataset_options, load_dataset

    user = _json_object(args.dataset_cfg, "--dataset-cfg")
    ckpt_cfg = ckpt_cfg or {}
    count = None if args.num_examples is None or args.num_examples < 1 else args.start + args.num_examples
    if name.startswith("imagefolder:") and args.split == "train":
        log.warning("--split is ignored for imagefolder:PATH: certifying the folder as it is")
    kw = dataset_options(name, count=count, num_classes=num_classes, image_size=input_size, seed=args.seed,
                         recorded=ckpt_cfg)
    kw.update(user)
    return load_dataset(name, args.data_dir, train=args.split == "train", **kw)


def _load_model_and_data(args: argparse.Namespace, device: Any):
    from ..models import create_model, load_model
    from ..pretrained import load_pretrained

    from ._model_args import check_user_model_args, is_user_model, load_user_model_and_data

    check_user_model_args(args)
    if getattr(args, "indices", None) or getattr(args, "subset", None):  # -n counts within the selection
        args = argparse.Namespace(**{**vars(args), "num_examples": None})
    if is_user_model(args.model):
        return load_user_model_and_data(args, device, _load_data)
    kind = _classify_model(args.model)
    cfg = _model_cfg(args)
    if cfg and kind != "registry":
        raise PatchcertError("--model-cfg applies only to a registry model name (a checkpoint carries its config)")
    if kind == "registry":
        ds = args.dataset or "cifar10"
        ncls = cfg.pop("num_classes", None)
        if ds == "synthetic":  # synthetic data follows the model
            model = create_model(args.model, num_classes=10 if ncls is None else ncls, **cfg)
            data = _load_data(ds, args, model.num_classes, model.geometry.input_size)
        else:
            data = _load_data(ds, args, None, None)
            model = create_model(args.model, num_classes=data.num_classes if ncls is None else ncls, **cfg)
        log.warning("model %r is randomly initialised (seed %s): its certificates say nothing about a "
                    "trained model; pass a checkpoint to --model", args.model, args.seed)
        return model.to(device), data
    if kind == "checkpoint":
        with warnings.catch_warnings():  # torch's note on a legacy pickle's protocol: noise beside our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = load_model(args.model, device=device)
    else:
        model = load_pretrained(args.model if kind == "pretrained" else None, device=device)
    ckpt_ds = _checkpoint_dataset(model)
    ds = args.dataset or ckpt_ds or "cifar10"
    data = _load_data(ds, args, int(model.num_classes), model.geometry.input_size,
                      _checkpoint_dataset_cfg(model) if ds == ckpt_ds else None)
    return model, data


# -- output ------------------------------------------------------------------------------

def _print_table(summary: Any, run_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..certify import square_summary

    md = summary.metadata
    title = f"certified accuracy: {md.model} on {md.data.get('name', md.data.get('dataset', '?'))}, n={summary.n}"
    t = Table(title=title, title_justify="left")
    for col, kw in [("defense", {}), ("patch", {}), ("pixels", {}), ("window", {}),
                    ("clean", {"justify": "right"}), ("certified", {"justify": "right"}),
                    ("ms/img", {"justify": "right"})]:
        t.add_column(col, **kw)
    for r in summary.results:
        sec = r.certify_seconds_per_image
        res = r.resolved if len(r.resolved) <= 24 else r.resolved[:21] + "..."
        win = ",".join(f"{a}x{b}" for a, b in r.windows)
        win = win if len(win) <= 24 else win[:21] + "..."
        t.add_row(r.defense, r.patch, res, win, f"{100 * r.clean_accuracy:.2f}%",
                  f"{100 * r.certified_accuracy:.2f}%", "-" if sec is None else f"{1000 * sec:.3f}")
    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(t)
    fw = md.forward_seconds_per_image
    lines = [f"undefended accuracy {100 * summary.undefended_accuracy:.2f}%"
             + (f"; model forward {1000 * fw:.3f} ms/img" if fw is not None else "")
             + f"; {md.dtype} on {md.device}"]
    for k, curve in summary.square_curves.items():
        if curve:
            lines.append(f"{k}: {square_summary(curve)}")
        elif md.square_cap:
            lines.append(f"{k}: largest certified square not searched (this defense does not search squares)")
    if md.skipped:
        lines.append(f"skipped {len(md.skipped)} unreadable image(s), in no count (listed in summary.json): "
                     + ", ".join(str(s["index"]) for s in md.skipped[:5]) + (" ..." if len(md.skipped) > 5 else ""))
    if run_dir is not None:
        lines.append(f"run directory: {run_dir}")
    for ln in lines:
        con.print(ln, highlight=False)


def _emit(summary: Any, args: argparse.Namespace, run_dir: Path | None) -> None:
    if args.json:
        from ._output import print_json

        short = summary.short()
        print_json("certify", short.pop("results"), **short, out_dir=None if run_dir is None else str(run_dir))
    else:
        _print_table(summary, run_dir)


# -- the verb ----------------------------------------------------------------------------

def _dist_env() -> tuple[int, int]:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise PatchcertError("RANK/WORLD_SIZE are not integers") from None
    return rank, world


def _check_merge_flags(args: argparse.Namespace) -> None:
    """``--merge RUN`` with a flag it would ignore is refused (one line)."""
    given = [f for f, v in (("--shard", args.shard), ("--resume", args.resume), ("--out", args.out),
                            ("--save-scores", args.save_scores), ("--skip-bad-images", args.skip_bad_images),
                            ("--indices", args.indices), ("--subset", args.subset)) if v]
    if given:
        raise PatchcertError(f"--merge RUN joins finished shards; it takes no {', '.join(given)} "
                             "(finish a shard with --shard i/n --resume --out RUN first)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..certify import certify_dataset, parse_shard
    from ..results import load_scores, merge_shards
    from ..rundir import hold_for_job
    from ..runtime import harden, resolve_device
    from ._model_args import selection_kwargs

    if args.merge:
        _check_merge_flags(args)
        summary, _ = merge_shards(args.merge, keep_records=False)
        print(f"merged {summary.metadata.merged_from} shards into {args.merge}", file=sys.stderr)
        _emit(summary, args, Path(args.merge))
        return 0

    rank, world = _dist_env()
    distributed = world > 1
    if distributed and args.shard:
        raise PatchcertError("--shard cannot be combined with torchrun (every rank takes its own shard)")
    shard = (rank, world) if distributed else parse_shard(args.shard)
    if args.num_examples is not None and args.num_examples < 1:
        raise PatchcertError(f"--num-examples must be positive, got {args.num_examples}")
    if args.workers is not None and args.workers < 0:
        raise PatchcertError(f"--workers must be >= 0, got {args.workers}")
    if args.batch_size < 1:
        raise PatchcertError(f"--batch-size must be positive, got {args.batch_size}")
    if args.start < 0:
        raise PatchcertError(f"--start must be non-negative, got {args.start}")
    if shard is not None and not args.out:
        raise PatchcertError("sharded runs need --out RUN (the same for every shard)")
    if args.resume and not args.out:
        raise PatchcertError("--resume needs --out RUN")
    if args.scores and (args.model or args.dataset or args.model_cfg or args.dataset_cfg):
        raise PatchcertError("--scores certifies cached score maps: drop --model/--model-cfg/--dataset/--dataset-cfg")
    if args.scores and args.save_scores:
        raise PatchcertError("--save-scores needs a model (the scores are already in the file given to --scores)")
    out = args.out or f"runs/certify-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    device = resolve_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    harden(args.seed)
    started = False
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=_dt.timedelta(days=7))
        started = True
    try:
        if args.scores:
            model, data, sf = None, None, load_scores(args.scores)
        else:
            model, data = _load_model_and_data(args, device)
            sf = None
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if args.no_progress or rank != 0:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=done, desc="certify" + (f" shard {shard[0]}/{shard[1]}" if shard else ""),
                           unit="img", file=sys.stderr, dynamic_ncols=True)
            else:
                bar.update(done - bar.n)

        command = "patchcert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with contextlib.ExitStack() as stack:
            if distributed:  # rank 0 holds RUN for the whole job (every rank stops if it is busy)
                stack.enter_context(hold_for_job(out))
            try:
                result = certify_dataset(
                    model, data, scores=sf, defenses=args.defense or default_defenses(model), patches=args.patch or ["5x5"],
                    batch_size=args.batch_size, device=device, dtype=args.dtype, num_examples=args.num_examples,
                    start=args.start, shard=shard, out_dir=out, resume=args.resume, save_scores=args.save_scores,
                    square_cap=args.square_cap, seed=args.seed, command=command, progress=progress,
                    num_workers=args.workers, lock=not distributed, keep_records=False,
                    skip_bad_images=args.skip_bad_images, **selection_kwargs(args))
            finally:
                if bar is not None:
                    bar.close()
            if distributed:
                torch.distributed.barrier()
                if rank != 0:
                    return 0
                summary, _ = merge_shards(out, keep_records=False)
                _emit(summary, args, Path(out))
                return 0
        if shard is not None:
            print(f"shard {shard[0]}/{shard[1]} done in {result.out_dir}; when all shards are done: "
                  f"patchcert certify --merge {out}", file=sys.stderr)
        _emit(result.summary, args, result.out_dir)
        return 0
    finally:
        if started:
            torch.distributed.destroy_process_group()
