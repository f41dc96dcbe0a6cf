"""Training and inference throughput of ``bagcert_cifar`` on this CPU (images/s), with ratios.

Variants (per width): ``fp32`` (NCHW), ``fp32+cl`` (channels_last), ``bf16+cl`` (bf16 autocast
+ channels_last), ``bf16`` (bf16 autocast, NCHW), and ``torch.compile`` for inference
(``compile-fp32+cl``, ``compile-bf16+cl``). A training step is what ``patchcert train`` runs:
forward, BagCert margin loss, backward, Adam step. Inference is ``model.score_map`` in eval
mode under ``torch.inference_mode``.

glibc's allocator tuning (``patchcert.runtime.tune_allocator``) is process-wide and cannot
be undone, so every (allocator, width) group runs in its own child process: ``default``
(``PATCHCERT_NO_MALLOPT=1``) and ``tuned``. Ratios are against ``fp32`` with the default
allocator at the same width, all measured in the same invocation.

    python benchmarks/bench_train.py                       # full: widths 32/64/128 (minutes)
    python benchmarks/bench_train.py --widths 32 --iters 2 --warmup 1 --train-batch 8 --infer-batch 8  # smoke

Do not run the full benchmark while something else uses the CPU: the numbers would be
those of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

TRAIN_VARIANTS = ["fp32", "fp32+cl", "bf16", "bf16+cl"]
INFER_VARIANTS = ["fp32", "fp32+cl", "bf16", "bf16+cl", "compile-fp32+cl", "compile-bf16+cl"]


def _flags(variant: str) -> tuple[bool, bool, bool]:
    """(bf16, channels_last, compile) of a variant name."""
    return "bf16" in variant, variant.endswith("+cl"), variant.startswith("compile-")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant for one width in this process (allocator as set by the parent)."""
    import torch

    from patchcert.models import create_model
    from patchcert.runtime import tune_allocator
    from patchcert.train import bagcert_loss

    tuned = tune_allocator() if args.allocator == "tuned" else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {"width": args.width, "allocator": args.allocator, "tuned": tuned, "train": {}, "infer": {}}
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(args.train_batch, 3, 32, 32, generator=g)
    yt = torch.randint(0, 10, (args.train_batch,), generator=g)
    xi = torch.rand(args.infer_batch, 3, 32, 32, generator=g)

    def timed(fn, n_img: int) -> float:
        for _ in range(args.warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        return n_img * args.iters / (time.perf_counter() - t0)

    for v in args.train_variants:
        bf16, cl, _ = _flags(v)
        model = create_model("bagcert_cifar", num_classes=10, rf=args.rf, width=args.width)
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = xt.contiguous(memory_format=fmt)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                s = model(x)
            loss = bagcert_loss(s, yt, margin=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            out["train"][v] = timed(step, args.train_batch)
        except Exception as e:  # report, keep measuring the others
            out["train"][v] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    for v in args.infer_variants:
        bf16, cl, comp = _flags(v)
        model = create_model("bagcert_cifar", num_classes=10, rf=args.rf, width=args.width).eval()
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = xi.contiguous(memory_format=fmt)
        fn = model.score_map
        if comp:
            if args.no_compile:
                continue
            fn = torch.compile(model.score_map)

        def infer() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fn(x)

        try:
            if comp:
                t0 = time.perf_counter()
                infer()  # compilation
                out.setdefault("compile_seconds", {})[v] = time.perf_counter() - t0
            out["infer"][v] = timed(infer, args.infer_batch)
        except Exception as e:
            out["infer"][v] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def _fmt(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--rf", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=96)
    p.add_argument("--infer-batch", type=int, default=250)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--allocators", nargs="+", default=["default", "tuned"], choices=["default", "tuned"])
    p.add_argument("--train-variants", nargs="+", default=TRAIN_VARIANTS, choices=TRAIN_VARIANTS)
    p.add_argument("--infer-variants", nargs="+", default=INFER_VARIANTS, choices=INFER_VARIANTS)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--json", help="also write the raw results here")
    # internal: one measurement group in a child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--allocator", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    results = []
    for width in args.widths:
        for alloc in args.allocators:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if alloc == "default":
                env["PATCHCERT_NO_MALLOPT"] = "1"
            else:
                env.pop("PATCHCERT_NO_MALLOPT", None)
            cmd = [sys.executable, __file__, "--child", "--width", str(width), "--allocator", alloc,
                   "--rf", str(args.rf), "--threads", str(args.threads), "--train-batch", str(args.train_batch),
                   "--infer-batch", str(args.infer_batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--train-variants", *args.train_variants, "--infer-variants", *args.infer_variants]
            if args.no_compile:
                cmd.append("--no-compile")
            print(f"# width {width}, allocator {alloc} ...", file=sys.stderr, flush=True)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))

    import torch

    print(f"bagcert_cifar RF {args.rf}; {args.threads} threads; batch {args.train_batch} train / {args.infer_batch} "
          f"inference; {args.iters} timed iterations after {args.warmup} warm-up; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}")
    print()
    print("| width | allocator | variant | train img/s | x fp32 | infer img/s | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        group = [r for r in results if r["width"] == width]
        base = next((r for r in group if r["allocator"] == "default"), group[0])
        b_tr, b_in = base["train"].get("fp32"), base["infer"].get("fp32")
        for r in group:
            for v in dict.fromkeys(list(r["train"]) + list(r["infer"])):
                tr, inf = r["train"].get(v, "-"), r["infer"].get(v, "-")
                rt = f"{tr / b_tr:.2f}" if isinstance(tr, float) and isinstance(b_tr, float) else "-"
                ri = f"{inf / b_in:.2f}" if isinstance(inf, float) and isinstance(b_in, float) else "-"
                print(f"| {width} | {r['allocator']} | {v} | {_fmt(tr)} | {rt} | {_fmt(inf)} | {ri} |")
    comp = [f"width {r['width']} {r['allocator']} {v}: {t:.0f} s" for r in results
            for v, t in r.get("compile_seconds", {}).items()]
    if comp:
        print()
        print("torch.compile time (first call): " + "; ".join(comp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("child", "width", "allocator")},
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
