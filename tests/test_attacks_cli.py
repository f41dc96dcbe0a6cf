"""``patchcert attack``: runs, JSON contract, PNGs, resume, bad input, and the loud soundness failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from patchcert.checkpoint import save_checkpoint
from patchcert.cli import main
from patchcert.defenses import list_defenses, register_defense
from patchcert.defenses.voting import Voting
from patchcert.models import list_models, register_model
from patchcert.models.base import ScoreMapModel, trace_geometry


class _AttackTestNet(ScoreMapModel):
    """3x3 conv -> ReLU -> 1x1 head on 16x16 images (receptive field 3)."""

    def __init__(self, num_classes: int = 4, width: int = 6) -> None:
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.arch, self.config, self.num_classes = "attack_test_net", {"width": width}, num_classes
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.geometry = trace_geometry([(3, 1, 1), (1, 1, 0)], input_size=(16, 16))

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, f):
        return self.head(f)


if "attack_test_net" not in list_models():
    @register_model
    def attack_test_net(num_classes: int = 4, width: int = 6) -> _AttackTestNet:
        return _AttackTestNet(num_classes, width)


if "broken_certify" not in list_defenses():
    @register_defense("broken_certify")
    class BrokenCertify(Voting):
        """Deliberately unsound: certifies every correctly predicted image."""

        name = "broken_certify"

        @classmethod
        def example_configs(cls):
            return []  # deliberately unsound: kept out of the registry-wide soundness tests

        def certify(self, scores, labels, windows):
            return self.predict(scores) == labels.to(scores.device)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = _AttackTestNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, classes=[f"c{i}" for i in range(4)], data={"dataset": "synthetic"})
    return path


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


BASE = ["attack", "--dataset", "synthetic", "--no-progress", "--steps", "15", "--step-size", "0.1"]


def test_attack_run_json_records_summary_and_png(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    rc, so, se = _run(BASE + ["--model", str(ckpt), "-n", "10", "--batch-size", "4", "--patch", "4x4",
                              "--patch", "2x2", "--out", str(out), "--save-png", "1", "--json"], capsys)
    assert rc == 0, se
    short = json.loads(so.strip().splitlines()[-1])
    assert short["n"] == 10 and short["soundness_failures"] == 0
    assert [(r["defense"], r["patch"]) for r in short["results"]] == [("voting(sign,3.2)", "4x4"),
                                                                      ("voting(sign,3.2)", "2x2")]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(10))
    for res in short["results"]:
        assert res["certified_accuracy"] <= res["robust_accuracy"] <= res["clean_accuracy"]
        outs = [r["defenses"][res["defense"]] for r in records]
        assert res["clean_accuracy"] == sum(o["correct"] for o in outs) / 10
        assert res["certified_accuracy"] == sum(o["certified"][res["patch"]] for o in outs) / 10
        robust = sum(o["correct"] and not o["attack"][res["patch"]]["success"] for o in outs) / 10
        assert res["robust_accuracy"] == robust
    full = summary["results"][0]
    assert full["soundness_failures"] == 0 and full["attack_seconds_per_image"] > 0
    assert summary["metadata"]["attack"]["steps"] == 15 and summary["metadata"]["model_sha256"]
    # an attacked record says where and what
    att = [o["defenses"]["voting(sign,3.2)"]["attack"]["4x4"] for o in records]
    some = next(a for a in att if a["attacked"])
    assert some["patch"] == [4, 4] and 0 <= some["pixel"][0] <= 12 and some["steps"] > 0
    pngs = sorted((out / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["000000_voting_sign_3.2_2x2.png", "000000_voting_sign_3.2_4x4.png"]
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 600 and im.size[1] > 200


def test_resume_gives_the_records_of_an_uninterrupted_run(ckpt, tmp_path, capsys):
    args = BASE + ["--model", str(ckpt), "-n", "6", "--batch-size", "2", "--patch", "3x3", "--json"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(args + ["--out", str(a)], capsys)[0] == 0
    assert _run(args + ["--out", str(b)], capsys)[0] == 0
    lines = (b / "records.jsonl").read_text().splitlines(keepends=True)
    (b / "records.jsonl").write_text("".join(lines[:3]) + lines[3][:20])  # interrupted mid-write
    (b / "summary.json").unlink()
    rc, _, se = _run(args + ["--out", str(b)], capsys)
    assert rc == 2 and "--resume" in se
    rc, _, se = _run(args + ["--out", str(b), "--resume"], capsys)
    assert rc == 0, se
    assert (a / "records.jsonl").read_text() == (b / "records.jsonl").read_text()


def test_soundness_failure_is_loud_and_fails_the_command(ckpt, tmp_path, capsys):
    rc, so, se = _run(BASE + ["--model", str(ckpt), "-n", "16", "--patch", "8x8", "--defense", "broken_certify",
                              "--locations", "2", "--out", str(tmp_path / "r"), "--json"], capsys)
    assert rc == 3
    assert "SOUNDNESS FAILURE" in se and "CERTIFIED" in se
    short = json.loads(so.strip().splitlines()[-1])
    assert short["soundness_failures"] > 0
    assert short["results"][0]["soundness_failures"] == short["soundness_failures"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    bad = summary["results"][0]["soundness_failure_indices"]
    lines = (tmp_path / "r" / "records.jsonl").read_text().splitlines()
    recs = {json.loads(line)["index"]: json.loads(line) for line in lines}
    for i in bad:
        d = recs[i]["defenses"]["broken_certify(sign,3.2)"]
        assert d["certified"]["8x8"] and d["attack"]["8x8"]["success"] and d["attack"]["8x8"]["soundness_failure"]


@pytest.mark.parametrize("extra, needle", [
    (["-n", "-1"], "--num-examples"),
    (["--patch", "99x99"], "larger than the image"),
    (["--patch", "5y5"], "malformed patch"),
    (["--defense", "nope"], "unknown defense"),
    (["--steps", "-3"], "steps"),
    (["--step-size", "0"], "step size"),
    (["--save-png", "-1"], "--save-png"),
    (["--surrogate", "magic"], "surrogate"),
])
def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, extra, needle):
    rc, so, se = _run(BASE + ["--model", str(ckpt), "-n", "2", "--out", str(tmp_path / "x")] + extra, capsys)
    assert rc == 2
    lines = [ln for ln in se.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in se
    assert not (tmp_path / "x" / "summary.json").exists()


def test_hostile_or_missing_checkpoint_and_missing_data(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"w": Boom()}))
    for argv, needle in [
        (["--model", str(evil)], "refused"),
        (["--model", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--model", "attack_test_net", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata")], "does not exist"),
    ]:
        rc, so, se = _run(["attack", "--no-progress", "-n", "2", "--out", str(tmp_path / "y")] + argv, capsys)
        assert rc == 2 and "pwned" not in so and "Traceback" not in se, se
        assert needle in se.strip().splitlines()[-1]
