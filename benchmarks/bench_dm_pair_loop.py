"""Double masking: ``patchcert certify`` against an official-style pair loop, same images, same certificates.

    PATCHCERT_DATA=../shared/data python benchmarks/bench_dm_pair_loop.py -n 200 --threads 2
    python benchmarks/bench_dm_pair_loop.py -n 64 --loop-dtype bf16      # the loop at patchcert's precision

The reference is the way PatchCleanser's own code computes its certificates: for a batch of
images, one forward pass of the whole batch per unordered mask pair ``(i <= j)`` (666 passes
for k = 6), every pair for every image, then ``certified = all pair predictions == label``.
It is written here from that description (a straightforward loop), with patchcert's mask set
and fill so that both sides compute the same defense.

patchcert's side is the library call behind ``patchcert certify --defense double-masking:k=K``
(with the model's measured deployment options, e.g. bf16 + channels_last + flip for the shipped
``doublemask_cifar10``; ``resolved_defense`` in the output names what ran; with flip the loop
runs the mirror image as a second pass per mask pair): ``certify_dataset``
with the given ``--defense`` spec, no largest-square search, timed end to end: the expensive pass
and every certificate and record.

Both run in the same process on the same images, alternating (loop, patchcert, loop, ...)
``--repeats`` times so that the VM's minute-to-minute speed changes hit both; the ratio of
each pair of neighbours is reported, and the certificates are asserted identical image by
image (and, with ``--loop-dtype`` equal to the deployed precision, the predictions too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _logits(model, xm, flip: bool):
    out = model(xm).float()
    out = out.mean((2, 3)) if out.dim() == 4 else out
    if flip:  # the flip classifier: the mirror image in a second pass, logits averaged
        mir = model(xm.flip(-1)).float()
        out = (out + (mir.mean((2, 3)) if mir.dim() == 4 else mir)) / 2
    return out


def pair_loop(model, x, labels, rects, fill: float, batch: int, bf16: bool, flip: bool = False):
    """Official-style: per batch of images, one forward pass per unordered mask pair (two with
    ``flip``: the defense then certifies the mean of the logits on the image and its mirror)."""
    n, _, h, w = x.shape
    m = len(rects)
    masks = torch.zeros(m, h, w, dtype=torch.bool)
    for i, (t, l, mh, mw) in enumerate(rects):
        masks[i, t:t + mh, l:l + mw] = True
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    table = torch.empty(n, m, m, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, n, batch):
            xb = x[s:s + batch]
            for i, j in pairs:
                keep = ~(masks[i] | masks[j])
                xm = torch.where(keep, xb, torch.tensor(fill, dtype=xb.dtype))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    p = _logits(model, xm, flip).argmax(1)
                table[s:s + batch, i, j] = p
                table[s:s + batch, j, i] = p
    certified = (table == labels[:, None, None]).flatten(1).all(1)
    return table, certified


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="doublemask_cifar10")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("-n", "--num-examples", type=int, default=100)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--patch", default="5x5")
    p.add_argument("--defense", default=None, help="patchcert's spec (default double-masking:k=K: the model's "
                   "measured deployment options if its checkpoint has them, else float32)")
    p.add_argument("--loop-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of the official-style loop (PatchCleanser's code runs float32)")
    p.add_argument("--loop-batch", type=int, default=64, help="images per batch in the loop")
    p.add_argument("--certify-batch", type=int, default=128, help="certify_dataset batch_size (images)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from patchcert import certify_dataset
    from patchcert.models import load_model
    from patchcert.data import load_dataset, to_float
    from patchcert.defenses.double_masking import union_mask_set
    from patchcert.geometry import parse_patch
    from patchcert.pretrained import load_pretrained
    from patchcert.runtime import harden, tune_allocator

    tune_allocator()
    harden(0)
    torch.set_num_threads(args.threads)
    model = (load_model(args.model) if Path(args.model).is_file() else load_pretrained(args.model)).eval()
    ds = load_dataset(args.dataset, args.data_dir, train=False)
    sel = torch.arange(args.start, args.start + args.num_examples)
    x, y = to_float(ds.images[sel]), ds.labels[sel].long()
    size = tuple(x.shape[-2:])
    shapes = parse_patch(args.patch).shapes(size)
    ms = union_mask_set(size, shapes, args.k)
    spec = args.defense or f"double-masking:k={args.k}"  # what `patchcert certify --defense double-masking` runs
    from patchcert.runs.source import deployment_options
    from patchcert.specs import parse_defense_spec

    # the loop computes the same classifier: flip as the spec or the model's measured deployment says
    flip = bool(parse_defense_spec(spec).params.get(
        "flip", deployment_options(model).get("double-masking", {}).get("flip", False)))

    def run_loop():
        return pair_loop(model, x, y, ms.rects, 0.5, args.loop_batch, args.loop_dtype == "bf16", flip)

    def run_pc():
        run = certify_dataset(model, (x, y), defenses=[spec], patches=[args.patch], square_cap=0, device="cpu",
                              batch_size=args.certify_batch)
        outs = [next(iter(r.defenses.values())) for r in run.records]
        cert = torch.tensor([next(iter(o.certified.values())) for o in outs])
        pred = torch.tensor([o.pred for o in outs])
        return cert, pred, run.summary

    t_loop, t_pc = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        table, cert_loop = run_loop()
        t_loop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cert_pc, pred_pc, summary = run_pc()
        t_pc.append(time.perf_counter() - t0)
    same = bool((cert_loop == cert_pc).all())
    differ = int((cert_loop != cert_pc).sum())
    ratios = [b / a for a, b in zip(t_loop, t_pc)]
    res = {
        "model": args.model, "n": args.num_examples, "start": args.start, "k": args.k, "masks": len(ms),
        "pairs": len(ms) * (len(ms) + 1) // 2, "patch": args.patch, "defense": spec,
        "resolved_defense": summary.results[0].defense, "loop_flip": flip,
        "loop_dtype": args.loop_dtype, "loop_batch": args.loop_batch, "certify_batch": args.certify_batch,
        "threads": args.threads, "loop_s": t_loop, "patchcert_s": t_pc, "ratios": ratios,
        "ratio_median": statistics.median(ratios), "loop_ms_per_image": 1000 * min(t_loop) / args.num_examples,
        "patchcert_ms_per_image": 1000 * min(t_pc) / args.num_examples,
        "certified": float(cert_pc.float().mean()), "certificates_identical": same, "certificates_differing": differ,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
