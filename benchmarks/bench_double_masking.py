"""Double masking: masked-prediction throughput against the plain forward pass, bf16 vs float32.

    PATCHCERT_DATA=../shared/data python benchmarks/bench_double_masking.py -n 50 --threads 2
    python benchmarks/bench_double_masking.py --model runs/x/model.safetensors --dataset synthetic -n 8

On the same ``n`` CIFAR-10 test images and the same model (default: the shipped
``doublemask_cifar10``), in one run:

* the plain forward pass (img/s), float32 and bf16 autocast;
* the table of every two-mask image (``masked_prediction_table``: masked images per second and
  ms per original image), float32 and bf16, against a straightforward reference that builds each
  masked image with a Python loop over the pairs and runs one batch per image (same table,
  asserted);
* the early-stopping prediction (``double_masking_predict``) against prediction from the full
  table (same predictions, asserted);
* how many masked predictions and certificates bf16 changes relative to float32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint or shipped name (default: doublemask_cifar10)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("-n", "--num-examples", type=int, default=50)
    p.add_argument("--reference-examples", type=int, default=5, help="images for the slow reference (default 5)")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--patch", default="5x5")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from pathlib import Path

    from patchcert.models import load_model
    from patchcert.data import load_dataset, to_float
    from patchcert.defenses.double_masking import (
        certify_from_table,
        double_masking_predict,
        masked_prediction_table,
        predict_from_table,
    )
    from patchcert.geometry import parse_patch
    from patchcert.masks import mask_set
    from patchcert.pretrained import load_pretrained
    from patchcert.runtime import harden, tune_allocator

    tune_allocator()
    harden(0)
    torch.set_num_threads(args.threads)
    model = load_model(args.model) if args.model and Path(args.model).is_file() else load_pretrained(
        args.model or "doublemask_cifar10")
    model.eval()
    data = load_dataset(args.dataset, args.data_dir, train=False)
    x = to_float(data.images[: args.num_examples])
    y = data.labels[: args.num_examples]
    shape = parse_patch(args.patch).shapes(tuple(x.shape[-2:]))[0]
    ms = mask_set(tuple(x.shape[-2:]), shape, args.k)
    n, m = len(x), len(ms)
    pairs = m * (m + 1) // 2
    res: dict = {"n": n, "masks": m, "pairs": pairs, "threads": args.threads, "model": getattr(model, "arch", "?")}

    with torch.no_grad():
        xb = x.repeat((args.batch_size + n - 1) // n, 1, 1, 1)[: args.batch_size]
        for name, bf16 in (("float32", False), ("bf16", True)):
            def fwd():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return model(xb)
            fwd()
            t, _ = _time(fwd, 3)
            res[f"forward_img_per_s_{name}"] = len(xb) / t

        tables = {}
        for name, bf16 in (("float32", False), ("bf16", True)):
            t, tab = _time(lambda: masked_prediction_table(model, x, ms, 0.5, args.batch_size, bf16))
            tables[name] = tab
            res[f"table_masked_img_per_s_{name}"] = n * pairs / t
            res[f"table_ms_per_image_{name}"] = 1000 * t / n
            res[f"table_vs_forward_{name}"] = (n * pairs / t) / res[f"forward_img_per_s_{name}"]

        # straightforward reference: a Python loop builds every two-mask image, one batch per image
        r = min(args.reference_examples, n)

        def reference():
            out = torch.empty(r, m, m, dtype=torch.long)
            for i in range(r):
                imgs, idx = [], []
                for a in range(m):
                    for b in range(a, m):
                        img = x[i].clone()
                        for (t_, l_, h_, w_) in (ms.rects[a], ms.rects[b]):
                            img[:, t_:t_ + h_, l_:l_ + w_] = 0.5
                        imgs.append(img)
                        idx.append((a, b))
                pred = model(torch.stack(imgs)).flatten(1).argmax(1)
                for (a, b), v in zip(idx, pred.tolist()):
                    out[i, a, b] = out[i, b, a] = v
            return out

        t_ref, tab_ref = _time(reference)
        t_new, tab_new = _time(lambda: masked_prediction_table(model, x[:r], ms, 0.5, args.batch_size))
        assert torch.equal(tab_ref, tab_new), "the batched table differs from the reference"
        res["reference_ms_per_image"] = 1000 * t_ref / r
        res["batched_ms_per_image"] = 1000 * t_new / r
        res["batched_vs_reference_speedup"] = t_ref / t_new

        # early-stopping prediction vs the full table
        t_es, pred_es = _time(lambda: double_masking_predict(model, x, ms, 0.5, batch_size=args.batch_size))
        pred_tab = predict_from_table(tables["float32"])
        assert torch.equal(pred_es, pred_tab), "early stopping changed a prediction"
        res["predict_early_stop_ms_per_image"] = 1000 * t_es / n
        res["predict_vs_table_speedup"] = res["table_ms_per_image_float32"] / res["predict_early_stop_ms_per_image"]

        # bf16 vs float32
        changed = int((tables["bf16"] != tables["float32"]).triu().sum())  # each unordered pair once
        cert32 = certify_from_table(tables["float32"], y)
        cert16 = certify_from_table(tables["bf16"], y)
        res["bf16_changed_masked_predictions"] = changed
        res["masked_predictions"] = n * pairs
        res["bf16_changed_certificates"] = int((cert32 != cert16).sum())
        res["bf16_changed_predictions"] = int((predict_from_table(tables["bf16"]) != pred_tab).sum())
        res["certified_float32"] = float(cert32.float().mean())
        res["certified_bf16"] = float(cert16.float().mean())

    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
