"""``patchcert train``: train a region scorer from a config file and/or flags."""

from __future__ import annotations

import argparse
import json

from ..errors import PatchcertError


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (BagCert, PatchGuard, DS, cross-entropy)",
                       description="Train per a TOML/JSON config; flags override it. Resumable; torchrun-aware.")
    p.add_argument("--config", help="TOML or JSON file with TrainConfig fields")
    p.add_argument("--out", help="run directory (default: from config)")
    p.add_argument("--model", help="registered model name")
    p.add_argument("--objective", help="training objective")
    p.add_argument("--dataset", help="cifar10 | imagenette | imagefolder:PATH | synthetic")
    p.add_argument("--data-dir", help="data folder (default: $PATCHCERT_DATA)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field; VALUE is JSON (e.g. model_cfg='{\"rf\":7,\"width\":32}')")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    d = {k: v for k, v in vars(cfg).items()}
    for flag, key in [("out", "out_dir"), ("model", "model"), ("objective", "objective"), ("dataset", "dataset"),
                      ("data_dir", "data_dir"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("lr", "lr"), ("seed", "seed"), ("device", "device")]:
        v = getattr(args, flag)
        if v is not None:
            d[key] = v
    for item in args.set:
        if "=" not in item:
            raise PatchcertError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    if d.get("epochs") is not None and d["epochs"] < 1:
        raise PatchcertError("--epochs must be positive")
    cfg = TrainConfig.from_dict(d)
    bar = None
    on_step = None
    if not args.no_progress:
        from tqdm import tqdm

        def on_step(done: int, total: int, loss: float) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
            bar.update(1)
            if done % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
    try:
        metrics = train(cfg, resume=args.resume, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({"out_dir": cfg.out_dir, **metrics}))
    return 0
