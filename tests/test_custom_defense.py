"""A new defense written as one class in this test file (nothing in ``src/`` knows it) works in
``certify``, ``attack`` and ``report``, and joins the registry-wide soundness tests."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from patchcert.cli import main
from patchcert.defenses import Defense, Prepared, competitor, create_defense, list_defenses, register_defense
from patchcert.models import list_models, register_model
from patchcert.models.base import ScoreMapModel, trace_geometry


class AboveMeanVotes(Defense):
    """Every cell votes for each class that scores above the cell's mean score; prediction =
    most votes; certificate = BagCert's Condition 3.2 (inside a window the adversary may set
    any votes: the label none, a competitor all)."""

    evidence_name = "above-mean votes"
    relaxation_bounded = True

    def __init__(self, wrap: bool = False) -> None:
        self.wrap = bool(wrap)

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"wrap": False}, {"wrap": True}]

    def evidence_bounds(self):
        return (0.0, 1.0)

    def relaxed_evidence(self, scores, temperature=1.0):
        return torch.sigmoid((scores - scores.mean(1, keepdim=True)) / temperature)

    def _params(self) -> dict[str, Any]:
        return {"wrap": self.wrap}

    def _key_parts(self) -> list[str]:
        return ["3.2"]

    def _prepare(self, scores):
        return Prepared.build(scores > scores.mean(1, keepdim=True), self.wrap)

    def _predict_prepared(self, prep):
        return prep.total.argmax(1)

    def _clean(self, prep, labels):
        n = prep.total
        best, cls = competitor(n, labels)
        return n.argmax(1) == labels, n.gather(1, labels[:, None])[:, 0] - best, cls

    def _window_margins(self, prep, labels, window):
        if not prep.fits(window):
            return None
        outside = prep.total[:, :, None, None] - prep.window_sums(window)
        oy = outside.gather(1, labels[:, None, None, None].expand(-1, 1, *outside.shape[2:]))[:, 0]
        best, cls = competitor(outside, labels, inplace=True)
        return oy - best - float(window[0] * window[1]), cls


if "above_mean" not in list_defenses():
    register_defense("above_mean")(AboveMeanVotes)


class _Net(ScoreMapModel):
    """A nearest-class-colour classifier per pixel (3x3 field) for the synthetic 'colour' data."""

    def __init__(self, num_classes: int = 3) -> None:
        from patchcert.data import _palette

        super().__init__((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.arch, self.config, self.num_classes = "custom_defense_net", {}, num_classes
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, num_classes, 1)
        self.geometry = trace_geometry([(3, 1, 1), (1, 1, 0)], input_size=(16, 16))
        colour = (48 + 160 * _palette(num_classes)) / 255  # [K, 3]
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(3):
                self.conv.weight[c, c, 1, 1] = 1.0
            self.head.weight.copy_(colour[:, :, None, None] * 10)
            self.head.bias.copy_(-(colour**2).sum(1) * 5)

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, f):
        return self.head(f)


if "custom_defense_net" not in list_models():
    @register_model
    def custom_defense_net(num_classes: int = 3) -> _Net:
        return _Net(num_classes)


def test_the_new_defense_is_a_registered_defense():
    d = create_defense("above_mean", wrap=True)
    assert isinstance(d, AboveMeanVotes) and d.key == "above_mean(3.2,wrap)"
    s = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y = d.predict(s)
    det = d.certify_details(s, y, [(2, 2)])
    assert torch.equal(det.certified, d.certify(s, y, [(2, 2)]))
    assert d.evidence(s).shape == s.shape and d.margin_map(s, y, (2, 2)).shape == (4, 5, 5)


def test_certify_attack_and_report_with_a_defense_defined_in_a_test_file(tmp_path, capsys):
    common = ["--model", "custom_defense_net", "--dataset", "synthetic", "--dataset-cfg", '{"pattern": "colour"}',
              "-n", "10", "--batch-size", "5", "--patch", "2x2", "--defense", "above_mean", "--defense", "voting",
              "--no-progress", "--json"]
    cert, att, rep = tmp_path / "cert", tmp_path / "att", tmp_path / "rep"
    assert main(["certify", *common, "--save-scores", "--out", str(cert)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["attack", *common, "--steps", "10", "--step-size", "0.1", "--out", str(att)]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    c = [json.loads(x) for x in (cert / "records.jsonl").read_text().splitlines()]
    a = [json.loads(x) for x in (att / "records.jsonl").read_text().splitlines()]
    key = "above_mean(3.2)"
    assert [r["defenses"][key]["certified"]["2x2"] for r in c] == [r["defenses"][key]["certified"]["2x2"] for r in a]
    assert sum(r["defenses"][key]["correct"] for r in c) > 0
    assert all(r["defenses"][key]["attack"]["2x2"]["steps"] >= 0 for r in a)
    assert not any(r["defenses"][key]["attack"]["2x2"]["soundness_failure"] for r in a)
    rc = main(["report", str(cert), "--attack", str(att), "--out", str(rep), "--examples", "0", "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["defense"], r["patch"]): r for r in doc["results"]}
    assert rows[(key, "2x2")]["attack"] is not None and rows[(key, "2x2")]["soundness_failures"] == 0
    assert any("vulnerability" in f for f in doc["files"])
