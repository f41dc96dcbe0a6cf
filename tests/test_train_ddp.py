"""``torchrun`` + DistributedDataParallel on 2 CPU processes with gloo.

Equality with a single process needs the same function of the global batch: every rank
takes its share of the same augmented global batch, gradients are averaged with share
weights, and ``sync_bn=True`` makes BatchNorm use the statistics of the global batch
(with per-rank BatchNorm -- DDP's default -- each rank normalises with the statistics of
its 8 images and the runs legitimately differ). What remains is float32 rounding of
different reduction orders, hence allclose. SGD keeps that rounding linear (Adam's first
steps divide by tiny second moments and would amplify it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchcert.checkpoint import load_tensors
from patchcert.train import TrainConfig, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FLAGS = ["--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"rf":5,"width":4}',
         "--objective", "ce", "--set", "objective_cfg={}", "--set", "optimizer=sgd", "--set", "sync_bn=true",
         "--epochs", "2", "--batch-size", "16", "--set", "max_train_examples=64", "--set", "eval_examples=16",
         "--set", "num_threads=1", "--set", "ema_decay=0.9", "--no-progress"]


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    try:
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s: {e.stderr[-2000:] if e.stderr else ''}")
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_torchrun_two_processes_match_one_process(tmp_path):
    run = tmp_path / "ddp"
    # epoch 1 through `python -m patchcert`, epoch 2 resumed through the console script
    p1 = _torchrun(["-m", "patchcert", "train", *FLAGS, "--out", str(run), "--stop-after", "1"], tmp_path)
    script = shutil.which("patchcert") or str(Path(sys.executable).with_name("patchcert"))
    assert Path(script).exists(), "the patchcert console script is not installed"
    p2 = _torchrun(["--no-python", script, "train", *FLAGS, "--out", str(run), "--resume"], tmp_path)

    # rank 0 alone prints and writes: one JSON line per launch, one run directory, no stray files
    for p, epoch in ((p1, 1), (p2, 2)):
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        assert len(lines) == 1 and json.loads(lines[0])["results"][0]["epoch"] == epoch
    assert sorted(f.name for f in run.iterdir()) == [".lock", "config.json", "log.csv", "model.json", "model.safetensors",
                                                      "state.safetensors"]
    assert list(tmp_path.iterdir()) == [run]
    ddp, meta = load_tensors(run / "state.safetensors")
    assert meta["world_size"] == 2 and meta["epoch"] == 2 and len(meta["history"]) == 2
    assert len((run / "log.csv").read_text().splitlines()) == 3

    single = tmp_path.parent / f"{tmp_path.name}_single"
    cfg = TrainConfig(dataset="synthetic", model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, objective="ce",
                      objective_cfg={}, optimizer="sgd", sync_bn=True, epochs=2, batch_size=16, max_train_examples=64,
                      eval_examples=16, num_threads=1, ema_decay=0.9, out_dir=str(single))
    train(cfg)
    one, meta1 = load_tensors(single / "state.safetensors")
    assert sorted(one) == sorted(ddp)
    for k in one:
        a, b = ddp[k].double(), one[k].double()
        if k.startswith(("model.", "ema.")) and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=k)
        elif k.startswith("opt."):  # momentum = running sum of gradients: rounding relative to its scale
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(b.abs().max()) + 1e-6, msg=k)
        elif k.endswith("num_batches_tracked"):
            assert torch.equal(ddp[k], one[k])
    for r2, r1 in zip(meta["history"], meta1["history"]):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["eval_clean_acc"] == r1["eval_clean_acc"] and r2["eval_cert_acc"] == r1["eval_cert_acc"]
    shutil.rmtree(single)
