"""Issue 19: wrong types, unusable values, absurd work, full disks and misleading files: each is one
line naming the thing to fix, exit 2, no traceback, and (where a run folder is named) nothing
written before the refusal. One case per verb that can hit it."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from patchcert.checkpoint import load_tensors, save_checkpoint, save_tensors
from patchcert.cli import main
from patchcert.models import create_model
from test_runs_and_errors import _one_line as _shared_one_line

TINY = ["--model", "bagcert_cifar", "--model-cfg", '{"rf": 5, "width": 4}', "--dataset", "synthetic", "-n", "4",
        "--batch-size", "2", "--patch", "2x2", "--no-progress"]
CERT = ["certify", *TINY, "--square-cap", "0"]
ATTACK = ["attack", *TINY, "--steps", "2"]
TRAIN = ["train", "--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"rf":5,"width":4}',
         "--epochs", "1", "--batch-size", "8", "--set", "max_train_examples=8", "--set", "eval_examples=4",
         "--no-progress"]


def _one_line(capsys, rc, *needles: str) -> str:
    return _shared_one_line(capsys, rc, *needles, no_warnings=True)


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    save_checkpoint(p, create_model("bagcert_cifar", rf=5, width=4), classes=[str(i) for i in range(10)],
                    data={"dataset": "synthetic"})
    return p


# -- wrong types ------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["certify", "attack"])
@pytest.mark.parametrize("model, cfg, needle", [
    ("bagcert_cifar", '{"num_classes": "ten"}', "num_classes must be a positive int, got 'ten'"),
    ("bagcert_cifar", '{"num_classes": 0}', "num_classes must be a positive int, got 0"),
    ("bagcert_cifar", '{"num_classes": true}', "num_classes must be a positive int"),
    ("bagcert_cifar", '{"rf": [5]}', "bagcert_cifar"),
    ("ds_column", '{"base_cfg": "wide"}', "base_cfg must be an object"),
])
def test_wrong_typed_model_options(verb, model, cfg, needle, tmp_path, capsys):
    argv = _with(_with(CERT if verb == "certify" else ATTACK, "--model", model), "--model-cfg", cfg)
    rc = main(argv + ["--out", str(tmp_path / "r")])
    _one_line(capsys, rc, needle)
    assert not (tmp_path / "r").exists()


def test_wrong_typed_model_options_in_convert_and_train(tmp_path, capsys):
    pth = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    rc = main(["convert", str(pth), "--arch", "bagcert_cifar", "--model-cfg", '{"rf": [5]}',
               "--out", str(tmp_path / "x.safetensors")])
    _one_line(capsys, rc, "bagcert_cifar")
    rc = main(_with(TRAIN, "--set", 'model_cfg={"rf":[5]}') + ["--out", str(tmp_path / "t")])
    _one_line(capsys, rc, "bagcert_cifar")


@pytest.mark.parametrize("verb", ["certify", "attack"])
@pytest.mark.parametrize("key, value, needle", [
    ("num_classes", [10], "num_classes must be a positive int, got [10]"),
    ("num_classes", 0, "num_classes must be a positive int, got 0"),
    ("arch", ["bagcert_cifar"], "'arch' must be a model name"),
    ("config", {"rf": "five"}, "rf"),
])
def test_wrong_typed_checkpoint_metadata(verb, key, value, needle, ckpt, tmp_path, capsys):
    tensors, meta = load_tensors(ckpt)
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors, meta)
    rc = main([verb, "--model", str(bad), "--dataset", "synthetic", "-n", "2", "--no-progress",
               "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, str(bad), needle)


@pytest.mark.parametrize("key, value, needle", [
    ("classes", 5, "'classes' must be a list of class names"),
    ("classes", [1, 2], "'classes' must be a list of class names"),
    ("data", "cifar10", "'data' must be an object"),
    ("geometry", [1], "'geometry' must be an object"),
])
def test_wrong_typed_score_file_metadata(key, value, needle, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CERT + ["--out", str(out), "--save-scores"]) == 0
    capsys.readouterr()
    tensors, meta = load_tensors(out / "scores.safetensors")
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors, meta)
    rc = main(["certify", "--scores", str(bad), "--no-progress", "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, needle)
    rc = main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"])  # the run itself is intact
    assert rc == 0


# -- values the machine cannot take ------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["certify", "attack", "train"])
@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "99999999999999999999999", "must be an integer in [0, 2**63-1]"),
    ("--seed", "-1", "must be an integer in [0, 2**63-1]"),
    ("--device", "meta", "device 'meta' cannot run a model"),
    ("--device", "cuda:7", "cuda:7"),
])
def test_unusable_seed_and_device(verb, flag, value, needle, tmp_path, capsys):
    argv = {"certify": CERT, "attack": ATTACK, "train": TRAIN}[verb]
    rc = main(argv + [flag, value, "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("how", ["--set NaN", "toml warmup_epochs", "toml weight_decay", "--set Infinity"])
def test_non_finite_training_options(how, tmp_path, capsys):
    if how.startswith("--set"):
        value = how.split()[1]
        argv = TRAIN + ["--set", f"warmup_epochs={value}"]
        needle = "warmup_epochs must be a finite number"
    else:
        key = how.split()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"{key} = nan\n")
        argv = TRAIN + ["--config", str(cfg)]
        needle = f"{key} must be a finite number"
    rc = main(argv + ["--out", str(tmp_path / "t")])
    _one_line(capsys, rc, needle)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra", [["--shard", "0/2"], ["--resume"], ["--out", "x"], ["--save-scores"],
                                   ["--indices", "1,2"], ["--subset", "random:3"]])
def test_merge_refuses_the_flags_it_would_ignore(extra, tmp_path, capsys):
    out = tmp_path / "run"
    for i in range(2):
        assert main(CERT + ["--out", str(out), "--shard", f"{i}/2"]) == 0
    capsys.readouterr()
    rc = main(["certify", "--merge", str(out)] + extra)
    _one_line(capsys, rc, "--merge", extra[0])
    assert not (out / "summary.json").exists()  # nothing merged


# -- absurd work --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["certify", "attack"])
def test_absurd_double_masking_is_refused_before_any_work_with_its_cost(verb, tmp_path, capsys):
    argv = _with(CERT if verb == "certify" else ATTACK, "--patch", "5x5") + ["--defense", "double-masking:k=100000"]
    rc = main(argv + ["--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "k=100000", "784 masks", "307,720 masked forward passes per image", "smaller k")
    assert not (tmp_path / "r").exists()


def test_double_masking_bound_in_the_defense_itself():
    from patchcert.defenses.double_masking import MAX_MASKED_PASSES, DoubleMasking
    from patchcert.errors import PatchcertError

    assert len(DoubleMasking(k=6, patch="5x5").mask_set((32, 32))) == 36  # the default: 666 passes
    with pytest.raises(PatchcertError, match="307,720 masked forward passes"):
        DoubleMasking(k=100000, patch="5x5").mask_set((32, 32))
    ms = DoubleMasking(k=6, patch="area=24").mask_set((32, 32))  # several shapes, large but allowed
    assert len(ms) * (len(ms) + 1) // 2 <= MAX_MASKED_PASSES


# -- full disks -----------------------------------------------------------------------------------------------

def test_file_too_large_names_the_file_and_resume_completes(tmp_path, monkeypatch, capsys):
    """EFBIG (a file size limit) in the middle of a run, raised without a file name by the
    system call: the line names records.jsonl and says how to resume; the resumed run's records
    are those of an uninterrupted one."""
    out = tmp_path / "run"
    argv = _with(CERT, "-n", "8") + ["--out", str(out)]
    real_fsync, calls = os.fsync, {"n": 0}

    def too_large(fd):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.EFBIG, "File too large")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", too_large)
    rc = main(argv)
    line = _one_line(capsys, rc, "File too large", "--resume")
    assert str(tmp_path) in line
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(argv + ["--resume"]) == 0
    ref = tmp_path / "ref"
    assert main(_with(CERT, "-n", "8") + ["--out", str(ref)]) == 0
    assert (out / "records.jsonl").read_bytes() == (ref / "records.jsonl").read_bytes()


@pytest.mark.parametrize("verb", ["certify", "attack", "train", "report", "convert"])
def test_a_full_disk_names_the_file(verb, tmp_path, monkeypatch, capsys):
    if verb == "report":
        assert main(CERT + ["--out", str(tmp_path / "run")]) == 0
    pth = tmp_path / "w.pth"
    torch.save(create_model("bagcert_cifar", rf=5, width=4).state_dict(), pth)
    capsys.readouterr()
    real_replace = os.replace

    def full_replace(src, dst, *a, **k):
        if str(tmp_path) in str(dst) and Path(dst).name != ".lock":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_replace)
    argv = {"certify": CERT + ["--out", str(tmp_path / "c")], "attack": ATTACK + ["--out", str(tmp_path / "a")],
            "train": TRAIN + ["--out", str(tmp_path / "t")],
            "report": ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--no-plots"],
            "convert": ["convert", str(pth), "--arch", "bagcert_cifar", "--model-cfg", '{"rf": 5, "width": 4}',
                        "--out", str(tmp_path / "x.safetensors")]}[verb]
    rc = main(argv)
    line = _one_line(capsys, rc, "No space left on device", "free some space")
    assert str(tmp_path) in line  # the file is named


# -- misleading one-liners ------------------------------------------------------------------------------------

def test_unreadable_checkpoint_says_permission_denied(ckpt, monkeypatch, capsys, tmp_path):
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file) == str(ckpt):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    rc = main(["certify", "--model", str(ckpt), "--dataset", "synthetic", "-n", "2", "--no-progress",
               "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "cannot read checkpoint", str(ckpt), "Permission denied", "permissions")


@pytest.mark.parametrize("verb", ["certify", "convert"])
@pytest.mark.parametrize("kind", ["truncated zip", "truncated legacy", "empty", "hostile protocol 5"])
def test_pth_files_are_called_corrupt_or_hostile_without_torch_warnings(verb, kind, tmp_path, capsys):
    src = tmp_path / "w.pth"
    sd = create_model("bagcert_cifar", rf=5, width=4).state_dict()
    if kind == "truncated zip":
        torch.save(sd, src)
        src.write_bytes(src.read_bytes()[:2000])
    elif kind == "truncated legacy":
        torch.save(sd, src, _use_new_zipfile_serialization=False)
        src.write_bytes(src.read_bytes()[:2000])
    elif kind == "empty":
        src.write_bytes(b"")
    else:
        src.write_bytes(pickle.dumps(_Hostile(), protocol=5))
    argv = (["certify", "--model", str(src), "--dataset", "synthetic", "-n", "2", "--no-progress",
             "--out", str(tmp_path / "r")] if verb == "certify" else
            ["convert", str(src), "--arch", "bagcert_cifar", "--out", str(tmp_path / "x.safetensors")])
    rc = main(argv)
    _one_line(capsys, rc, str(src), "refused to load" if kind.startswith("hostile") else "corrupt or truncated")
    assert not (tmp_path / "pwned").exists()


class _Hostile:
    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def test_files_and_folders_are_told_apart(ckpt, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    rc = main(CERT + ["--data-dir", str(a_file), "--dataset", "cifar10", "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "data folder", "is a file, not a folder")
    rc = main(_with(CERT, "--dataset", f"imagefolder:{a_file}") + ["--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "image folder", "is a file, not a folder")
    rc = main(["report", str(a_file), "--out", str(tmp_path / "rep")])
    _one_line(capsys, rc, "run directory", "is a file, not a folder")
    rc = main(["certify", "--model", str(tmp_path), "--dataset", "synthetic", "-n", "2", "--no-progress",
               "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "is a folder, not a file")
    rc = main(["certify", "--scores", str(tmp_path), "--no-progress", "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "score file", "is a folder, not a file")
    rc = main(["convert", str(tmp_path), "--arch", "bagcert_cifar", "--out", str(tmp_path / "x.safetensors")])
    _one_line(capsys, rc, "source weights", "is a folder, not a file")
