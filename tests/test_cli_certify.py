"""``patchcert certify`` end to end on synthetic data with a tiny bagcert_cifar (width 4)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchcert
from patchcert.checkpoint import save_checkpoint
from patchcert.cli import main
from patchcert.pretrained import DEFAULT_MODEL, WEIGHTS_ENV
from patchcert.results import PROGRESS_FILE, RECORDS_FILE, SCORES_FILE, SUMMARY_CSV, SUMMARY_FILE, load_run

REPO = Path(__file__).resolve().parents[1]
NO_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_model(num_classes=4, seed=0):
    torch.manual_seed(seed)
    m = patchcert.create_model("bagcert_cifar", num_classes=num_classes, width=4)
    with torch.no_grad():  # class 0 votes in most places: label-0 images certify, with varying margins
        m.head.weight.mul_(0.003)
        m.head.bias.copy_(torch.tensor([0.3, -0.3, 0.2, -0.6, 0.0][:num_classes]))
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    p = d / "tiny.safetensors"
    save_checkpoint(p, tiny_model(), classes=[f"class{i}" for i in range(4)], data={"dataset": "synthetic", "seed": 0})
    return p


def cli(capsys, *argv):
    """Run ``patchcert certify ...`` in-process: (exit code, stdout, stderr)."""
    rc = main(["certify", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def base(ckpt, out, *extra):
    return ["--model", ckpt, "-n", 12, "--batch-size", 5, "--out", out, "--no-progress", "--square-cap", 12, *extra]


PATCHES = ["5x5", "2%", "area=24"]
DEFENSES = ["voting", "voting:condition=3.3"]


def full_args(ckpt, out, *extra):
    a = base(ckpt, out, *extra)
    for p in PATCHES:
        a += ["--patch", p]
    for d in DEFENSES:
        a += ["--defense", d]
    return a


# -- the --json contract and the files -------------------------------------------------------

def _short(line: str) -> dict:
    """The run summary of a ``certify --json`` line (``{"verb", "n", "results", "out_dir"}``)."""
    obj = json.loads(line)
    assert obj.pop("verb") == "certify" and "out_dir" in obj
    obj.pop("out_dir")
    return obj


def test_json_contract_and_records_schema(tmp_path, capsys, ckpt):
    rc, out, err = cli(capsys, *full_args(ckpt, tmp_path / "run"), "--json")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    obj = json.loads(last)
    assert set(obj) == {"verb", "n", "results", "out_dir"} and obj["n"] == 12 and obj["verb"] == "certify"
    assert obj["out_dir"] == str(tmp_path / "run")
    assert [(r["defense"], r["patch"]) for r in obj["results"]] == [
        (d, p) for d in ["voting(sign,3.2)", "voting(sign,3.3)"] for p in PATCHES]
    for r in obj["results"]:
        assert set(r) == {"defense", "patch", "clean_accuracy", "certified_accuracy"}
        assert 0.0 <= r["certified_accuracy"] <= r["clean_accuracy"] <= 1.0
    assert obj["results"][0]["certified_accuracy"] > 0  # the tiny model certifies its class-0 images
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert [r["certified_accuracy"] for r in summary["results"]] == [r["certified_accuracy"] for r in obj["results"]]
    assert (tmp_path / "run" / SUMMARY_CSV).is_file()
    assert json.loads((tmp_path / "run" / PROGRESS_FILE).read_text())["complete"] is True
    md = summary["metadata"]
    for k in ["model", "model_sha256", "checkpoint", "data", "num_examples", "seed", "device", "dtype", "versions",
              "forward_seconds_per_image", "geometry", "image_size", "command"]:
        assert k in md, k
    assert md["checkpoint"] == str(ckpt) and md["model"] == "bagcert_cifar" and md["dtype"] == "float64"
    assert md["command"].startswith("patchcert ") and md["image_size"] == [32, 32]
    res = {r["patch"]: r for r in summary["results"] if r["defense"] == "voting(sign,3.2)"}
    assert res["2%"]["resolved"] == "5x5" and res["5x5"]["windows"] == [[11, 11]]
    assert res["area=24"]["resolved"].startswith("1x24,2x12") and "certify_seconds_per_image" in res["5x5"]
    lines = (tmp_path / "run" / RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 12
    for i, line in enumerate(lines):
        r = json.loads(line)
        assert set(r) == {"index", "label", "clean_pred", "defenses"} and r["index"] == i
        assert isinstance(r["label"], int) and isinstance(r["clean_pred"], int)
        assert set(r["defenses"]) == {"voting(sign,3.2)", "voting(sign,3.3)"}
        for o in r["defenses"].values():
            assert set(o) >= {"pred", "correct", "certified", "worst", "largest_square"}
            assert o["correct"] == (o["pred"] == r["label"])
            assert list(o["certified"]) == PATCHES and list(o["worst"]) == PATCHES
            assert isinstance(o["largest_square"], int) and 0 <= o["largest_square"] <= 12
            for p in PATCHES:
                w = o["worst"][p]
                assert set(w) == {"margin", "window", "row", "col", "class"}
                assert len(w["window"]) == 2 and isinstance(w["row"], int)
                if o["certified"][p]:
                    assert o["correct"] and w["margin"] >= 0
            assert set(o["shapes"]["area=24"]) == {"1x24", "2x12", "3x8", "4x6", "6x4", "8x3", "12x2", "24x1"}
            assert o["certified"]["area=24"] == all(o["shapes"]["area=24"].values())
            # a 5x5 patch is certified iff the largest certified square is at least 5
            assert o["certified"]["5x5"] == (o["largest_square"] >= 5)


def test_table_output(tmp_path, capsys, ckpt):
    rc, out, err = cli(capsys, *base(ckpt, tmp_path / "run"))
    assert rc == 0, err
    assert "voting(sign,3.2)" in out and "certified" in out and "5x5" in out and "11x11" in out
    assert "largest certified square: mean side" in out and str(tmp_path / "run") in out
    assert "{" not in out.splitlines()[-1]


def test_resume_after_truncated_records(tmp_path, capsys, ckpt):
    assert cli(capsys, *full_args(ckpt, tmp_path / "full"))[0] == 0
    ref = (tmp_path / "full" / RECORDS_FILE).read_bytes()
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    cut = ref.index(b"\n", len(ref) // 2) - 40  # mid-line
    (part / RECORDS_FILE).write_bytes(ref[:cut])
    (part / SUMMARY_FILE).unlink()
    (part / PROGRESS_FILE).write_text(json.dumps({"done": 5, "total": 12, "complete": False}))
    rc, out, err = cli(capsys, *full_args(ckpt, part), "--json")
    assert rc == 2 and "already holds a run; pass --resume" in err
    with pytest.raises(patchcert.PatchcertError, match="incomplete"):
        load_run(part)
    rc, out, err = cli(capsys, *full_args(ckpt, part), "--resume", "--json")
    assert rc == 0, err
    assert (part / RECORDS_FILE).read_bytes() == ref
    assert _short(out.splitlines()[-1]) == json.loads(json.dumps(load_run(tmp_path / "full")[0].short()))


def test_shards_then_merge(tmp_path, capsys, ckpt):
    assert cli(capsys, *full_args(ckpt, tmp_path / "single"), "--json")[0] == 0
    run = tmp_path / "sharded"
    rc, out, err = cli(capsys, *full_args(ckpt, run), "--shard", "0/2")
    assert rc == 0 and "patchcert certify --merge" in err
    rc, out, err = cli(capsys, "--merge", run, "--json")
    assert rc == 2 and "shard(s) 1 of 2 are missing" in err
    assert cli(capsys, *full_args(ckpt, run), "--shard", "1/2")[0] == 0
    rc, out, err = cli(capsys, "--merge", run, "--json")
    assert rc == 0, err
    assert (run / RECORDS_FILE).read_bytes() == (tmp_path / "single" / RECORDS_FILE).read_bytes()
    assert _short(out.splitlines()[-1]) == load_run(tmp_path / "single")[0].short()


def test_scores_round_trip(tmp_path, capsys, ckpt):
    assert cli(capsys, *full_args(ckpt, tmp_path / "m"), "--save-scores")[0] == 0
    assert (tmp_path / "m" / SCORES_FILE).is_file()
    args = ["--scores", tmp_path / "m" / SCORES_FILE, "--out", tmp_path / "s", "--no-progress", "--batch-size", 5,
            "--square-cap", 12, "--json"]
    for p in PATCHES:
        args += ["--patch", p]
    for d in DEFENSES:
        args += ["--defense", d]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert (tmp_path / "s" / RECORDS_FILE).read_bytes() == (tmp_path / "m" / RECORDS_FILE).read_bytes()
    assert _short(out.splitlines()[-1]) == load_run(tmp_path / "m")[0].short()


def test_registry_model_is_random_with_a_warning(tmp_path, capsys, caplog):
    rc, out, err = cli(capsys, "--model", "bagcert_cifar", "--model-cfg", '{"width": 4}', "--dataset", "synthetic",
                       "-n", 4, "--out", tmp_path / "r", "--no-progress", "--json", "--square-cap", 4)
    assert rc == 0, err
    assert "randomly initialised" in caplog.text
    assert json.loads(out.splitlines()[-1])["n"] == 4


def test_default_model(tmp_path, capsys, monkeypatch, ckpt):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    rc, out, err = cli(capsys, "-n", 4, "--out", tmp_path / "a", "--no-progress")
    assert rc == 2 and f"no shipped model '{DEFAULT_MODEL}'" in err and "--model" in err
    (tmp_path / "weights").mkdir()
    shutil.copy(ckpt, tmp_path / "weights" / f"{DEFAULT_MODEL}.safetensors")
    rc, out, err = cli(capsys, "-n", 4, "--out", tmp_path / "b", "--no-progress", "--json", "--square-cap", 4)
    assert rc == 0, err
    obj = json.loads(out.splitlines()[-1])
    assert obj["n"] == 4 and obj["results"][0]["defense"] == "voting(sign,3.2)" and obj["results"][0]["patch"] == "5x5"


def test_dataset_options_follow_the_checkpoint(tmp_path, capsys):
    """A model trained on synthetic 'colour' data (seed 7) is certified on that data's test split."""
    p = tmp_path / "colour.safetensors"
    save_checkpoint(p, tiny_model(), classes=[f"class{i}" for i in range(4)],
                    data={"dataset": "synthetic", "seed": 7, "pattern": "colour"},
                    train_config={"dataset": "synthetic", "dataset_cfg": {"pattern": "colour", "seed": 7}})
    rc, out, err = cli(capsys, "--model", p, "-n", 4, "--out", tmp_path / "r", "--no-progress", "--square-cap", 4)
    assert rc == 0, err
    data = load_run(tmp_path / "r")[0].metadata.data
    assert data["pattern"] == "colour" and data["seed"] == 7 and data["name"] == "synthetic"
    rc, out, err = cli(capsys, "--model", p, "-n", 4, "--out", tmp_path / "r2", "--no-progress", "--square-cap", 4,
                       "--dataset-cfg", '{"pattern": "stripe"}')
    assert rc == 0, err
    assert load_run(tmp_path / "r2")[0].metadata.data["pattern"] == "stripe"


@pytest.mark.data
def test_cifar10_from_the_shared_data(tmp_path, capsys, shared_data):
    rc, out, err = cli(capsys, "--model", "bagcert_cifar", "--model-cfg", '{"width": 4}', "--data-dir", shared_data,
                       "--start", 100, "-n", 6, "--out", tmp_path / "c", "--no-progress", "--json", "--square-cap", 4,
                       "--patch", "2%")
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["results"][0]["patch"] == "2%"
    summary, records = load_run(tmp_path / "c")
    assert [r.index for r in records] == list(range(100, 106))
    assert summary.metadata.data["dataset"] == "cifar10" and summary.metadata.data["split"] == "test"
    assert summary.metadata.classes[0] == "airplane" and summary.results[0].resolved == "5x5"


def test_image_folder_is_streamed_through_workers_with_the_same_records(tmp_path, capsys, ckpt):
    """An image folder is decoded batch by batch (here by 2 worker processes): same records as without workers."""
    root = _imagefolder(tmp_path / "imgs", classes=4, per_class=3)
    runs = []
    for w in (0, 2):
        rc, out, err = cli(capsys, "--model", ckpt, "--dataset", f"imagefolder:{root}", "--dataset-cfg",
                           '{"size": 32, "resize": 32}', "-n", 11, "--start", 1, "--batch-size", 4, "--workers", w,
                           "--out", tmp_path / f"w{w}", "--no-progress", "--square-cap", 4)
        assert rc == 0, err
        summary, records = load_run(tmp_path / f"w{w}")
        runs.append([r.to_json() for r in records])
        assert [r.index for r in records] == list(range(1, 12)) and summary.metadata.data["dataset"] == "imagefolder"
    assert runs[0] == runs[1]


# -- bad input: one line, exit 2, nothing that looks finished ---------------------------------

def _imagefolder(root: Path, classes: int, per_class: int = 2, size: int = 32) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c, 10 * i, 100)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("case, match", [
    ("missing_ckpt", "does not exist"),
    ("corrupt_ckpt", "not a valid safetensors"),
    ("patch_too_big", "larger than the image"),
    ("malformed_patch", "malformed patch spec '5y5'"),
    ("unknown_model", "unknown model 'resnet9000'"),
    ("unknown_defense", "unknown defense 'nosuch'"),
    ("bad_defense_option", "unknown option"),
    ("missing_data", "does not exist"),
    ("negative_count", "--num-examples must be positive"),
    ("zero_batch", "--batch-size must be positive"),
    ("negative_workers", "--workers must be >= 0"),
    ("bad_shard", "shard"),
    ("class_mismatch", "the model has 4 classes but imagefolder:imgs has 3"),
    ("missing_scores", "score file"),
    ("bad_model_cfg", "--model-cfg is not valid JSON"),
    ("bad_dataset_cfg", "--dataset-cfg must be a JSON object"),
    ("cifar_options", "takes no options"),
    ("scores_and_model", "--scores certifies cached score maps"),
    ("merge_nothing", "no shard directories"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, ckpt, case, match):
    out = tmp_path / "run"
    argv = {
        "missing_ckpt": ["--model", tmp_path / "nope.safetensors", "--out", out],
        "corrupt_ckpt": ["--model", tmp_path / "corrupt.safetensors", "--out", out],
        "patch_too_big": base(ckpt, out, "--patch", "33x5"),
        "malformed_patch": base(ckpt, out, "--patch", "5y5"),
        "unknown_model": ["--model", "resnet9000", "--out", out],
        "unknown_defense": base(ckpt, out, "--defense", "nosuch"),
        "bad_defense_option": base(ckpt, out, "--defense", "voting:colour=red"),
        "missing_data": ["--model", ckpt, "--dataset", "cifar10", "--data-dir", tmp_path / "no_data", "--out", out],
        "negative_count": ["--model", ckpt, "-n", "-5", "--out", out],
        "zero_batch": ["--model", ckpt, "--batch-size", 0, "--out", out],
        "negative_workers": ["--model", ckpt, "--workers", -1, "--out", out],
        "bad_shard": base(ckpt, out, "--shard", "2/2"),
        "class_mismatch": ["--model", ckpt, "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--out", out],
        "missing_scores": ["--scores", tmp_path / "none.safetensors", "--out", out],
        "bad_model_cfg": ["--model", "bagcert_cifar", "--model-cfg", "{width", "--out", out],
        "bad_dataset_cfg": ["--model", ckpt, "--dataset-cfg", "[1]", "--out", out],
        "cifar_options": ["--model", ckpt, "--dataset", "cifar10", "--data-dir", tmp_path, "--dataset-cfg",
                          '{"n": 3}', "--out", out],
        "scores_and_model": ["--scores", tmp_path / "x.safetensors", "--model", ckpt, "--out", out],
        "merge_nothing": ["--merge", tmp_path],
    }[case]
    (tmp_path / "corrupt.safetensors").write_bytes(os.urandom(4096))
    if case == "class_mismatch":
        _imagefolder(tmp_path / "imgs", classes=3)
    rc, stdout, err = cli(capsys, *argv, "--json") if case != "merge_nothing" else cli(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("patchcert certify: error: "), err
    assert match in lines[0]
    assert stdout == ""
    assert not (out / SUMMARY_FILE).exists()


def test_hostile_checkpoint_runs_no_code(tmp_path):
    """A .pth pickle that would create a file when unpickled: refused, in a real process."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"stem.0.weight": Evil()}))
    env = {**os.environ, **NO_THREADS}
    p = subprocess.run([sys.executable, "-m", "patchcert", "certify", "--model", str(evil), "-n", "2",
                        "--out", str(tmp_path / "run"), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert not marker.exists()
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to load" in lines[0], p.stderr
    assert p.stdout == ""
    assert not (tmp_path / "run").exists()


# -- torchrun -------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_ranks_merge_to_single_run(tmp_path, capsys, ckpt):
    assert cli(capsys, *full_args(ckpt, tmp_path / "single"))[0] == 0
    env = {**os.environ, **NO_THREADS}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "patchcert", "certify", *map(str, full_args(ckpt, tmp_path / "dist")), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    obj = _short(p.stdout.strip().splitlines()[-1])
    assert obj == load_run(tmp_path / "single")[0].short()
    assert (tmp_path / "dist" / "shard-0-of-2" / SUMMARY_FILE).is_file()
    assert (tmp_path / "dist" / "shard-1-of-2" / SUMMARY_FILE).is_file()
    assert (tmp_path / "dist" / RECORDS_FILE).read_bytes() == (tmp_path / "single" / RECORDS_FILE).read_bytes()
