"""Run folders held by one process, stale temporary files, and errors that never trace back
(files where folders should be, full disks, read-only places, absurd model sizes)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import patchcert
from patchcert import rundir
from patchcert.checkpoint import load_tensors, portable_metadata, save_checkpoint
from patchcert.cli import main
from patchcert.errors import PatchcertError
from patchcert.models import create_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
CERT = ["certify", "--model", "bagcert_cifar", "--model-cfg", '{"rf": 5, "width": 4}', "--dataset", "synthetic",
        "-n", "6", "--batch-size", "2", "--patch", "2x2", "--no-progress", "--json", "--square-cap", "0"]


def _one_line(capsys, rc, *needles: str, no_warnings: bool = False) -> str:
    """The CLI exited 2 with exactly one error line containing every needle, and no traceback
    (``no_warnings``: nor any warning line); returns that line. Shared by the error-path tests."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (no_warnings and "Warning" in err), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


class _Holder:
    """A separate process holding a folder (like a second patchcert run) until stopped."""

    def __init__(self, path: Path, mode: str = "exclusive", shard: Path | None = None) -> None:
        code = textwrap.dedent(f"""
            import sys, time
            from patchcert.rundir import hold
            with hold({str(path)!r}, {mode!r}):
                if {str(shard) if shard else ''!r}:
                    with hold({str(shard) if shard else ''!r}):
                        print("held", flush=True); time.sleep(900)
                else:
                    print("held", flush=True); time.sleep(900)
        """)
        env = {**os.environ, "PYTHONPATH": SRC}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


# -- one process per run folder -----------------------------------------------------------------

def test_a_second_process_on_a_busy_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    h = _Holder(out)
    try:
        rc = main(CERT + ["--out", str(out)])
        _one_line(capsys, rc, "in use by another patchcert process", f"pid {h.proc.pid}")
        rc = main(CERT + ["--out", str(out), "--resume"])  # a resume while the run goes on: refused too
        _one_line(capsys, rc, "in use")
        rc = main(["attack", *CERT[1:-2], "--steps", "2", "--out", str(out)])
        _one_line(capsys, rc, "in use")
        assert not (out / "records.jsonl").exists()
    finally:
        h.stop()
    # the holder is gone (killed: its lock went with it): the folder is free again
    assert main(CERT + ["--out", str(out)]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 6


def test_shards_run_side_by_side_but_a_merge_or_unsharded_run_waits(tmp_path, capsys):
    out = tmp_path / "run"
    h = _Holder(out, "shared", shard=out / "shard-0-of-2")
    try:
        assert main(CERT + ["--out", str(out), "--shard", "1/2"]) == 0  # another shard: fine
        capsys.readouterr()
        _one_line(capsys, main(CERT + ["--out", str(out), "--shard", "0/2"]), "shard-0-of-2", "in use")
        _one_line(capsys, main(["certify", "--merge", str(out)]), "in use")
    finally:
        h.stop()


def test_nested_holds_in_one_process_and_lock_release(tmp_path):
    with rundir.hold(tmp_path / "r") as p:
        with rundir.hold(p):  # the same process may hold it again (e.g. merge inside a torchrun job)
            pass
        r = subprocess.run([sys.executable, "-c", f"from patchcert.rundir import hold\nwith hold({str(p)!r}): pass"],
                           env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True)
        assert r.returncode != 0 and "is in use by another patchcert process" in r.stderr
    # released: another process may take it now
    subprocess.run([sys.executable, "-c", f"from patchcert.rundir import hold\nwith hold({str(p)!r}): pass"],
                   env={**os.environ, "PYTHONPATH": SRC}, check=True)


def test_stale_tmp_files_of_an_interrupted_write_are_removed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CERT + ["--out", str(out), "-n", "4"]) == 0
    stale = [out / ".summary.json.x1y2.tmp", out / ".progress.json.abc.tmp"]
    for f in stale:
        f.write_text("{")
    keep = out / "notes.tmp"  # not one of ours (no leading dot): left alone
    keep.write_text("mine")
    (out / "summary.json").unlink()
    assert main(CERT + ["--out", str(out), "-n", "4", "--resume"]) == 0
    assert not any(f.exists() for f in stale) and keep.read_text() == "mine"


# -- files and folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["certify", "attack", "report", "train"])
def test_out_naming_a_file_or_a_path_below_a_file(verb, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    if verb == "report":
        assert main(CERT + ["--out", str(tmp_path / "run")]) == 0
        capsys.readouterr()
    argv = {
        "certify": CERT,
        "attack": ["attack", *CERT[1:-2], "--steps", "2"],
        "report": ["report", str(tmp_path / "run")],
        "train": ["train", "--dataset", "synthetic", "--model", "bagcert_cifar", "--set",
                  'model_cfg={"rf":5,"width":4}', "--epochs", "1", "--batch-size", "8", "--set",
                  "max_train_examples=8", "--set", "eval_examples=4", "--no-progress"],
    }[verb]
    for out, needle in ((f, "is a file, not a directory"), (f / "below", "is a file, not a directory")):
        rc = main(argv + ["--out", str(out)])
        _one_line(capsys, rc, str(f))
    assert f.read_text() == "x"


def test_read_only_place_is_one_line(tmp_path, monkeypatch, capsys):
    def ro(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", ro)
    rc = main(CERT + ["--out", str(tmp_path / "new" / "run")])
    _one_line(capsys, rc, "Read-only file system", "writable --out")


def test_full_disk_is_one_line_and_resume_completes_the_run(tmp_path, monkeypatch, capsys):
    import patchcert.results as results

    out = tmp_path / "run"
    real = results.append_jsonl
    calls = {"n": 0}

    def full(path, lines):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, lines)

    monkeypatch.setattr(results, "append_jsonl", full)
    rc = main(CERT + ["--out", str(out)])
    _one_line(capsys, rc, "No space left on device", "records.jsonl", "--resume")
    monkeypatch.setattr(results, "append_jsonl", real)
    assert main(CERT + ["--out", str(out), "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main(CERT + ["--out", str(ref)]) == 0
    assert (out / "records.jsonl").read_text() == (ref / "records.jsonl").read_text()


def test_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    import patchcert.train.state as state  # where the training state is written

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state, "save_tensors", full)
    rc = main(["train", "--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"rf":5,"width":4}',
               "--epochs", "1", "--batch-size", "8", "--set", "max_train_examples=8", "--set", "eval_examples=4",
               "--no-progress", "--out", str(tmp_path / "t")])
    _one_line(capsys, rc, "No space left on device", "state.safetensors")


# -- absurd model sizes ------------------------------------------------------------------------------

def test_absurd_model_sizes_are_refused_before_allocating(tmp_path, capsys):
    with pytest.raises(PatchcertError, match="parameters"):
        create_model("bagcert_cifar", width=10_000_000)
    rc = main(CERT[:4] + ['{"width": 10000000}'] + CERT[5:] + ["--out", str(tmp_path / "c")])
    _one_line(capsys, rc, "parameters", "memory")
    # a checkpoint whose metadata says so
    small = create_model("bagcert_cifar", rf=5, width=4)
    ck = tmp_path / "huge.safetensors"
    save_checkpoint(ck, small, classes=[str(i) for i in range(10)], data={"dataset": "synthetic"})
    tensors, meta = load_tensors(ck)
    meta["config"]["width"] = 10_000_000
    from patchcert.checkpoint import save_tensors

    save_tensors(ck, tensors, meta)
    rc = main(["certify", "--model", str(ck), "--dataset", "synthetic", "-n", "2", "--no-progress",
               "--out", str(tmp_path / "d")])
    _one_line(capsys, rc, "parameters")
    rc = main(["train", "--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"width":10000000}',
               "--epochs", "1", "--no-progress", "--out", str(tmp_path / "t")])
    _one_line(capsys, rc, "parameters")
    pth = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    rc = main(["convert", str(pth), "--arch", "bagcert_cifar", "--model-cfg", '{"width": 10000000}',
               "--out", str(tmp_path / "x.safetensors")])
    _one_line(capsys, rc, "parameters")


# -- metadata and configuration ----------------------------------------------------------------------

def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_shipped_metadata_holds_no_absolute_paths():
    import patchcert

    wdir = Path(patchcert.__file__).parent / "weights"
    files = sorted(wdir.glob("*.safetensors"))
    assert files
    for f in files:
        _, meta = load_tensors(f)
        side = json.loads(f.with_suffix(".json").read_text())
        for s in list(_strings(meta)) + list(_strings(side)):
            assert not os.path.isabs(s), (f.name, s)
        assert meta["data"]["root"] == "cifar-10-batches-py"


def test_checkpoints_do_not_record_absolute_paths(tmp_path):
    m = create_model("bagcert_cifar", rf=5, width=4)
    md = save_checkpoint(tmp_path / "m.safetensors", m, data={"dataset": "cifar10", "root": "/home/someone/data/c10"},
                         train_config={"out_dir": "runs/x", "data_dir": "/srv/data"})
    _, meta = load_tensors(tmp_path / "m.safetensors")
    for d in (md, meta, json.loads((tmp_path / "m.json").read_text())):
        assert d["data"]["root"] == "c10" and d["train_config"] == {"out_dir": "runs/x", "data_dir": "data"}
    assert portable_metadata({"a": ["/x/y", "rel/z", "~/q"], "b": 3}) == {"a": ["y", "rel/z", "q"], "b": 3}


def test_cifar10_splits_are_not_the_same_images():
    from patchcert.train.loop import _same_images

    tr = {"dataset": "cifar10", "root": "/d/cifar-10-batches-py", "split": "train"}
    te = {"dataset": "cifar10", "root": "/d/cifar-10-batches-py", "split": "test"}
    assert not _same_images(tr, te) and _same_images(tr, dict(tr))
    # an image folder read for training and for evaluation *is* the same images
    assert _same_images({"dataset": "imagefolder", "root": "/d/x", "split": "train"},
                        {"dataset": "imagefolder", "root": "/d/x", "split": "eval"})


def test_python_3_10_gets_a_toml_parser():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in text
    assert "\"tomli>=1.1; python_version < '3.11'\"" in text


@pytest.mark.distributed
@pytest.mark.slow
def test_a_torchrun_job_on_a_busy_folder_stops_on_every_rank(tmp_path):
    out = tmp_path / "run"
    h = _Holder(out)
    try:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "patchcert", *CERT, "--out", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    finally:
        h.stop()
    assert p.returncode != 0
    errs = [ln for ln in p.stderr.splitlines() if "patchcert certify: error:" in ln]
    # every rank stops; at least rank 0 says why (a peer may be torn down by gloo before it prints)
    assert 1 <= len(errs) <= 2 and all("in use by another patchcert process" in e for e in errs), p.stderr[-2000:]
    # torchrun's launcher reports the failed workers with its own traceback; no patchcert frame in it
    # (frames of patchcert's own source files; not "patchcert" anywhere in the line: a clone named
    # patchcert holds torch's own frames under .../patchcert/.venv/...)
    pkg = str(Path(patchcert.__file__).resolve().parent) + os.sep
    assert not [ln for ln in p.stderr.splitlines() if ln.strip().startswith("File") and pkg in ln]
    assert not (out / "shard-0-of-2").exists()
