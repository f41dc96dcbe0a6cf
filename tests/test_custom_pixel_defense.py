"""A new pixel-family defense written as one class in this test file (nothing in ``src/`` knows
it) works in ``certify``, ``attack`` and ``report``, and joins the registry-wide soundness
tests (``test_defenses_registry.py``: brute force on tiny exact models)."""

from __future__ import annotations

import json
from typing import Any

import torch

from patchcert.cli import main
from patchcert.defenses import PixelDefense, ThreatResult, create_defense, list_defenses, register_defense
from patchcert.masks import apply_masks, mask_set


class MaskVote(PixelDefense):
    """The first round of double masking alone, as a vote: each of the ``k x k`` masks of the
    threat's mask set predicts the masked image; prediction = the most votes (ties to the
    lowest class). A patch inside mask ``i`` cannot change mask ``i``'s vote; any other vote it
    may set. Certified iff at every placement ``P``, for every class ``c != y``:
    ``votes_y(covering P) > votes_c(covering P) + #masks not covering P``."""

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
        """``[N, M]``: the prediction on each one-mask image."""
        masks = self._ms.boolean(images.device)
        n, m = images.shape[0], masks.shape[0]
        with torch.no_grad():
            out = model(apply_masks(images.repeat_interleave(m, 0), masks.repeat(n, 1, 1), self.fill))
        out = out.float().mean((2, 3)) if out.dim() == 4 else out.float()
        return out.argmax(1).view(n, m)

    def predict_evidence(self, evidence):
        k = int(evidence.max()) + 1 if evidence.numel() else 1
        votes = torch.zeros(evidence.shape[0], k, dtype=torch.long).scatter_add_(1, evidence, torch.ones_like(evidence))
        return votes.argmax(1)

    def certify_threat(self, evidence, labels, patch):
        h, w = self._ms.image_size
        rects = torch.tensor(self._ms.rects)
        k = max(int(evidence.max()) + 1, int(labels.max()) + 1) if evidence.numel() else 1
        per_shape = []
        for ph, pw in patch.shapes:
            ok = torch.ones(evidence.shape[0], dtype=torch.bool)
            for top in range(h - ph + 1):
                for left in range(w - pw + 1):
                    t, lft, mh, mw = rects.unbind(1)
                    cov = (t <= top) & (top + ph <= t + mh) & (lft <= left) & (left + pw <= lft + mw)  # [M]
                    votes = torch.zeros(evidence.shape[0], k, dtype=torch.long)
                    votes.scatter_add_(1, evidence[:, cov], torch.ones_like(evidence[:, cov]))
                    vy = votes.gather(1, labels[:, None])[:, 0]
                    other = votes.scatter(1, labels[:, None], -1).max(1).values
                    ok &= vy > other + int((~cov).sum())
            per_shape.append(ok)
        ps = torch.stack(per_shape, 1)
        return ThreatResult(ps.all(1), ps if len(per_shape) > 1 else None, [None] * evidence.shape[0])


if "mask_vote" not in list_defenses():
    register_defense("mask_vote")(MaskVote)


def test_the_new_pixel_defense_is_a_registered_defense():
    from patchcert.defenses import Threat

    d = MaskVote.for_threat({"k": 2}, Threat((8, 8), mask_shapes=((2, 2),)))
    assert isinstance(create_defense("mask_vote"), MaskVote) and d.key == "mask_vote(k=2,fill=0.5)"
    assert d.evidence_source == "images" and len(d._ms) == 4


def test_certify_attack_and_report_with_a_pixel_defense_defined_in_a_test_file(tmp_path, capsys):
    common = ["--model", "fastnet_cifar", "--model-cfg", '{"widths": [4, 4, 4], "stem": 4, "num_classes": 3}',
              "--dataset", "synthetic", "--dataset-cfg", '{"pattern": "colour", "num_classes": 3}', "-n", "6",
              "--batch-size", "3", "--patch", "5x5", "--defense", "mask_vote:k=2", "--defense", "double-masking:k=2",
              "--no-progress", "--json", "--device", "cpu"]
    cert, att, rep = tmp_path / "cert", tmp_path / "att", tmp_path / "rep"
    assert main(["certify", *common, "--out", str(cert)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["attack", *common, "--steps", "2", "--step-size", "0.2", "--out", str(att)]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    c = [json.loads(x) for x in (cert / "records.jsonl").read_text().splitlines()]
    a = [json.loads(x) for x in (att / "records.jsonl").read_text().splitlines()]
    key = "mask_vote(k=2,fill=0.5)"
    assert [r["defenses"][key]["certified"]["5x5"] for r in c] == [r["defenses"][key]["certified"]["5x5"] for r in a]
    assert [r["defenses"][key]["pred"] for r in c] == [r["defenses"][key]["pred"] for r in a]
    assert all(r["defenses"][key]["largest_square"] is None for r in c)  # it does not search squares
    for r in a:  # the attack honours --steps
        e = r["defenses"][key]["attack"]["5x5"]
        assert e["steps"] == 2 * e["attempts"] and not e["soundness_failure"]
    rc = main(["report", str(cert), "--attack", str(att), "--out", str(rep), "--examples", "0,1", "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["defense"], r["patch"]): r for r in doc["rows"]}
    assert rows[(key, "5x5")]["soundness_failures"] == 0
    assert sum("masks_" in f for f in doc["files"]) == 2  # per example, without --save-scores
