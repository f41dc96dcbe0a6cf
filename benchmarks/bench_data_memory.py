"""Peak memory of ``patchcert certify`` and of one training epoch on an image folder, as the folder grows.

Issue 10, part 1: image folders are decoded on access (``ImageFolderDataset``, DataLoader workers),
so memory should not grow with the number of images. This script

1. generates image folders of N JPEGs (default 1,000 and 4,000; 10 classes; 224-400 px sides,
   smooth random content, quality 90) unless they exist,
2. runs each command in a subprocess and samples its whole process tree (the main process and
   its DataLoader workers) every 20 ms from ``/proc``: the peak RSS of the main process, the peak
   of the summed RSS of the tree (counts pages shared by forked workers once per process: an
   upper bound) and the peak summed PSS (shared pages divided among their sharers: the
   tree's real footprint),
3. prints markdown tables: the peaks, and the course of each run (main RSS and tree PSS at each
   tenth of its wall time: memory that grew with the images read would rise along the row).

Commands measured for each folder (a random-init ``bagcert_imagenet`` RF 17 at width 2: the data
path, not the model, is what is measured):

* ``certify``: every image of the folder, batch 32, 2 workers, voting, a 2% patch.
* ``train (stream)``: one epoch over the folder, batch 32, 2 workers (the default for folders), then an
  evaluation of 64 images (batch 32).
* ``train (memory)``: the same epoch with ``loader = "memory"`` (every image decoded into RAM
  first, as ``load_image_folder`` did before issue 10), for comparison.

Usage::

    python benchmarks/bench_data_memory.py --root /tmp/patchcert-jpegs --sizes 1000 4000 16000 --memory-up-to 4000

Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` JPEGs under ``root/c<k>/`` (skipped if the folder already holds ``n`` images)."""
    import numpy as np
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(224, 401)), int(rng.integers(224, 401))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)  # smooth content: realistic JPEG sizes
        img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo.extend(kids.get(q, []))
    return out


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; peak memory (MiB) of the main process and of its process tree, wall time."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_rss = peak_pss = 0
    series: list[tuple[float, int, int]] = []  # (seconds, main RSS, tree PSS) in KiB
    while p.poll() is None:
        pids = _tree(p.pid)
        rss = sum(_kb(Path(f"/proc/{q}/status"), "VmRSS") for q in pids)
        pss = sum(_kb(Path(f"/proc/{q}/smaps_rollup"), "Pss") for q in pids)
        peak_main = max(peak_main, _kb(Path(f"/proc/{p.pid}/status"), "VmHWM"))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        main_rss = _kb(Path(f"/proc/{p.pid}/status"), "VmRSS")
        if main_rss:  # 0: the process has just exited
            series.append((time.perf_counter() - t0, main_rss, pss))
        time.sleep(0.02)
    err = p.stderr.read() if p.stderr else ""
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    # the course of the run: main RSS and tree PSS at 10%, 20%, ..., 100% of its wall time
    course = []
    for f in range(1, 11):
        upto = [s for s in series if s[0] <= wall * f / 10] or series[:1]
        course.append((upto[-1][1] / 1024, upto[-1][2] / 1024) if upto else (0.0, 0.0))
    return {"main_peak_mib": peak_main / 1024, "tree_peak_rss_mib": peak_rss / 1024,
            "tree_peak_pss_mib": peak_pss / 1024, "seconds": wall, "course": course}


def commands(folder: Path, n: int, out: Path) -> dict[str, list[str]]:
    exe = [sys.executable, "-m", "patchcert"]
    data = ["--dataset", f"imagefolder:{folder}"]
    model = {"rf": 17, "width": 2}  # tiny: JPEG decoding, not the model, should dominate
    train = [*exe, "train", *data, "--model", "bagcert_imagenet", "--set", f"model_cfg={json.dumps(model)}",
             "--set", 'dataset_cfg={"size": 224, "resize": 256}', "--epochs", "1", "--batch-size", "32",
             "--set", "warmup_epochs=0", "--set", "eval_examples=64", "--set", "eval_batch_size=32",
             "--set", "eval_patch=2%",
             "--set", "data_workers=2", "--no-progress"]
    return {
        "certify": [*exe, "certify", "--model", "bagcert_imagenet", "--model-cfg", json.dumps(model), *data,
                    "--dataset-cfg", '{"size": 224, "resize": 256}', "-n", str(n), "--batch-size", "32",
                    "--workers", "2", "--defense", "voting", "--patch", "2%", "--square-cap", "0",
                    "--no-progress", "--out", str(out / "certify")],
        "train (stream)": [*train, "--out", str(out / "train-stream")],
        "train (memory)": [*train, "--set", "loader=memory", "--out", str(out / "train-memory")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "patchcert-jpegs"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--only", nargs="*", help="command names to run (default: all)")
    ap.add_argument("--memory-up-to", type=int, default=None,
                    help="run 'train (memory)' only on folders of at most this many images")
    ap.add_argument("--md", help="also write the results as a markdown file (e.g. benchmarks/data_memory.md)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    for n in args.sizes:
        folder = make_folder(Path(args.root) / f"n{n}", n)
        with tempfile.TemporaryDirectory() as tmp:
            for name, cmd in commands(folder, n, Path(tmp)).items():
                if args.only and name not in args.only:
                    continue
                if name == "train (memory)" and args.memory_up_to is not None and n > args.memory_up_to:
                    continue
                r = measure(cmd, env)
                rows.append((name, n, r))
                print(f"{name:15s} n={n:5d}  main {r['main_peak_mib']:7.0f} MiB  tree RSS {r['tree_peak_rss_mib']:7.0f} "
                      f"MiB  tree PSS {r['tree_peak_pss_mib']:7.0f} MiB  {r['seconds']:6.1f} s", flush=True)
    table = ["| command | images | main process peak RSS | process tree peak RSS (sum) | process tree peak PSS | wall |",
             "|---|---|---|---|---|---|"]
    for name, n, r in rows:
        table.append(f"| {name} | {n:,} | {r['main_peak_mib']:.0f} MiB | {r['tree_peak_rss_mib']:.0f} MiB | "
                     f"{r['tree_peak_pss_mib']:.0f} MiB | {r['seconds']:.0f} s |")
    course = ["| command | images | main process RSS at 10%, 20%, ..., 100% of the run (MiB) | process tree PSS, same times (MiB) |",
              "|---|---|---|---|"]
    for name, n, r in rows:
        course.append(f"| {name} | {n:,} | {' '.join(f'{a:.0f}' for a, _ in r['course'])} | "
                      f"{' '.join(f'{b:.0f}' for _, b in r['course'])} |")
    growth = []
    for name in dict.fromkeys(r[0] for r in rows):
        mine = sorted((n, r) for nm, n, r in rows if nm == name)
        for (n0, r0), (n1, r1) in zip(mine, mine[1:]):
            growth.append(f"* {name}: {n0:,} -> {n1:,} images: main process {r1['main_peak_mib'] - r0['main_peak_mib']:+.0f} "
                          f"MiB, process tree (PSS) {r1['tree_peak_pss_mib'] - r0['tree_peak_pss_mib']:+.0f} MiB")
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(course) + ("\n\n" + "\n".join(growth) if growth else ""))
    if args.md:
        import platform

        import torch

        cmd = "python benchmarks/bench_data_memory.py " + " ".join(sys.argv[1:])
        doc = [
            "# Peak memory of certify and of one training epoch on an image folder (issue 10)",
            "",
            f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs).",
            "",
            (__doc__ or "").split("\n\n", 1)[1].split("Usage::")[0].strip(),
            "",
            *table,
            "",
            "Memory over the course of each run (the last sample before each tenth of its wall time; a",
            "run that grew with the images it has read would rise from left to right):",
            "",
            *course,
            "",
            "Growth with the folder:",
            "",
            *growth,
            "",
        ]
        Path(args.md).write_text("\n".join(doc))


if __name__ == "__main__":
    main()
