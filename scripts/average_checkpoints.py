"""Average the weights of checkpoints of one architecture (a uniform "model soup",
Wortsman et al., ICML 2022): fine-tunes of one model, averaged, often beat each of them.

    python scripts/average_checkpoints.py runs/soup/model.safetensors \
        src/patchcert/weights/doublemask_cifar10_v4.safetensors \
        runs/doublemask_cifar10_distill_ft/model.safetensors runs/doublemask_cifar10_centre_ft/model.safetensors

Every floating-point tensor (weights and BatchNorm running statistics) becomes the mean of the
inputs' (computed in float64, stored in the input's dtype); integer tensors (BatchNorm's
``num_batches_tracked``) are taken from the first input. The inputs must hold the same tensor
names and shapes, the same architecture and configuration and the same classes, or the script
stops with a one-line error. The output's metadata is the first input's, without its training
record, plus ``"soup"``: each input's file name and SHA-256 (the averaged model is trained by
nobody: evaluate it before trusting it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from patchcert.checkpoint import file_sha256, load_tensors, portable_metadata, save_tensors
from patchcert.errors import PatchcertError

#: metadata of one training run that does not describe an average
RUN_ONLY = ("epoch", "metrics", "eval", "train_config", "command", "training", "deployment", "sha256")


def average(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    if len(paths) < 2:
        raise PatchcertError("average: give at least two checkpoints")
    loaded = [load_tensors(p) for p in paths]
    t0, m0 = loaded[0]
    for p, (t, m) in zip(paths[1:], loaded[1:]):
        for key in ("arch", "config", "classes", "num_classes", "normalization"):
            if m.get(key) != m0.get(key):
                raise PatchcertError(f"average: {p} differs from {paths[0]} in {key!r}")
        if set(t) != set(t0):
            raise PatchcertError(f"average: {p} holds other tensors than {paths[0]} "
                                 f"({len(set(t) ^ set(t0))} names differ)")
        bad = [k for k in t if t[k].shape != t0[k].shape or t[k].dtype != t0[k].dtype]
        if bad:
            raise PatchcertError(f"average: {p}: tensor {bad[0]!r} differs in shape or dtype from {paths[0]}")
    out = {}
    for k, v in t0.items():
        if v.is_floating_point():
            stack = torch.stack([t[k].double() for t, _ in loaded])
            if not torch.isfinite(stack).all():
                raise PatchcertError(f"average: tensor {k!r} holds non-finite values")
            out[k] = stack.mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    meta = {k: v for k, v in portable_metadata(m0).items() if k not in RUN_ONLY}
    meta["soup"] = {"method": "uniform weight average (integer tensors from the first)",
                    "inputs": [{"file": p.name, "path": portable_metadata(str(p)), "sha256": file_sha256(p)}
                               for p in paths]}
    return out, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the averaged checkpoint (must not exist: nothing is overwritten)")
    ap.add_argument("inputs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    try:
        if a.out.exists():
            raise PatchcertError(f"average: {a.out} exists; choose a new file (nothing is overwritten)")
        tensors, meta = average(a.inputs)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(a.out, tensors, meta)
    except PatchcertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.out, file_sha256(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
