"""``patchcert train`` on the command line: one-line errors with exit status 2, a real run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchcert.checkpoint import load_tensors
from patchcert.cli import main

TINY = ["--dataset", "synthetic", "--model", "bagcert_cifar", "--set", 'model_cfg={"rf":5,"width":4}',
        "--batch-size", "16", "--set", "max_train_examples=32", "--set", "eval_examples=8", "--no-progress"]


def _fails(argv, capsys, *expect: str) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("patchcert train: error:"), err
    for s in expect:
        assert s in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,expect", [
    (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["train", "--epochs", "x"], ["invalid int value"]),
    (["train", "--epochs", "-3"], ["epochs must be positive"]),
    (["train", "--epochs", "0"], ["epochs must be positive"]),
    (["train", "--config", "/nonexistent/run.toml"], ["does not exist"]),
    (["train", "--set", "model_cfg={bad"], ["--set model_cfg", "not valid JSON"]),
    (["train", "--set", "epochs=three"], ["--set epochs", "not valid JSON"]),
    (["train", "--set", "nosuch=1"], ["unknown training option 'nosuch'"]),
    (["train", "--set", "novalue"], ["KEY=VALUE"]),
    (["train", "--set", "bf16=1"], ["bf16 must be bool"]),
    (["train", "--objective", "nope"], ["unknown objective 'nope'"]),
    (["train", "--lr", "-1"], ["lr must be positive"]),
    (["train", "--stop-after", "0"], ["--stop-after"]),
])
def test_bad_flags_exit_2_with_one_line(argv, expect, capsys):
    _fails(argv, capsys, *expect)


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    _fails(["train", "--config", str(bad)], capsys, "cannot parse config")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"epochs": 2, "colour": "red"}))
    _fails(["train", "--config", str(unknown)], capsys, "unknown training option(s): colour")
    neg = tmp_path / "neg.toml"
    neg.write_text("epochs = -1\n")
    _fails(["train", "--config", str(neg)], capsys, "epochs must be positive")


def test_missing_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PATCHCERT_DATA", raising=False)
    _fails(["train", "--dataset", "cifar10", "--out", str(tmp_path / "r"), "--no-progress"], capsys,
           "no data folder", "PATCHCERT_DATA")
    _fails(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"),
            "--no-progress"], capsys, "does not exist")


def test_train_resume_and_refuse_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('objective = "bagcert"\nepochs = 2\nwarmup_epochs = 0.5\n[objective_cfg]\nmargin = 0.25\nsigma = 0.0\n')
    assert main(["train", "--config", str(cfg), *TINY, "--out", str(out), "--stop-after", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["verb"] == "train" and res["out_dir"] == str(out)
    assert res["results"][0]["epoch"] == 1 and res["results"][0]["out_dir"] == str(out)
    _fails(["train", "--config", str(cfg), *TINY, "--out", str(out)], capsys, "already holds a run", "--resume")
    _fails(["train", "--config", str(cfg), *TINY, "--out", str(out), "--resume", "--lr", "0.01"], capsys,
           "cannot resume", "lr")
    assert main(["train", "--config", str(cfg), *TINY, "--out", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["epoch"] == 2
    meta = load_tensors(Path(out) / "state.safetensors")[1]
    assert meta["config"]["objective_cfg"] == {"margin": 0.25, "sigma": 0.0} and meta["epoch"] == 2


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    argv = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "p")]) == 0
    cap = capsys.readouterr()
    assert "train" in cap.err and "step" in cap.err  # tqdm's bar
    assert len(cap.out.strip().splitlines()) == 1  # stdout: the final metrics only
