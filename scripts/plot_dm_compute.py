"""Issue 18: double masking's certified accuracy against training compute, every recipe tried.

    python scripts/plot_dm_compute.py            # writes docs/results/dm_training_compute.png + .md

For each run: the per-epoch evaluation of the training log (double masking k = 6, 5x5, bf16, on
64 test images spread over the first 1,000: noisy, +-6 points) as a thin line, the run's final
``patchcert certify`` evaluation on the pilots' 256 images (``*_summary.json``) as a large dot,
and its evaluations on more images (``MORE``: 1,024 random or all 10,000 test images, the figure
that counts; the 256 run about 4-7 points high) as stars; weight averages (``SOUPS``) as stars
(with flip) and plus signs (without) at their ingredients' summed compute. The x axis is training compute,
3 x 2 x forward MACs per image x images seen, plus the extra forward passes of greedy cutout (2 rounds x the candidates per greedy image) and of a
distillation teacher (1 per image); a run initialised from another model starts at that
model's compute (the whole chain: a second fine-tune starts at the first one's end). The table
adds the wall time on this machine's 2 cores (from the logs' ``epoch_seconds``; the VM's speed
varied between sessions by up to 2x).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plot_training_compute import ROOT, TRAIN_IMAGES, forward_macs, read  # scripts/ is on the path
W96 = {"widths": [96, 384, 384], "stem": 32}

# (label, log, model_cfg, final summary or None, extra forward passes per image, log it started from)
RUNS = [
    ("v1 (doublemask_cifar10_v1): 50 ep", "docs/doublemask_cifar10_train_log.csv", W96, "docs/pilots/v1_k6_cert256_summary.json", 0.0, None),
    ("leg 2: v1 + 24 ep warm restart", "docs/doublemask_cifar10_r2_train_log.csv", W96,
     "docs/pilots/r2_cert256_summary.json", 0.0, "docs/doublemask_cifar10_train_log.csv"),
    ("pilot base: 3 ep", "docs/pilots/dm_base.csv", W96, "docs/pilots/dm_base_cert256_summary.json", 0.0, None),
    ("pilot twomask: 3 ep, p2 = 0.7", "docs/pilots/dm_twomask.csv", W96, "docs/pilots/dm_twomask_cert256_summary.json",
     0.0, None),
    ("pilot distill: 2 ep, teacher v1", "docs/pilots/dm_distill.csv", W96, "docs/pilots/dm_distill_cert256_summary.json",
     1.0, None),
    ("pilot greedy: 2 ep, 3/16 greedy", "docs/pilots/dm_greedy.csv", W96, "docs/pilots/dm_greedy_cert256_summary.json",
     8 * 3 / 16, None),
    ("pilot narrow: 64/256/256, 6 ep", "docs/pilots/dm_narrow.csv", {"widths": [64, 256, 256], "stem": 32},
     "docs/pilots/dm_narrow_cert256_summary.json", 0.0, None),
    ("pilot wide: 128/512/512, 2 ep", "docs/pilots/dm_wide.csv", {"widths": [128, 512, 512], "stem": 48},
     "docs/pilots/dm_wide_cert256_summary.json", 0.0, None),
    ("long run = v2 (doublemask_cifar10_v2): narrow + two-mask mix, 64 ep", "docs/doublemask_cifar10_long_train_log.csv",
     {"widths": [64, 256, 256], "stem": 32}, "docs/pilots/long_final_cert256_summary.json", 0.0, None),
    ("v3 = v2 + 20-ep Greedy Cutout fine-tune (1/4 greedy)", "docs/doublemask_cifar10_greedy_ft_train_log.csv",
     {"widths": [64, 256, 256], "stem": 32}, "docs/pilots/greedy_ft_cert256_summary.json", 12 * 0.25,
     "docs/doublemask_cifar10_long_train_log.csv"),
    ("v4 = v3 + 12-ep Greedy Cutout round 2 (1/2 greedy)", "docs/doublemask_cifar10_greedy_ft2_train_log.csv",
     {"widths": [64, 256, 256], "stem": 32}, "docs/pilots/greedy_ft2_cert256_summary.json", 12 * 0.5,
     "docs/doublemask_cifar10_greedy_ft_train_log.csv"),
    ("v4 + 10-ep self-distillation (teacher v4), same greedy share; not shipped: +0.2 on the 1,024 (n.s.)",
     "docs/doublemask_cifar10_distill_ft_train_log.csv", {"widths": [64, 256, 256], "stem": 32},
     "docs/pilots/distill_ft_cert256_summary.json", 12 * 0.5 + 1, "docs/doublemask_cifar10_greedy_ft2_train_log.csv"),
    ("v4 + 10-ep greedy round with a centre-weighted mask prior (c = 3); not shipped: -0.4 on the 1,024 (n.s.)",
     "docs/doublemask_cifar10_centre_ft_train_log.csv", {"widths": [64, 256, 256], "stem": 32},
     "docs/pilots/centre_ft_cert256_summary.json", 12 * 0.5, "docs/doublemask_cifar10_greedy_ft2_train_log.csv"),
]

# More evaluations of a run on more images (the figure that counts): drawn as stars at the run's end.
MORE = {
    "docs/doublemask_cifar10_long_train_log.csv": ["docs/results/dm_all10k/summary.json"],
    "docs/doublemask_cifar10_greedy_ft_train_log.csv": ["docs/results/dm_v3_all10k/summary.json"],
    "docs/doublemask_cifar10_greedy_ft2_train_log.csv": ["docs/results/dm_v4_all10k/summary.json"],
    "docs/doublemask_cifar10_distill_ft_train_log.csv": ["docs/pilots/distill_ft_cert1024_summary.json"],
    "docs/doublemask_cifar10_centre_ft_train_log.csv": ["docs/pilots/centre_ft_cert1024_summary.json"],
}

# Weight averages (no training of their own): drawn at the sum of their ingredients' compute (the
# first ingredient's whole chain plus each other fine-tune's own part), as stars; the evaluations
# are (label suffix, summary) pairs: the same weights without and with flip (flip doubles the cost
# of certification, not of training).
SOUPS = [
    ("shipped v5 = mean of the weights of v4, the distill and the centre fine-tunes",
     ["docs/doublemask_cifar10_greedy_ft2_train_log.csv", "docs/doublemask_cifar10_distill_ft_train_log.csv",
      "docs/doublemask_cifar10_centre_ft_train_log.csv"],
     [("no flip", "docs/pilots/v5_soup_cert1024_summary.json"),
      ("flip", "docs/pilots/v5_soupflip_cert1024_summary.json"),
      ("flip", "docs/results/dm_v5_all10k/summary.json")]),
]


def final(path: str | None) -> tuple[float, float, int] | None:
    if path is None or not (ROOT / path).exists():
        return None
    s = json.loads((ROOT / path).read_text())
    r = s["results"][0]
    return r["clean_accuracy"], r["certified_accuracy"], int(s["n"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs/results/dm_training_compute.png"))
    a = ap.parse_args()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    from matplotlib import colormaps

    ax.set_prop_cycle(color=colormaps["tab20"].colors[::2] + colormaps["tab20"].colors[1::2])  # > 10 runs: no repeats
    lines = ["| run | epochs | wall time (min) | training compute (PFLOP) | per-epoch eval (64 imgs) | "
             "final eval: images | clean | certified 5x5 |", "|---|---|---|---|---|---|---|---|"]
    totals: dict[str, tuple[float, float]] = {}  # log -> (wall minutes, PFLOP) at its end, from scratch
    for label, log, cfg, summ, extra, init in RUNS:
        p = ROOT / log
        if not p.exists():
            continue
        rows = read(p)
        macs = forward_macs("fastnet_cifar", cfg)
        flop_img = (6 + 2 * extra) * macs  # forward + backward = 3 forwards, 2 FLOPs per MAC
        t0, f0 = totals.get(init, (0.0, 0.0))  # a fine-tune starts where its initial model's runs ended
        t, x, acc = [], [], []  # acc: (compute, certified %, epoch) of the evaluated epochs (eval_every)
        for r in rows:
            t0 += r.get("epoch_seconds", 0.0) / 60
            t.append(t0)
            x.append(f0 + r["epoch"] * TRAIN_IMAGES * flop_img / 1e15)
            if "eval_cert_acc" in r:
                acc.append((x[-1], 100 * r["eval_cert_acc"], int(r["epoch"])))
        flops = x[-1]
        totals[log] = (t[-1], flops)
        real = any(v > 0 for _, v, _ in acc)  # v1's log predates double-masking evaluation in training (all 0)
        color = None
        if real:
            color = ax.plot([a[0] for a in acc], [a[1] for a in acc], "-", lw=0.8, alpha=0.6)[0].get_color()
        fin = final(summ)
        if fin is not None:
            ax.plot([x[-1]], [100 * fin[1]], "o", ms=7, color=color, label=f"{label}: {100 * fin[1]:.1f}% ({fin[2]} imgs)")
        lines.append(f"| {label} | {len(rows)} | {t[-1]:.1f} | {flops:.2f} | "
                     f"{acc[-1][1]:.1f}% (epoch {acc[-1][2]}) |" + (f" {fin[2]} | {100 * fin[0]:.1f}% | {100 * fin[1]:.1f}% |" if fin else
                                             " - | - | - |"))
        for more in MORE.get(log, []):
            m = final(more)
            if m is None:
                continue
            ax.plot([x[-1]], [100 * m[1]], "*", ms=11, color=color, markeredgecolor="black", markeredgewidth=0.5)
            lines.append(f"| (same run) | | | | | {m[2]} | {100 * m[0]:.1f}% | {100 * m[1]:.1f}% |")
    inits = {log: init for _, log, _, _, _, init in RUNS}
    for label, logs, evals in SOUPS:
        if not all(log in totals for log in logs):
            continue
        # the first ingredient's whole chain plus each other ingredient's own part (its end minus its start)
        t, flops = (totals[logs[0]][i] + sum(totals[log][i] - totals[inits[log]][i] for log in logs[1:]) for i in (0, 1))
        color = None
        first = True
        for suffix, summ in evals:
            m = final(summ)
            if m is None:
                continue
            marker = "*" if suffix == "flip" else "P"
            line = ax.plot([flops], [100 * m[1]], marker, ms=11, color=color, markeredgecolor="black", markeredgewidth=0.5,
                           label=f"{label}, {suffix}: {100 * m[1]:.1f}% ({m[2]} imgs)")[0]
            color = line.get_color()
            lines.append(f"| {label if first else '(same weights)'}, {suffix} | | {t:.1f} | {flops:.2f} | - | {m[2]} | "
                         f"{100 * m[0]:.1f}% | {100 * m[1]:.1f}% |")
            first = False
    ax.set_xscale("log")
    ax.set_xlabel("training compute (PFLOP, log scale; forward + backward + greedy / teacher passes)")
    ax.set_ylabel("certified accuracy, double masking k=6, 5x5 (%)")
    ax.axhline(60, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper left")
    fig.suptitle("CIFAR-10 (re-encoded copy): double-masking models; lines: per-epoch 64-image evaluation, "
                 "dots: final evaluation (256 images),\nstars: the same model on 1,024 random or all 10,000 test images "
                 "(the figure that counts; plus: the weight average without flip); dotted: issue 18's goal", fontsize=8)
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
