"""A new pixel-family defense written as one class in this test file (nothing in ``src/`` knows
it) works in ``certify``, ``attack`` and ``report``, and joins the registry-wide soundness
tests (``test_defenses_registry.py``: brute force on tiny exact models). It reuses double
masking's table helpers, as a defense outside the package may."""

from __future__ import annotations

import json
from typing import Any

import torch

from patchcert.cli import main
from patchcert.defenses import PixelDefense, ThreatResult, create_defense, list_defenses, register_defense
from patchcert.defenses.double_masking import certify_from_table, covers, masked_prediction_table
from patchcert.masks import mask_set


class ReverseCleanser(PixelDefense):
    """PatchCleanser's two rounds with the second rounds tried in *reverse* mask order: if the
    one-mask predictions all agree, that label; else, for each mask whose one-mask label differs
    from the majority, last mask first, return its label if every two-mask prediction with it
    agrees; else the majority. Evidence: the full two-mask table. Certified iff the mask set
    covers the patch and every pair predicts the label (the order of the second rounds does
    not matter to the proof: the covering mask's row is all label)."""

    def __init__(self, k: int = 2, fill: float = 0.5) -> None:
        self.k, self.fill, self._ms = int(k), float(fill), None

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"k": 2}, {"k": 3, "fill": 0.0}]

    @classmethod
    def for_threat(cls, options, threat):
        d = create_defense(cls.name, **options)
        d._ms = mask_set(threat.image_size, threat.mask_shapes[0], d.k)
        return d

    @property
    def image_size(self):
        return self._ms.image_size

    def _params(self) -> dict[str, Any]:
        return {"k": self.k, "fill": self.fill}

    def compute_evidence(self, model, images, scores=None, labels=None):
        return masked_prediction_table(model, images, self._ms, self.fill)

    def predict_evidence(self, evidence):
        out = []
        for t in evidence.tolist():
            one = [t[i][i] for i in range(len(t))]
            maj = min(set(one), key=lambda c: (-one.count(c), c))
            pick = [one[i] for i in reversed(range(len(t))) if one[i] != maj and all(v == one[i] for v in t[i])]
            out.append(pick[0] if pick else maj)
        return torch.tensor(out, dtype=torch.long)

    def certify_threat(self, evidence, labels, patch):
        cov = [covers(self._ms, s) for s in patch.shapes]
        ok = certify_from_table(evidence, labels)
        ps = torch.stack([ok & c for c in cov], 1)
        return ThreatResult(ps.all(1), ps if len(cov) > 1 else None, [None] * evidence.shape[0])


if "reverse_cleanser" not in list_defenses():
    register_defense("reverse_cleanser")(ReverseCleanser)


def test_the_new_pixel_defense_is_a_registered_defense():
    from patchcert.defenses import Threat

    d = ReverseCleanser.for_threat({"k": 2}, Threat((8, 8), mask_shapes=((2, 2),)))
    assert isinstance(create_defense("reverse_cleanser"), ReverseCleanser) and d.key == "reverse_cleanser(k=2,fill=0.5)"
    assert d.evidence_source == "images" and len(d._ms) == 4


def test_certify_attack_and_report_with_a_pixel_defense_defined_in_a_test_file(tmp_path, capsys):
    common = ["--model", "fastnet_cifar", "--model-cfg", '{"widths": [4, 4, 4], "stem": 4, "num_classes": 3}',
              "--dataset", "synthetic", "--dataset-cfg", '{"pattern": "colour", "num_classes": 3}', "-n", "6",
              "--batch-size", "3", "--patch", "5x5", "--defense", "reverse_cleanser:k=2", "--defense", "double-masking:k=2",
              "--no-progress", "--json", "--device", "cpu"]
    cert, att, rep = tmp_path / "cert", tmp_path / "att", tmp_path / "rep"
    assert main(["certify", *common, "--out", str(cert)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["attack", *common, "--steps", "2", "--step-size", "0.2", "--out", str(att)]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    c = [json.loads(x) for x in (cert / "records.jsonl").read_text().splitlines()]
    a = [json.loads(x) for x in (att / "records.jsonl").read_text().splitlines()]
    key = "reverse_cleanser(k=2,fill=0.5)"
    assert [r["defenses"][key]["certified"]["5x5"] for r in c] == [r["defenses"][key]["certified"]["5x5"] for r in a]
    assert [r["defenses"][key]["pred"] for r in c] == [r["defenses"][key]["pred"] for r in a]
    assert all(r["defenses"][key]["largest_square"] is None for r in c)  # it does not search squares
    for r in a:  # the attack honours --steps
        e = r["defenses"][key]["attack"]["5x5"]
        assert e["steps"] == 2 * e["attempts"] and not e["soundness_failure"]
    rc = main(["report", str(cert), "--attack", str(att), "--out", str(rep), "--examples", "0,1", "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["defense"], r["patch"]): r for r in doc["results"]}
    assert rows[(key, "5x5")]["soundness_failures"] == 0
    assert sum("masks_" in f for f in doc["files"]) == 2  # per example, without --save-scores
