"""Issue 9: certified (and clean) accuracy against training compute, from the per-epoch logs.

    python scripts/plot_training_compute.py            # writes docs/results/training_compute.png + .md

Each curve is one training run's ``log.csv`` (kept in ``docs/``); its x axis is the cumulative
training compute, 3 x 2 x (forward MACs per image) x (images seen), counted from the model's
convolutions with forward hooks (BatchNorm, ReLU and the loss are left out). A run initialised
from another model starts at that model's compute. The accuracies are the training loop's own
per-epoch evaluation (bf16 forward, sign votes, Condition 3.2, 5x5 patch) on the first 1,000
(shipped model) or 2,000 (the others) test images of the CIFAR-10 re-encoded copy.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from patchcert.models import create_model

TRAIN_IMAGES = 50_000
ROOT = Path(__file__).resolve().parent.parent

# (label, log, model, model_cfg, log of the run it was initialised from or None)
RUNS = [
    ("shipped: RF 7 w64, paper loss (24 ep)", "docs/shipped_model_train_log.csv", "bagcert_cifar", {"rf": 7, "width": 64}, None),
    ("pilot A: RF 7 w64, paper loss", "docs/pilots/a_s1_rf7_w64.csv", "bagcert_cifar", {"rf": 7, "width": 64}, None),
    ("pilot B: stride-2 RF 6 w192, paper loss", "docs/pilots/b_s2_rf6_w192.csv", "bagcert_cifar_s2", {"rf": 6, "width": 192}, None),
    ("pilot D: RF 7 w64, all-class margin + dense BCE", "docs/pilots/d_s1_rf7_w64_all_bce.csv", "bagcert_cifar", {"rf": 7, "width": 64}, None),
    ("pilot E: stride-2 RF 6 w192, all-class margin + dense BCE", "docs/pilots/e_s2_rf6_w192_all_bce.csv", "bagcert_cifar_s2", {"rf": 6, "width": 192}, None),
    ("pilot F: shipped model + 2 ep all-class margin + dense BCE", "docs/pilots/f_s1_rf7_w64_ft_all_bce.csv", "bagcert_cifar", {"rf": 7, "width": 64},
     "docs/shipped_model_train_log.csv"),
    ("long run: stride-2 RF 6 w192, BCE warm-up + paper loss", "docs/bagcert_cifar10_s2_rf6_w192_train_log.csv", "bagcert_cifar_s2",
     {"rf": 6, "width": 192}, None),
]


def forward_macs(name: str, cfg: dict) -> int:
    m = create_model(name, num_classes=10, **cfg).eval()
    total = [0]

    def hook(mod, inp, out):
        total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.zeros(1, 3, 32, 32))
    return total[0]


def read(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs/results/training_compute.png"))
    a = ap.parse_args()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_c, ax_k = fig.subplots(1, 2)
    lines = ["| run | epochs | training compute (PFLOP) | clean | certified 5x5 |", "|---|---|---|---|---|"]
    for label, log, name, cfg, init in RUNS:
        p = ROOT / log
        if not p.exists():
            continue
        rows = read(p)
        flop_img = 6 * forward_macs(name, cfg)
        start = 0.0
        if init is not None:
            start = len(read(ROOT / init)) * TRAIN_IMAGES * flop_img / 1e15
        x = [start + r["epoch"] * TRAIN_IMAGES * flop_img / 1e15 for r in rows]
        style = "-o" if len(rows) > 3 else "--s"
        ax_c.plot(x, [100 * r["eval_cert_acc"] for r in rows], style, ms=3, label=label)
        ax_k.plot(x, [100 * r["eval_clean_acc"] for r in rows], style, ms=3, label=label)
        last = rows[-1]
        lines.append(f"| {label} | {int(last['epoch'])} | {x[-1]:.2f} | {100 * last['eval_clean_acc']:.1f}% | "
                     f"{100 * last['eval_cert_acc']:.1f}% |")
    for ax, what in ((ax_c, "certified (5x5, Condition 3.2)"), (ax_k, "clean")):
        ax.set_xlabel("training compute (PFLOP, 3 x 2 x forward MACs x images)")
        ax.set_ylabel(f"{what} accuracy (%)")
        ax.grid(alpha=0.3)
    ax_c.axhline(45, color="grey", lw=0.8, ls=":")
    ax_k.axhline(70, color="grey", lw=0.8, ls=":")
    ax_c.legend(fontsize=6.5, loc="upper left")
    fig.suptitle("CIFAR-10 (re-encoded copy), BagCert-style training on 2 CPU cores; dotted: issue 9's goal")
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
