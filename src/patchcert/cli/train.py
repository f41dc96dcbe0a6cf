"""``patchcert train``: train a region scorer from a config file and/or flags.

Under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=N -m patchcert train ...``
or ``torchrun --no-python --nproc_per_node=N patchcert train ...``) every process runs this
verb; the loop sets up DistributedDataParallel, rank 0 writes the run directory and shows
progress, and only rank 0 prints the final metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from typing import Any

from ..errors import PatchcertError

FLAG_FIELDS = [("out", "out_dir"), ("model", "model"), ("objective", "objective"), ("dataset", "dataset"),
               ("data_dir", "data_dir"), ("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
               ("seed", "seed"), ("device", "device")]


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    """Make argparse errors of this verb (bad values, unknown options) one line + exit 2."""

    def error(message: str) -> typing.NoReturn:
        print(f"patchcert train: error: {message} (see patchcert train --help)", file=sys.stderr)
        sys.exit(2)

    orig = p.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns, extras = orig(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    p.error = error  # type: ignore[method-assign]
    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (BagCert, PatchGuard, DS, cross-entropy)",
                       description="Train per a TOML/JSON config; flags override it. Resumable; torchrun-aware "
                                   "(python -m torch.distributed.run --nproc_per_node=N -m patchcert train ...).")
    p.add_argument("--config", help="TOML or JSON file with TrainConfig fields")
    p.add_argument("--out", help="run directory (default: from config)")
    p.add_argument("--model", help="registered model name (see patchcert models)")
    p.add_argument("--objective", help="bagcert | patchguard | ce | ds | mask_cutout (double masking)")
    p.add_argument("--dataset", help="cifar10 | imagenette | imagefolder:PATH | synthetic")
    p.add_argument("--data-dir", help="data folder (default: $PATCHCERT_DATA)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field; VALUE is JSON (e.g. model_cfg='{\"rf\":7,\"width\":32}'); "
                        "text fields also take a bare word")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--stop-after", type=int, metavar="EPOCH", help="end this call after EPOCH (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print every training option (TrainConfig field) with its default and meaning, then exit; "
                        "with --config/flags: the resolved values")
    p.set_defaults(func=run)
    _one_line_errors(p)


def _parse_set(items: list[str], d: dict[str, Any]) -> None:
    from ..train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for item in items:
        if "=" not in item:
            raise PatchcertError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in hints:
            raise PatchcertError(f"--set: unknown training option {k!r}")
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError as e:
            if str in typing.get_args(hints[k]) or hints[k] is str:
                d[k] = v  # a bare word for a text field
            else:
                raise PatchcertError(f"--set {k}: value is not valid JSON ({e.msg} at char {e.pos}): {v!r}") from None


def build_config(args: argparse.Namespace):
    """The TrainConfig of the config file + flags + ``--set`` (later ones win)."""
    from ..train import TrainConfig

    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    d = dict(vars(cfg))
    for flag, key in FLAG_FIELDS:
        v = getattr(args, flag)
        if v is not None:
            d[key] = v
    _parse_set(args.set, d)
    cfg = TrainConfig.from_dict(d)
    cfg.validate()
    if args.stop_after is not None and args.stop_after < 1:
        raise PatchcertError(f"--stop-after must be a positive epoch, got {args.stop_after}")
    return cfg


def _print_config(args: argparse.Namespace) -> int:
    """Every TrainConfig field: name, type, default (and the resolved value if a config/flag sets
    it) and meaning; ends with how to train a finished run longer."""
    from ..train.options import EXTEND_HINT, describe_config

    resolved = vars(build_config(args)) if (args.config or args.set or any(getattr(args, f) is not None
                                                                          for f, _ in FLAG_FIELDS)) else None
    lines = []
    for f in describe_config():
        val = json.dumps(f["default"])
        if resolved is not None and resolved[f["name"]] != f["default"]:
            val = f"{json.dumps(resolved[f['name']])} (default {val})"
        lines.append(f"{f['name']} = {val}  [{f['type']}]\n    {f['help']}")
    print("\n".join(lines))
    print(f"\nset a field in a TOML/JSON --config file or with --set KEY=VALUE; {EXTEND_HINT}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..train import train

    if args.print_config:
        return _print_config(args)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # other torchrun ranks: warnings and errors only
        logging.getLogger("patchcert").setLevel(logging.WARNING)
    cfg = build_config(args)
    bar = None

    def progress(done: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
        bar.update(1)
        if done % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    on_step = progress if not args.no_progress and rank == 0 else None
    try:
        metrics = train(cfg, resume=args.resume, on_step=on_step, stop_after_epoch=args.stop_after)
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        from ._output import print_json

        print_json("train", [{"out_dir": cfg.out_dir, **metrics}], out_dir=cfg.out_dir)
    return 0
