"""Per-image cost of certification: model forward pass vs each defense's certificate.

    PATCHCERT_DATA=../shared/data python benchmarks/bench_certify.py -n 500 --threads 2
    python benchmarks/bench_certify.py --dataset synthetic -n 64          # no data needed
    python benchmarks/bench_certify.py --model runs/x/model.safetensors   # a trained model

Runs ``patchcert.certify.certify_dataset`` in memory (nothing written) on CIFAR-10 test images
with a bagcert_cifar width-64 net (random weights unless --model is given: the timings do not
depend on the weights, the certified accuracies do), and prints milliseconds per image for the
forward pass, each defense's certificate per patch, its prediction and its largest-square
search; then, on the same score maps, the vectorised bisection for largest_square against the
straightforward scan over every square size (same answers, asserted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: random bagcert_cifar, rf 7)")
    p.add_argument("--width", type=int, default=64, help="width of the random model (default 64)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("-n", "--num-examples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--defense", action="append")
    p.add_argument("--patch", action="append")
    p.add_argument("--json", action="store_true", help="print one JSON line with the numbers")
    args = p.parse_args(argv)

    import patchcert
    from patchcert.certify import build_defenses, certify_dataset, largest_certified_square, square_windows
    from patchcert.checkpoint import load_model
    from patchcert.data import load_dataset, to_float
    from patchcert.runtime import harden, tune_allocator

    tune_allocator()
    harden(0)
    torch.set_num_threads(args.threads)
    if args.model:
        model = load_model(args.model)
    else:
        model = patchcert.create_model("bagcert_cifar", num_classes=10, rf=7, width=args.width)
    if args.dataset == "synthetic":
        data = load_dataset("synthetic", n=args.num_examples, num_classes=model.num_classes, size=32)
    else:
        data = load_dataset(args.dataset, args.data_dir)
    data = data.subset(args.num_examples)
    defenses = args.defense or ["voting", "voting:condition=3.3", "clipping:clip=tanh",
                                "masking:threshold=0.0,features=logits"]
    patches = args.patch or ["5x5", "2%", "area=24"]
    t0 = time.perf_counter()
    run = certify_dataset(model, data, defenses=defenses, patches=patches, batch_size=args.batch_size,
                          dtype=args.dtype, device="cpu")
    wall = time.perf_counter() - t0
    s = run.summary
    md = s.metadata
    out = {"n": s.n, "threads": args.threads, "dtype": args.dtype, "model": md.model, "width": md.model_config.get("width"),
           "wall_seconds": wall, "forward_ms": 1000 * md.forward_seconds_per_image, "defenses": {}}
    print(f"{s.n} images, {md.model} {md.model_config}, {args.threads} thread(s), defenses in {args.dtype}; "
          f"wall {wall:.1f} s", file=sys.stderr)
    print(f"{'':44s} ms/img", file=sys.stderr)
    print(f"{'model forward (score map)':44s} {out['forward_ms']:8.3f}", file=sys.stderr)
    for r in s.results:
        ms = 1000 * (r.certify_seconds_per_image or 0.0)
        out["defenses"].setdefault(r.defense, {})[r.patch] = {"certify_ms": ms, "certified": r.certified_accuracy}
        print(f"{r.defense + ' ' + r.patch + ' certify':44s} {ms:8.3f}   (certified {100 * r.certified_accuracy:.1f}%)",
              file=sys.stderr)
    for k, parts in md.defense_seconds_per_image.items():
        for part, sec in parts.items():
            out["defenses"][k][part + "_ms"] = 1000 * (sec or 0.0)
            print(f"{k + ' ' + part:44s} {1000 * (sec or 0.0):8.3f}", file=sys.stderr)

    # largest square: bisection vs scan on the same maps
    with torch.no_grad():
        model.eval()
        scores = torch.cat([model.score_map(to_float(data.images[i:i + args.batch_size]))
                            for i in range(0, len(data), args.batch_size)]).double()
    wins = square_windows(model.geometry, 32)
    for dp in build_defenses(defenses[:1], default_window=(11, 11)):
        t0 = time.perf_counter()
        a = largest_certified_square(dp.defense, scores, data.labels, wins, "bisect")
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = largest_certified_square(dp.defense, scores, data.labels, wins, "scan")
        ts = time.perf_counter() - t0
        assert torch.equal(a, b), "bisection and scan disagree"
        out["largest_square"] = {"defense": dp.key, "bisect_ms": 1000 * tb / len(data), "scan_ms": 1000 * ts / len(data)}
        print(f"largest square ({dp.key}): bisection {1000 * tb / len(data):.3f} ms/img, scan over 32 sizes "
              f"{1000 * ts / len(data):.3f} ms/img ({ts / tb:.1f}x)", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
