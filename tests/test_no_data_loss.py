"""Nothing a user types loses data (issue 19): a run never overwrites or deletes files it does not
own, and a finished run resumed is left byte-identical. Every test hashes every file before and
after (``.lock`` excepted: it is patchcert's own and holds the last holder's pid)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from patchcert import rundir
from patchcert.cli import main
from patchcert.errors import PatchcertError
from test_runs_and_errors import _one_line

CERT = ["certify", "--model", "bagcert_cifar", "--model-cfg", '{"rf": 5, "width": 4}', "--dataset", "synthetic",
        "-n", "4", "--batch-size", "2", "--patch", "2x2", "--no-progress", "--json", "--square-cap", "0"]
ATTACK = ["attack", *CERT[1:-2], "--steps", "2"]
TRAIN = ["train", "--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"rf":5,"width":4}',
         "--epochs", "1", "--batch-size", "8", "--set", "max_train_examples=8", "--set", "eval_examples=4",
         "--no-progress"]


def _hashes(root: Path) -> dict[str, str]:
    """Every file (recursively, symlinks as their target text) -> sha256; ``.lock`` left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            if f == rundir.LOCK_FILE:
                continue
            rel = str(p.relative_to(root))
            out[rel] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _user_folder(root: Path) -> Path:
    """A folder of the user's: temporary files of their own (also with a leading dot, also in
    sub-folders), a summary.csv and a .lock of their own."""
    root.mkdir()
    (root / ".draft.txt.tmp").write_text("mine")
    (root / ".config.json.tmp").write_text("mine too")
    (root / "sub").mkdir()
    (root / "sub" / ".notes.abc123.tmp").write_text("deep")
    (root / "sub" / ".summary.json.x1y2.tmp").write_text("not in a run folder")
    (root / "paper.tex").write_text("\\documentclass{article}")
    return root


# -- 1. resuming a finished run ------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--save-scores"], [], ["--save-scores", "--shard", "1/2"]])
def test_resume_of_a_finished_run_changes_no_byte(extra, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CERT + ["--out", str(out)] + extra) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    before = _hashes(out)
    assert "summary.json" in str(before) and (("scores.safetensors" in str(before)) == ("--save-scores" in extra))
    for _ in range(2):  # and again: a resume never breaks a later one
        assert main(CERT + ["--out", str(out), "--resume"] + extra) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip().splitlines()[-1] == first
        assert _hashes(out) == before
    if "--shard" not in extra:
        assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    else:
        from patchcert.results import load_run

        assert load_run(out / "shard-1-of-2")[0].n == 2


def test_a_run_interrupted_after_joining_its_scores_finishes_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CERT + ["--out", str(out), "--save-scores"]) == 0
    ref = _hashes(out)
    (out / "summary.json").unlink()  # as if killed between the score file and the summary
    (out / "summary.csv").unlink()
    assert main(CERT + ["--out", str(out), "--save-scores", "--resume"]) == 0, capsys.readouterr().err
    now = _hashes(out)
    for f in ("records.jsonl", "scores.safetensors", "config.json"):
        assert now[f] == ref[f]
    assert json.loads((out / "summary.json").read_text())["n"] == 4


# -- 2. train into a folder that is not a training run ----------------------------------------------

@pytest.mark.parametrize("resume", [False, True])
def test_train_refuses_a_certify_run_and_changes_nothing(resume, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CERT + ["--out", str(out)]) == 0
    capsys.readouterr()
    before = _hashes(out)
    rc = main(TRAIN + ["--out", str(out)] + (["--resume"] if resume else []))
    _one_line(capsys, rc, "not a training run folder", str(out))
    assert _hashes(out) == before


def test_train_refuses_a_users_folder_but_takes_an_empty_one(tmp_path, capsys):
    user = _user_folder(tmp_path / "mine")
    before = _hashes(user)
    rc = main(TRAIN + ["--out", str(user)])
    _one_line(capsys, rc, "not a training run folder", "paper.tex")
    assert _hashes(user) == before and not (user / rundir.LOCK_FILE).exists()
    # a lone config.json that is not a training config is not ours either
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "config.json").write_text('{"name": "my experiment"}\n')
    rc = main(TRAIN + ["--out", str(other)])
    _one_line(capsys, rc, "not a training config")
    assert (other / "config.json").read_text() == '{"name": "my experiment"}\n'
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(TRAIN + ["--out", str(empty)]) == 0
    # a training run interrupted before its first epoch (config.json only) still resumes
    (empty / "state.safetensors").unlink()
    for f in ("model.safetensors", "model.json", "log.csv"):
        (empty / f).unlink()
    assert main(TRAIN + ["--out", str(empty), "--resume"]) == 0


# -- 3. certify/attack into a folder of the user's -----------------------------------------------------

@pytest.mark.parametrize("argv", [CERT, ATTACK, CERT + ["--shard", "0/2"]], ids=["certify", "attack", "shard"])
def test_a_run_in_a_users_folder_removes_and_overwrites_nothing(argv, tmp_path, capsys):
    user = _user_folder(tmp_path / "mine")
    before = _hashes(user)
    assert main(argv + ["--out", str(user)]) == 0, capsys.readouterr().err
    after = _hashes(user)
    assert {k: v for k, v in after.items() if k in before} == before  # every file of the user's, byte for byte
    # a resume (which cleans the run's own stale temporary files) leaves them too
    (user / ".lock").unlink()
    assert main(argv + ["--out", str(user), "--resume"]) == 0
    assert {k: v for k, v in _hashes(user).items() if k in before} == before


@pytest.mark.parametrize("argv", [CERT, ATTACK, CERT + ["--shard", "0/2"]], ids=["certify", "attack", "shard"])
@pytest.mark.parametrize("name", ["summary.csv", "summary.json", "progress.json"])
def test_a_new_run_refuses_a_folder_holding_files_it_would_overwrite(argv, name, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / name).write_text("the user's own\n")
    rc = main(argv + ["--out", str(user)])
    if argv is ATTACK and name == "summary.csv":  # attack writes no summary.csv
        assert rc == 0
    else:
        _one_line(capsys, rc, "already holds", name, "no run to continue")
        assert sorted(p.name for p in user.iterdir()) == [name]  # nothing created, not even the lock
    assert (user / name).read_text() == "the user's own\n"


def test_a_users_own_lock_file_is_not_overwritten(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / ".lock").write_text("do not touch\n")
    rc = main(CERT + ["--out", str(user)])
    _one_line(capsys, rc, ".lock", "not patchcert's")
    assert (user / ".lock").read_text() == "do not touch\n"


def test_stale_tmp_cleaning_takes_only_the_run_files_own(tmp_path):
    d = tmp_path / "run"
    (d / "shard-0-of-2" / "scores.parts").mkdir(parents=True)
    (d / "scores.parts").mkdir()
    (d / "other").mkdir()
    ours = [d / ".summary.json.ab_12.tmp", d / ".records.jsonl.x.tmp", d / "shard-0-of-2" / ".config.json.q.tmp",
            d / "scores.parts" / ".000000002.safetensors.k9.tmp",
            d / "shard-0-of-2" / "scores.parts" / ".000000000.safetensors.z.tmp"]
    theirs = [d / ".notes.txt.ab.tmp", d / ".summary.json.tmp", d / "other" / ".summary.json.ab.tmp",
              d / "scores.parts" / ".summary.json.ab.tmp", d / ".summary.json.a b.tmp"]
    for f in ours + theirs:
        f.write_text("x")
    gone = rundir.clean_stale_tmp(d, recursive=True)
    assert sorted(gone) == sorted(ours)
    assert all(f.exists() for f in theirs)


def test_check_new_run_is_quiet_for_a_run_and_for_a_fresh_folder(tmp_path):
    rundir.check_new_run(tmp_path / "absent", ["summary.json"])
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(PatchcertError, match="summary.json"):
        rundir.check_new_run(tmp_path, ["summary.json"])
    (tmp_path / "config.json").write_text("{}")  # a run: resuming it is check_resume's business
    rundir.check_new_run(tmp_path, ["summary.json"])


# -- unreadable images: one line naming the file, or skipped on request --------------------------------

def _folder_with_bad_images(root: Path) -> tuple[Path, dict[int, Path]]:
    """4 classes x 3 PNGs (index = position in sorted order); examples 4 and 9 are broken: an empty
    file and a text file named .png."""
    from PIL import Image

    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * c, 10 * i, 100)).save(root / f"c{c}" / f"{i}.png")
    bad = {4: root / "c1" / "1.png", 9: root / "c3" / "0.png"}
    bad[4].write_bytes(b"")
    bad[9].write_text("not an image\n")
    return root, bad


def _folder_args(root: Path, workers: int) -> list[str]:
    return ["--model", "bagcert_cifar", "--model-cfg", '{"rf": 5, "width": 4}', "--dataset", f"imagefolder:{root}",
            "--dataset-cfg", '{"size": 32, "resize": 32}', "--batch-size", "4", "--patch", "2x2", "--no-progress",
            "--workers", str(workers)]


@pytest.mark.parametrize("verb", ["certify", "attack"])
def test_a_bad_image_in_a_worker_is_one_line_naming_the_file(verb, tmp_path, capsys):
    root, bad = _folder_with_bad_images(tmp_path / "imgs")
    extra = ["--steps", "2"] if verb == "attack" else ["--square-cap", "0"]
    rc = main([verb, *_folder_args(root, 1), *extra, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "worker process" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and str(bad[4]) in lines[0], err


def test_a_bad_image_while_training_is_one_line_naming_the_file(tmp_path, capsys):
    root, bad = _folder_with_bad_images(tmp_path / "imgs")
    rc = main(["train", "--dataset", f"imagefolder:{root}", "--model", "bagcert_cifar", "--set",
               'model_cfg={"rf":5,"width":4}', "--set", 'dataset_cfg={"size":32,"resize":32}', "--set",
               "data_workers=1", "--epochs", "1", "--batch-size", "12", "--set", "eval_examples=4",
               "--no-progress", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert rc == 2 and "Traceback" not in err and "worker process" not in err, err
    assert len(lines) == 1 and (str(bad[4]) in lines[0] or str(bad[9]) in lines[0]), err


def test_skip_bad_images_with_a_selection_keeps_dataset_indices_and_resumes(tmp_path, monkeypatch, capsys):
    """--indices: the skipped entries hold dataset indices (as the records do), and a run cut after
    the second batch's skip resumes to the same bytes (positions in the selection are not indices)."""
    import errno

    import patchcert.results as results

    root, bad = _folder_with_bad_images(tmp_path / "imgs")
    args = ["certify", *_folder_args(root, 1), "--square-cap", "0", "--skip-bad-images", "--indices", "0,3,4,6,9-11"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0, capsys.readouterr().err
    summary = json.loads((ref / "summary.json").read_text())
    assert [s["index"] for s in summary["metadata"]["skipped"]] == [4, 9]
    assert str(bad[9]) in summary["metadata"]["skipped"][1]["reason"]
    assert [json.loads(ln)["index"] for ln in (ref / "records.jsonl").read_text().splitlines()] == [0, 3, 6, 10, 11]
    assert summary["n"] == 5
    real, calls = results.append_jsonl, {"n": 0}

    def full(path, lines):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's records (its skipped image is written before them)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, lines)

    monkeypatch.setattr(results, "append_jsonl", full)
    cut = tmp_path / "cut"
    _one_line(capsys, main(args + ["--out", str(cut)]), "No space left on device", "--resume")
    monkeypatch.setattr(results, "append_jsonl", real)
    assert (cut / "skipped.jsonl").read_text().count("\n") == 2
    assert main(args + ["--out", str(cut), "--resume"]) == 0, capsys.readouterr().err
    for f in ("records.jsonl", "skipped.jsonl"):
        assert (cut / f).read_bytes() == (ref / f).read_bytes()
    assert json.loads((cut / "summary.json").read_text())["metadata"]["skipped"] == summary["metadata"]["skipped"]


def test_skip_bad_images_records_them_and_resume_and_shards_are_byte_identical(tmp_path, monkeypatch, capsys):
    import errno

    import patchcert.results as results

    root, bad = _folder_with_bad_images(tmp_path / "imgs")
    args = ["certify", *_folder_args(root, 1), "--square-cap", "0", "--skip-bad-images", "--json"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["n"] == 10
    summary = json.loads((ref / "summary.json").read_text())
    assert [s["index"] for s in summary["metadata"]["skipped"]] == [4, 9]
    assert str(bad[4]) in summary["metadata"]["skipped"][0]["reason"]
    assert summary["n"] == 10 and summary["results"][0]["n"] == 10  # in no count
    recs = [json.loads(ln)["index"] for ln in (ref / "records.jsonl").read_text().splitlines()]
    assert recs == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    # without workers: the same
    w0 = tmp_path / "w0"
    assert main(["certify", *_folder_args(root, 0), "--square-cap", "0", "--skip-bad-images", "--out", str(w0)]) == 0
    for f in ("records.jsonl", "skipped.jsonl"):
        assert (w0 / f).read_bytes() == (ref / f).read_bytes()
    # interrupted (a full disk at the third batch's records), then resumed: the same bytes
    real, calls = results.append_jsonl, {"n": 0}

    def full(path, lines):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, lines)

    monkeypatch.setattr(results, "append_jsonl", full)
    cut = tmp_path / "cut"
    rc = main(args + ["--out", str(cut)])
    _one_line(capsys, rc, "No space left on device", "--resume")
    monkeypatch.setattr(results, "append_jsonl", real)
    assert (cut / "skipped.jsonl").read_text().count("\n") == 2  # the third batch's skip is written, its records not
    assert main(args + ["--out", str(cut), "--resume"]) == 0, capsys.readouterr().err
    for f in ("records.jsonl", "skipped.jsonl"):
        assert (cut / f).read_bytes() == (ref / f).read_bytes()
    assert json.loads((cut / "summary.json").read_text())["metadata"]["skipped"] == summary["metadata"]["skipped"]
    # shards, merged: the same records and the same list of skipped images
    sh = tmp_path / "sh"
    for i in range(2):
        assert main(args + ["--out", str(sh), "--shard", f"{i}/2"]) == 0
    assert main(["certify", "--merge", str(sh), "--json"]) == 0
    capsys.readouterr()
    assert (sh / "records.jsonl").read_bytes() == (ref / "records.jsonl").read_bytes()
    merged = json.loads((sh / "summary.json").read_text())
    assert merged["metadata"]["skipped"] == summary["metadata"]["skipped"] and merged["n"] == 10
    # the report says so
    assert main(["report", str(ref), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    rep = (tmp_path / "rep" / "report.md").read_text()
    assert "skipped 2 unreadable image(s)" in rep and str(bad[9]) in rep
    # and a resume of the finished run changes nothing
    before = _hashes(ref)
    assert main(args + ["--out", str(ref), "--resume"]) == 0
    assert _hashes(ref) == before
