"""The shipped models certify exactly as before the defense-protocol refactor (issue 16).

``tests/golden/`` holds records written by ``patchcert certify`` at commit 3fe0712 (before
double masking became a registered defense and the run was split into planning / batch /
squares): the default model with voting and masking on the first 64 CIFAR-10 test images, and
``doublemask_cifar10`` (today ``doublemask_cifar10_v1``, the same weights) with double masking
(k = 6) on the first 3. Today's code must write the
same records (double masking's records now also name the first failing mask pair, which the old
records left null; everything else must match to the last bit).
"""

from __future__ import annotations

import json
from pathlib import Path


from patchcert.certify import certify_dataset
from patchcert.data import load_dataset
from patchcert.pretrained import load_pretrained

GOLDEN = Path(__file__).parent / "golden"


def _golden(name: str) -> list[dict]:
    return [json.loads(line) for line in (GOLDEN / name).read_text().splitlines()]


def test_default_model_voting_and_masking_records_are_unchanged(shared_data):
    data = load_dataset("cifar10", shared_data, train=False)
    run = certify_dataset(load_pretrained(), data, defenses=["voting", "masking"], patches=["5x5"],
                          num_examples=64, batch_size=128, device="cpu")
    assert [r.to_json() for r in run.records] == _golden("shipped_default_voting_masking_64.jsonl")


def test_doublemask_model_records_are_unchanged(shared_data):
    data = load_dataset("cifar10", shared_data, train=False)
    run = certify_dataset(load_pretrained("doublemask_cifar10_v1"), data, defenses=["double-masking:k=6"],
                          patches=["5x5"], num_examples=3, batch_size=128, device="cpu", square_cap=0)
    gold = _golden("shipped_doublemask_k6_3.jsonl")
    key = "double-masking(k=6)"
    for r, g in zip([r.to_json() for r in run.records], gold):
        o, go = r["defenses"][key], g["defenses"][key]
        assert (r["index"], r["label"], r["clean_pred"]) == (g["index"], g["label"], g["clean_pred"])
        assert (o["pred"], o["correct"], o["certified"], o["largest_square"]) == \
            (go["pred"], go["correct"], go["certified"], go["largest_square"])
        assert (o["worst"]["5x5"] is None) == o["certified"]["5x5"]  # a failing pair exactly when uncertified
    assert len(run.records) == len(gold) == 3
