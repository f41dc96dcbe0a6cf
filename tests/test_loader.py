"""Streaming data (issue 10): the sharded per-epoch sampler, per-example augmentation, DataLoader
batches, the streaming training path (bit-identical resume, independent of workers, no eager
decoding) and DDP on 2 gloo processes reading disjoint shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcert.checkpoint import load_tensors
from patchcert.data import ImageDataset, ImageFolderDataset, augment_crop_flip, load_dataset, synthetic_dataset
from patchcert.loader import (
    STREAM_AUGMENT,
    EpochBatchSampler,
    TrainView,
    default_workers,
    example_generator,
    load_batches,
    mix_seed,
)
from patchcert.train import TrainConfig, train

TESTS = Path(__file__).resolve().parent


def _image_folder(root: Path, n: int = 40, classes: int = 4, size: tuple[int, int] = (44, 36)) -> Path:
    """``n`` PNG images (``size`` = (w, h)) in ``classes`` class folders; class c is tinted."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
        arr[..., c % 3] += 100
        Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


# -- seeds and the sampler ------------------------------------------------------------------------

def test_mix_seed_is_deterministic_and_separates_nearby_tuples():
    seeds = {mix_seed(s, st, e, i) for s in range(3) for st in range(3) for e in range(4) for i in range(50)}
    assert len(seeds) == 3 * 3 * 4 * 50 and all(0 <= v < 2**63 for v in seeds)
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(3, 2, 1)
    a = torch.rand(4, generator=example_generator(0, 1, 7))
    assert torch.equal(a, torch.rand(4, generator=example_generator(0, 1, 7)))
    assert not torch.equal(a, torch.rand(4, generator=example_generator(0, 2, 7)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_each_global_batch_disjointly(world):
    n, b = 23, 6
    samplers = [EpochBatchSampler(n, b, seed=5, rank=r, world=world) for r in range(world)]
    one = EpochBatchSampler(n, b, seed=5)
    for epoch in (0, 1, 7):
        for s in samplers + [one]:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        glob = one.global_batches()
        assert all(len(sh) == n // b == len(s) for sh, s in zip(shares, samplers))
        for t, g in enumerate(glob):  # step t: the ranks' shares partition the global batch
            keys = [k for sh in shares for k in sh[t]]
            assert all(e == epoch for e, _ in keys)
            idx = [i for _, i in keys]
            assert len(idx) == len(set(idx)) == b and sorted(idx) == sorted(g.tolist())
            assert [i for _, i in shares[0][t]] == g[0::world].tolist()
        seen = [i for g in glob for i in g.tolist()]
        assert len(set(seen)) == (n // b) * b  # a permutation, last partial batch dropped
    assert not torch.equal(one.order(0), one.order(1))
    assert torch.equal(one.order(3), EpochBatchSampler(n, b, seed=5, rank=1, world=2).order(3))
    with pytest.raises(ValueError):
        EpochBatchSampler(4, 2, seed=0, rank=2, world=2)


# -- per-example augmentation --------------------------------------------------------------------

def test_train_view_augments_each_example_from_seed_epoch_index():
    data = synthetic_dataset(12, 3, 16, seed=1)
    view = TrainView(data, augment=True, seed=9)
    x, y, i = view[(2, 5)]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == int(data.labels[5]) and i == 5
    ref = augment_crop_flip(data.images[5:6], 4, generator=example_generator(9, 2, 5, STREAM_AUGMENT))[0]
    assert torch.equal(x, ref)  # pad-4 crop + flip drawn from the example's own generator
    assert torch.equal(view[(2, 5)][0], x)  # same key, same pixels, whatever was read before
    assert sum(not torch.equal(view[(e, 5)][0], x) for e in range(3, 11)) >= 6  # other epochs differ
    assert torch.equal(TrainView(data, augment=False, seed=9)[(2, 5)][0], data.images[5])


def test_train_view_of_an_image_folder_takes_random_crops(tmp_path):
    root = _image_folder(tmp_path / "f", n=8)
    src = load_dataset(f"imagefolder:{root}", train=True, train_view=True, size=32, resize=36)
    assert src.image_size == (36, 36) and src.info["crop"] == 32
    view = TrainView(src, augment=True, seed=0)
    assert view.image_size == (32, 32)
    crops = [view[(e, 3)][0] for e in range(6)]
    assert all(c.shape == (3, 32, 32) for c in crops) and len({c.numpy().tobytes() for c in crops}) > 1
    full = src[3][0]
    assert torch.equal(TrainView(src, augment=False, seed=0)[(0, 3)][0], full[:, 2:34, 2:34])  # centre crop


# -- batches through the DataLoader ---------------------------------------------------------------

def test_load_batches_is_ordered_and_the_same_with_workers(tmp_path):
    root = _image_folder(tmp_path / "f", n=10)
    lazy = load_dataset(f"imagefolder:{root}", size=32, resize=36)
    eager = load_dataset(f"imagefolder:{root}", size=32, resize=36, in_memory=True)
    assert isinstance(eager, ImageDataset) and eager.in_memory and not lazy.in_memory
    assert default_workers(eager) == 0 and default_workers(lazy) >= 1
    batches = [[3, 1], range(4, 9), [0]]
    for ds in (lazy, eager):
        for workers in (0, 2):
            got = list(load_batches(ds, batches, num_workers=workers))
            assert [b[2].tolist() for b in got] == [[3, 1], [4, 5, 6, 7, 8], [0]]
            for (x, y, idx) in got:
                assert torch.equal(x, eager.images[idx]) and torch.equal(y, eager.labels[idx])


def test_worker_start_method(monkeypatch, caplog):
    import multiprocessing

    from patchcert.loader import worker_start_method

    monkeypatch.delenv("PATCHCERT_WORKER_START", raising=False)
    default = worker_start_method()
    assert default == ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None)
    monkeypatch.setenv("PATCHCERT_WORKER_START", "spawn")
    assert worker_start_method() == "spawn"
    monkeypatch.setenv("PATCHCERT_WORKER_START", "threads")
    assert worker_start_method() == default and "ignoring PATCHCERT_WORKER_START" in caplog.text


# a fresh process: after one large block is freed (a batch tensor), where do image-sized blocks go?
_HEAP_PROBE = r"""
import ctypes, json, sys
from patchcert.runtime import bound_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "bounded":
    assert bound_allocator()
libc.free(libc.malloc(5 << 20))
before = libc.mallinfo2()
blocks = [libc.malloc(300_000) for _ in range(32)]
after = libc.mallinfo2()
print(json.dumps({"mapped": after.hblks - before.hblks, "free_in_heap": before.fordblks,
                  "heap_growth": after.arena - before.arena}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_workers_bound_the_allocator_so_decoded_images_do_not_fragment_the_heap():
    """The cause of the workers' memory growth (benchmarks/data_memory.md) and its fix, shown on
    glibc itself: by default, freeing a 5 MiB block (a batch) raises glibc's mmap threshold, and
    300 KB blocks (decoded images) then come from the heap, where their varying sizes fragment
    it; with :func:`~patchcert.runtime.bound_allocator` (what every DataLoader worker runs) each
    gets its own mapping, returned to the OS on free."""
    from patchcert.loader import _init_worker, make_loader

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PATCHCERT_NO_MALLOPT"))}
    try:
        out = {mode: json.loads(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], env=env, check=True,
                                               capture_output=True, text=True).stdout)
               for mode in ("default", "bounded")}
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("glibc without mallinfo2")
        raise
    assert out["default"]["mapped"] == 0 and out["default"]["heap_growth"] > 0
    # a block is mapped unless it fits into free space the heap already has
    assert out["bounded"]["mapped"] >= 32 - out["bounded"]["free_in_heap"] // 300_000 > 0
    assert out["bounded"]["heap_growth"] == 0
    loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(4)), [[0, 1], [2, 3]], num_workers=1)
    assert loader.worker_init_fn is _init_worker


# -- the streaming training path -------------------------------------------------------------------

TINY = dict(model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, dataset="synthetic", epochs=3, batch_size=16,
            warmup_epochs=0.5, eval_examples=16, max_train_examples=48, augment=True, seed=1, num_threads=1,
            loader="stream")


def _same_state(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a / "state.safetensors")[0], load_tensors(b / "state.safetensors")[0]
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    {"model_cfg": {"rf": 5, "width": 4, "shake": True}},  # shake-shake draws from the global RNG
    {"model": "ds_column", "model_cfg": {"b": 4, "base": "resnet_small", "base_cfg": {"width": 4}},
     "objective": "ds", "objective_cfg": {}, "eval_examples": 4, "eval_batch_size": 4},  # per-example ablations
])
def test_stream_resume_is_bit_identical_and_independent_of_workers(tmp_path, kw):
    one = TrainConfig(**{**TINY, **kw}, out_dir=str(tmp_path / "one"))
    train(one)
    two = TrainConfig(**{**TINY, **kw, "data_workers": 2}, out_dir=str(tmp_path / "two"))
    train(two, stop_after_epoch=1)
    train(TrainConfig(**{**TINY, **kw, "data_workers": 0}, out_dir=str(tmp_path / "two")), resume=True,
          stop_after_epoch=2)  # the number of workers may change between sittings
    train(two, resume=True)
    _same_state(tmp_path / "one", tmp_path / "two")
    meta = load_tensors(tmp_path / "one" / "state.safetensors")[1]
    assert meta["epoch"] == 3 and meta["config"]["loader"] == "stream"


def test_memory_and_stream_paths_are_different_runs_and_resume_checks_the_loader(tmp_path):
    from patchcert.errors import PatchcertError

    mem = TrainConfig(**{**TINY, "loader": "memory", "epochs": 1}, out_dir=str(tmp_path / "m"))
    train(mem)
    st = TrainConfig(**{**TINY, "epochs": 1}, out_dir=str(tmp_path / "s"))
    train(st)
    a = load_tensors(tmp_path / "m" / "state.safetensors")[0]
    b = load_tensors(tmp_path / "s" / "state.safetensors")[0]
    assert sorted(a) == sorted(b) and any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    with pytest.raises(PatchcertError, match="loader"):
        train(TrainConfig(**{**TINY, "loader": "memory", "epochs": 2}, out_dir=str(tmp_path / "s")), resume=True)
    for bad, msg in (({"loader": "lazy"}, "unknown loader"), ({"data_workers": -1}, "data_workers")):
        with pytest.raises(PatchcertError, match=msg):
            TrainConfig.from_dict(bad).validate()


@pytest.mark.slow
def test_image_folder_training_streams_and_never_decodes_the_folder_at_once(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "f", n=24)

    def no_eager(self):  # the streaming path must not materialise the folder
        raise AssertionError("ImageFolderDataset.load() called")

    monkeypatch.setattr(ImageFolderDataset, "load", no_eager)
    reads: list[int] = []
    real = ImageFolderDataset.__getitem__

    def counted(self, i):
        reads.append(int(i))
        return real(self, i)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", counted)
    cfg = TrainConfig(model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, dataset=f"imagefolder:{root}",
                      dataset_cfg={"size": 32, "resize": 36}, epochs=1, batch_size=8, eval_examples=8,
                      data_workers=0, num_threads=1, out_dir=str(tmp_path / "run"))
    m = train(cfg)
    assert m["epoch"] == 1 and np.isfinite(m["loss"])
    assert len(reads) == 24 + 8  # one epoch of 3 batches of 8, then 8 evaluation images: each read once
    meta = load_tensors(tmp_path / "run" / "state.safetensors")[1]
    assert meta["config"]["loader"] == "auto"


# -- DDP: 2 gloo processes, each reading only its share --------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_stream_ranks_read_disjoint_shares_and_match_one_process(tmp_path):
    root = _image_folder(tmp_path / "imgs", n=40)
    cfg = dict(model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, dataset=f"imagefolder:{root}",
               dataset_cfg={"size": 32, "resize": 36}, objective="ce", objective_cfg={}, optimizer="sgd", lr=0.05,
               sync_bn=True, epochs=2, batch_size=16, eval_examples=8, num_threads=1, data_workers=1, seed=3)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "out_dir": str(tmp_path / "ddp")}))
    trace = tmp_path / "trace"
    trace.mkdir()
    # forked workers inherit the helper's tracing patch (fork-server workers would import the unpatched class)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATCHCERT_WORKER_START": "fork"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_trace_train.py"), str(tmp_path / "cfg.json"), str(trace)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]

    reads = {r: [int(v) for v in (trace / f"rank{r}.txt").read_text().split()] for r in (0, 1)}
    sampler = EpochBatchSampler(40, 16, seed=3)
    for epoch, chunk in enumerate((slice(0, 16), slice(16, 32))):  # 2 steps of 8 reads per rank and epoch
        glob = sampler.global_batches(epoch)
        r0, r1 = reads[0][chunk], reads[1][chunk]
        assert not set(r0) & set(r1)  # disjoint shares ...
        assert r0 == [i for g in glob for i in g[0::2].tolist()]  # ... exactly batch[rank::2] of each global batch
        assert r1 == [i for g in glob for i in g[1::2].tolist()]
    assert len(reads[0]) == len(reads[1]) == 32

    single = TrainConfig(**cfg, out_dir=str(tmp_path / "one"))
    train(single)
    ddp, meta2 = load_tensors(tmp_path / "ddp" / "state.safetensors")
    one, meta1 = load_tensors(tmp_path / "one" / "state.safetensors")
    assert meta2["world_size"] == 2 and meta2["epoch"] == 2
    for k in one:
        if k.startswith("model.") and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(ddp[k].double(), one[k].double(), rtol=1e-4, atol=1e-4, msg=k)
    for r2, r1 in zip(meta2["history"], meta1["history"]):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
