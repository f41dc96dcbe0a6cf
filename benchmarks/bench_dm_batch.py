"""Double masking on the CPU: masked-image throughput by batch size and memory layout.

    PATCHCERT_DATA=../shared/data python benchmarks/bench_dm_batch.py --threads 2
    python benchmarks/bench_dm_batch.py --batch-sizes 64,128,256,512 --images 2048 --repeats 3

Measures what double masking's expensive pass does (``settled_table``: masked images through
the model under bf16 autocast, argmax) on two-mask images of real CIFAR-10 test images, with
the shipped ``doublemask_cifar10`` (or ``--model``), for every batch size and memory layout
(contiguous NCHW, the default, against channels_last), alternating the settings ``--repeats``
times so that the VM's speed changes hit all of them. The reference is the setting patchcert
used before this benchmark (batch 512, contiguous). Predictions are asserted identical across
batch sizes for one layout (a batch size changes nothing but speed); across layouts the number
of differing predictions is reported (bf16 kernels may round differently).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint or shipped name (default: doublemask_cifar10)")
    p.add_argument("--data-dir")
    p.add_argument("--images", type=int, default=2048, help="masked images per measurement (default 2048)")
    p.add_argument("--batch-sizes", default="32,64,128,256,512")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from patchcert.data import load_dataset, to_float
    from patchcert.masks import apply_masks, mask_set
    from patchcert.models import load_model
    from patchcert.pretrained import load_pretrained
    from patchcert.runtime import tune_allocator

    tune_allocator()
    model = load_model(args.model) if args.model and args.model.endswith(".safetensors") else load_pretrained(args.model or "doublemask_cifar10")
    model.eval()
    data = load_dataset("cifar10", data_dir=args.data_dir)
    table = mask_set((32, 32), (5, 5), 6).boolean()
    g = torch.Generator().manual_seed(0)
    n = args.images
    img = to_float(data.images[torch.randint(0, 1000, (n,), generator=g)])
    pair = torch.randint(0, table.shape[0], (n, 2), generator=g)
    xm = apply_masks(img, table[pair[:, 0]] | table[pair[:, 1]], 0.5)
    bf16 = not args.no_bf16
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    def run(bs: int, cl: bool) -> tuple[float, torch.Tensor]:
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        out = []
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for s in range(0, n, bs):
                xb = xm[s:s + bs]
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                o = m(xb).float()
                out.append((o.mean((2, 3)) if o.dim() == 4 else o).argmax(1))
        return n / (time.perf_counter() - t0), torch.cat(out)

    settings = [(bs, cl) for cl in (False, True) for bs in sizes]
    speed: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    preds: dict[tuple[int, bool], torch.Tensor] = {}
    run(64, False)  # warm-up
    run(64, True)
    for _ in range(args.repeats):
        for s in settings:
            v, pr = run(*s)
            speed[s].append(v)
            if s in preds:
                assert torch.equal(preds[s], pr), f"{s}: predictions changed between repeats"
            preds[s] = pr
    for cl in (False, True):
        ref = preds[(sizes[0], cl)]
        for bs in sizes:
            assert torch.equal(preds[(bs, cl)], ref), f"batch {bs} (channels_last={cl}) changed a prediction"
    differ = int((preds[(sizes[0], False)] != preds[(sizes[0], True)]).sum())
    base = statistics.median(speed[(512, False)]) if (512, False) in speed else None
    rows = [{"batch_size": bs, "channels_last": cl, "img_per_s": statistics.median(speed[(bs, cl)]),
             "all": [round(v, 1) for v in speed[(bs, cl)]],
             "vs_512_contiguous": statistics.median(speed[(bs, cl)]) / base if base else None} for bs, cl in settings]
    if args.json:
        print(json.dumps({"rows": rows, "layout_prediction_differences": differ, "images": n, "bf16": bf16}))
        return 0
    print(f"{n} two-mask CIFAR-10 images, {'bf16 autocast' if bf16 else 'float32'}, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| batch | layout | masked img/s | vs batch 512 contiguous |")
    print("|---:|---|---:|---:|")
    for r in rows:
        rel = f"{r['vs_512_contiguous']:.2f}x" if r["vs_512_contiguous"] else "-"
        print(f"| {r['batch_size']} | {'channels_last' if r['channels_last'] else 'contiguous'} | "
              f"{r['img_per_s']:.0f} | {rel} |")
    print(f"predictions identical across batch sizes (asserted); contiguous vs channels_last: {differ} of {n} differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
