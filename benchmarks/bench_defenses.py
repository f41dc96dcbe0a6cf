"""Speed of the certification core against straightforward per-placement references.

For each case the same random score maps go through ``defense.certify`` and through a
reference that loops over window placements (vectorised over images); the answers must be
identical (the script fails otherwise). Reported: µs per image for both, the speedup, the share
of certified maps, and the cost relative to one forward pass of ``bagcert_cifar`` (width 64,
RF 7) measured in the same run.

Cases (issue 2, item 4):
  * 10,000 maps [10, 32, 32]: voting sign 3.2 and 3.3, clipping tanh; windows 11x11 (5x5 patch
    at RF 7, stride 1) and the 8 windows of every rectangle of area 24 at RF 7;
  * 10,000 maps [10, 26, 26]: masking with a 6x6 window (BagNet-17 on 224 px, 2% patch),
    T = 0 and T = 0.5.

    python benchmarks/bench_defenses.py                    # full size
    python benchmarks/bench_defenses.py --n 2000 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchcert import Geometry, create_defense, create_model, patch_windows
from patchcert.defenses import Clipping, Masking, Voting


# -- straightforward references: a Python loop over placements, vectorised over images ---------


def _tie_bad(margin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, K] margins against every class -> [N] some class c != y breaks the certificate."""
    K = margin.shape[1]
    cls = torch.arange(K, device=margin.device)[None]
    y = labels[:, None]
    bad = (margin < 0) | ((margin == 0) & (cls < y))
    return (bad & (cls != y)).any(1)


def reference_voting(d: Voting, scores, labels, windows) -> torch.Tensor:
    s = d.votes(scores)
    N, K, H, W = s.shape
    n = s.sum((2, 3))
    ok = n.argmax(1) == labels
    ny = n.gather(1, labels[:, None])
    for wh, ww in windows:
        if wh > H or ww > W:
            return torch.zeros_like(ok)
        area = wh * ww
        if d.condition == "3.3":
            ok &= ~_tie_bad(ny - n - 2 * area, labels)
            continue
        for i in range(H - wh + 1):
            for j in range(W - ww + 1):
                S = s[:, :, i : i + wh, j : j + ww].sum((2, 3))
                margin = (ny - S.gather(1, labels[:, None])) - (n - S) - area
                ok &= ~_tie_bad(margin, labels)
    return ok


def reference_clipping(d: Clipping, scores, labels, windows) -> torch.Tensor:
    v = d.clipped(scores)
    N, K, H, W = v.shape
    g = v.sum((2, 3))
    ok = g.argmax(1) == labels
    for wh, ww in windows:
        if wh > H or ww > W:
            return torch.zeros_like(ok)
        area = wh * ww
        for i in range(H - wh + 1):
            for j in range(W - ww + 1):
                out = g - v[:, :, i : i + wh, j : j + ww].sum((2, 3))
                margin = (out.gather(1, labels[:, None]) + area * d.lo) - (out + area * d.hi)
                ok &= ~_tie_bad(margin, labels)
    return ok


def reference_masking(d: Masking, scores, labels, windows) -> torch.Tensor:
    """Alg. 2 by a loop over placements. The cases use T = 0 and T = 0.5, where the float tests
    below are exact (``fl(m / g) > 0.5`` iff ``m / g > 1/2`` for grid integers; ``t / 0.5`` is
    exact); for other T the defense decides them in exact rational arithmetic."""
    v = d.features_of(scores)
    N, K, H, W = v.shape
    mh, mw = d.window
    T = d.threshold
    if any(w[0] > mh or w[1] > mw for w in windows) or mh > H or mw > W:
        return torch.zeros(N, dtype=torch.bool)
    A = F.avg_pool2d(v, (mh, mw), stride=1, divisor_override=1)  # [N, K, Hp, Wp]
    g = v.sum((2, 3))
    m = A.amax((2, 3))
    gm = torch.where((g > 0) & (m / g > T), g - m, g)
    ok = (g.argmax(1) == labels) & (gm.argmax(1) == labels)
    ar = torch.arange(N)
    vy = v[ar, labels]  # [N, H, W]
    for i in range(H - mh + 1):
        for j in range(W - mw + 1):
            t = g - A[:, :, i, j]
            ub = t / (1 - T)
            z = vy.clone()
            z[:, i : i + mh, j : j + mw] = 0
            zs = F.avg_pool2d(z[:, None], (mh, mw), stride=1, divisor_override=1)[:, 0]
            m_all = zs.amax((1, 2))
            m_ovl = zs[:, max(0, i - mh + 1) : i + mh, max(0, j - mw + 1) : j + mw].amax((1, 2)).clamp(min=0)
            ty = t[ar, labels]
            M = torch.where((ty > 0) & (m_all / ty > T), m_all, m_ovl)
            margin = (ty - M)[:, None] - ub
            ok &= ~_tie_bad(margin, labels)
    return ok


class MaskingOffsets(Masking):
    """Masking with the overlap maxima computed as before issue 10: one shifted slice per overlap
    offset, ``(2h-1)(2w-1)`` steps (cost grows with the window area). Same answers."""

    def _overlap_max(self, Ay, Cy, fy, size):
        return self._overlap_max_offsets(Ay, Cy, size)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    defense: object
    reference: object
    shape: tuple[int, int, int]
    windows: list[tuple[int, int]]
    scale: float = 1.0  # score scale of the random maps (tanh(0.05 u - 1) needs u ~ 20)


def make_maps(n: int, shape, seed: int, scale: float = 1.0):
    """Score maps with a per-image label strength, so that a mix of them is certified."""
    gen = torch.Generator().manual_seed(seed)
    K, H, W = shape
    labels = torch.randint(0, K, (n,), generator=gen)
    strength = torch.rand(n, generator=gen) * 2.0
    s = torch.randn(n, K, H, W, generator=gen) - 0.6
    s[torch.arange(n), labels] += strength[:, None, None]
    if scale != 1.0:
        s = s * scale + 20.0
    return s.float(), labels


def timed(fn, *args):
    """(result, CPU seconds of this process): with one torch thread, the work itself, which
    stays meaningful when the machine is shared (wall time then mostly measures waiting)."""
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def forward_cost(batch: int, repeats: int) -> float:
    """CPU µs per image of bagcert_cifar (width 64, RF 7) forward passes, eval mode, no grad."""
    model = create_model("bagcert_cifar", num_classes=10, rf=7, width=64).eval()
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        model.score_map(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _, dt = timed(model.score_map, x)
            best = min(best, dt)
    return best / batch * 1e6


def sweep(args, fwd: float) -> bool:
    """Every square window 1x1 .. HxW on [10, 32, 32] maps: each defense's certificate as a share of
    the forward pass; masking also with the per-offset overlap loop it replaced (same answers)."""
    K, H, W = 10, 32, 32
    sizes = [int(x) for x in args.sweep_sizes.split(",")] if args.sweep_sizes else list(range(1, min(H, W) + 1))
    print("| window | voting 3.2 µs | clipping µs | masking T=0 µs | masking T=0.5 µs | max / forward "
          "| masking, offset loop µs | loop / new |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    worst = 0.0
    for s_ in sizes:
        w = [(s_, s_)]
        row = []
        for d, scale in ((create_defense("voting"), 1.0), (create_defense("clipping", clip="tanh"), 20.0),
                         (create_defense("masking", window=(s_, s_)), 1.0),
                         (create_defense("masking", window=(s_, s_), threshold=0.5), 1.0)):
            t = 0.0
            for start in range(0, args.sweep_n, args.chunk):
                m = min(args.chunk, args.sweep_n - start)
                sc, y = make_maps(m, (K, H, W), seed=args.seed + 7919 * s_ + start, scale=scale)
                _, dt = timed(d.certify, sc, y, w)
                t += dt
            row.append(t / args.sweep_n * 1e6)
        t_old = 0.0
        old_d, new_d = MaskingOffsets(window=(s_, s_)), create_defense("masking", window=(s_, s_))
        for start in range(0, args.sweep_n, args.chunk):
            m = min(args.chunk, args.sweep_n - start)
            sc, y = make_maps(m, (K, H, W), seed=args.seed + 7919 * s_ + start)
            r_old, dt = timed(old_d.certify_details, sc, y, w)
            t_old += dt
            r_new = new_d.certify_details(sc, y, w)
            if not (torch.equal(r_old.certified, r_new.certified) and torch.equal(r_old.margin, r_new.margin)):
                print(f"MISMATCH masking {s_}x{s_}: offset loop and new algorithm differ", file=sys.stderr)
                ok = False
        us_old = t_old / args.sweep_n * 1e6
        share = max(row) / fwd
        worst = max(worst, share)
        print(f"| {s_}x{s_} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} | {100 * share:.2f}% "
              f"| {us_old:.1f} | {us_old / row[2]:.1f}x |", flush=True)
    print(f"\nlargest certificate cost at any window: {100 * worst:.2f}% of the forward pass")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="maps per case (default 10000)")
    ap.add_argument("--chunk", type=int, default=1000, help="maps generated and certified per call")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forward-batch", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated substrings of case labels to run")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: every square window up to the map, each defense vs the forward pass")
    ap.add_argument("--sweep-n", type=int, default=500, help="maps per window size in --sweep (default 500)")
    ap.add_argument("--sweep-sizes", default="", help="comma-separated window sides for --sweep (default 1..32)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sweep:
        fwd = forward_cost(args.forward_batch, repeats=3)
        print(f"# patchcert defense cost by window size: n={args.sweep_n} maps [10, 32, 32] per size, "
              f"threads={args.threads}, torch {torch.__version__}")
        print(f"# forward pass bagcert_cifar(width=64, rf=7), batch {args.forward_batch}: {fwd:.0f} µs/image (CPU time)")
        print()
        return 0 if sweep(args, fwd) else 1

    g7 = Geometry(rf=7, stride=1, input_size=(32, 32))
    w_square = patch_windows(g7, "5x5", (32, 32))  # [(11, 11)]
    w_area = patch_windows(g7, "area=24", (32, 32))  # 8 rectangles
    vote32 = create_defense("voting", binarize="sign", condition="3.2")
    vote33 = create_defense("voting", binarize="sign", condition="3.3")
    clip = create_defense("clipping", clip="tanh")
    cases = [
        Case("voting sign 3.2, 11x11", vote32, reference_voting, (10, 32, 32), w_square),
        Case("voting sign 3.2, area 24 (8 windows)", vote32, reference_voting, (10, 32, 32), w_area),
        Case("voting sign 3.3, 11x11", vote33, reference_voting, (10, 32, 32), w_square),
        Case("voting sign 3.3, area 24 (8 windows)", vote33, reference_voting, (10, 32, 32), w_area),
        Case("clipping tanh, 11x11", clip, reference_clipping, (10, 32, 32), w_square, 20.0),
        Case("clipping tanh, area 24 (8 windows)", clip, reference_clipping, (10, 32, 32), w_area, 20.0),
    ]
    for T in (0.0, 0.5):
        d = create_defense("masking", window=(6, 6), threshold=T)
        cases.append(Case(f"masking 6x6 T={T:g} [10,26,26]", d, reference_masking, (10, 26, 26), [(6, 6)]))
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.label for k in keys)]

    fwd = forward_cost(args.forward_batch, repeats=3)
    print(f"# patchcert defense benchmark: n={args.n} per case, threads={args.threads}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"# forward pass bagcert_cifar(width=64, rf=7), batch {args.forward_batch}: {fwd:.0f} µs/image")
    print("# times are CPU time of this process (time.process_time) per image; the 3.3 reference has no")
    print("# placements to loop over (the condition is global), so its ratio only shows overheads")
    print()
    print("| case | windows | fast µs/img | reference µs/img | speedup | certified | fast / forward |")
    print("|---|---|---:|---:|---:|---:|---:|")
    failed = False
    for ci, case in enumerate(cases):
        t_fast = t_ref = 0.0
        n_cert = 0
        for start in range(0, args.n, args.chunk):
            m = min(args.chunk, args.n - start)
            s, y = make_maps(m, case.shape, seed=args.seed * 1_000_003 + ci * 10_007 + start, scale=case.scale)
            fast, dt = timed(case.defense.certify, s, y, case.windows)
            t_fast += dt
            with torch.no_grad():
                ref, dt = timed(case.reference, case.defense, s, y, case.windows)
            t_ref += dt
            if not torch.equal(fast, ref):
                bad = int((fast != ref).sum())
                print(f"MISMATCH in {case.label}: {bad} of {m} maps differ", file=sys.stderr)
                failed = True
            n_cert += int(fast.sum())
        us_fast, us_ref = t_fast / args.n * 1e6, t_ref / args.n * 1e6
        wins = ",".join(f"{a}x{b}" for a, b in case.windows) if len(case.windows) <= 2 else f"{len(case.windows)} rects"
        print(f"| {case.label} | {wins} | {us_fast:.1f} | {us_ref:.1f} | {us_ref / us_fast:.0f}x | "
              f"{100 * n_cert / args.n:.1f}% | {100 * us_fast / fwd:.2f}% |", flush=True)
    if failed:
        print("FAILED: fast and reference certificates differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
