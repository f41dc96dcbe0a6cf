"""``patchcert convert``: import foreign weights (e.g. published BagNet ``.pth.tar``) safely."""

from __future__ import annotations

import argparse
import json

from ..errors import PatchcertError, not_found


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert foreign weights (.pth via weights_only, .safetensors) to a patchcert checkpoint",
        description="Read SRC with torch.load(weights_only=True) (or safetensors), check every tensor name and "
                    "shape against the registered model, and write a patchcert checkpoint (safetensors + JSON "
                    "metadata with the source's sha256). Example: patchcert convert bagnet16.pth.tar "
                    "--arch bagnet17 --out bagnet17.safetensors",
    )
    p.add_argument("src", help="source weights: .pth / .pth.tar / .pt (plain state dict) or .safetensors")
    p.add_argument("--arch", required=True, help="registered model name (see `patchcert models`)")
    p.add_argument("--out", required=True, help="output .safetensors file (a .json copy of the metadata is written beside it)")
    p.add_argument("--num-classes", type=int, help="expected number of classes (default: read from the file)")
    p.add_argument("--model-cfg", default=None, metavar="JSON",
                   help="model options as a JSON object, e.g. '{\"width\": 64}'")
    p.add_argument("--select-classes", default=None, metavar="LIST",
                   help="keep only these classifier rows: 'imagenette' (its 10 ImageNet classes) or indices '0,217,...'")
    p.add_argument("--classes", default=None, metavar="FILE", help="text file with one class name per line to record")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.convert import convert_checkpoint

    cfg = {}
    if args.model_cfg:
        try:
            cfg = json.loads(args.model_cfg)
        except json.JSONDecodeError as e:
            raise PatchcertError(f"--model-cfg is not valid JSON ({e.msg} at position {e.pos})") from None
        if not isinstance(cfg, dict):
            raise PatchcertError("--model-cfg must be a JSON object, e.g. '{\"width\": 64}'")
    names = None
    if args.classes:
        from pathlib import Path

        path = Path(args.classes)
        if not path.is_file():
            raise PatchcertError(not_found("--classes file", args.classes, folder=False))
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    res = convert_checkpoint(args.src, args.arch, args.out, num_classes=args.num_classes, model_cfg=cfg,
                             select_classes=args.select_classes, classes=names, overwrite=args.force)
    if args.json:
        from ._output import print_json

        print_json("convert", [{"out": res.out, "arch": res.arch, "config": res.config, "num_classes": res.num_classes,
                                "tensors": res.tensors, "filled_defaults": res.filled, "source": res.source}],
                   out=res.out)
        return 0
    from rich.console import Console

    con = Console(highlight=False)
    con.print(f"[green]wrote[/green] {res.out}: {res.arch} {res.config}, {res.num_classes} classes, "
              f"{res.tensors} tensors")
    con.print(f"  source {res.source['file']} sha256 {res.source['sha256']}")
    if res.filled:
        con.print(f"  {len(res.filled)} BatchNorm counters absent from the source kept their defaults")
    return 0
