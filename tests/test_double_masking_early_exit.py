"""Double masking's early-exit pass (issue 18 part 1) gives the very records of the full table.

On random tiny exact models, the early-exit table (``settled_table``) is compared with the full
table (``masked_prediction_table``) and with the literal definition (every masked image built by
hand): prediction, certificate, first failing pair, first-round flag and the record objects must
be identical, and the early exit must actually skip work.
"""

from __future__ import annotations

import pytest
import torch

from patchcert.defenses import create_defense
from patchcert.defenses.double_masking import (
    UNKNOWN,
    _Evaluator,
    certify_from_table,
    first_failing_pair,
    masked_prediction_table,
    predict_from_table,
    settled_table,
)
from patchcert.geometry import Geometry
from patchcert.masks import mask_set
from patchcert.planning import plan_patches
from reference_pixels import ExactNet, literal_certificate, literal_predict


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 1, size, size), generator=g).double() / 2


@pytest.mark.parametrize("seed,batch_size", [(0, 7), (1, 64), (2, 1), (3, 500)])
def test_early_exit_table_answers_exactly_as_the_full_table_and_the_definition(seed, batch_size):
    x = _images(24, 7, seed)
    model = ExactNet(300 + seed).calibrate(x)
    ms = mask_set((7, 7), (2, 2), 3)
    full = masked_prediction_table(model, x, ms, fill=0.5)
    pred = predict_from_table(full)
    # labels: the prediction for most images, another class for some (uncertified by the first round)
    labels = torch.where(torch.arange(len(x)) % 5 == 0, (pred + 1) % 3, pred)
    part = settled_table(model, x, ms, labels, fill=0.5, batch_size=batch_size)
    known = part != UNKNOWN
    assert torch.equal(part[known], full[known])  # what it evaluated, it evaluated right
    assert torch.equal(predict_from_table(part), pred)
    assert torch.equal(certify_from_table(part, labels), certify_from_table(full, labels))
    for a, b in zip(first_failing_pair(part, labels)[1:], first_failing_pair(full, labels)[1:]):
        assert torch.equal(a, b)
    d = create_defense("double-masking", k=3).bind(ms)
    assert d.failing_cases(part, labels) == d.failing_cases(full, labels)
    threat = plan_patches(["2x2"], Geometry((None, None)), (7, 7))[0]
    assert torch.equal(d.certify_threat(part, labels, threat).certified, d.certify_threat(full, labels, threat).certified)
    for n in range(len(x)):  # the literal definition
        assert int(pred[n]) == literal_predict(model, x[n], ms, 0.5)
        ok, pair = literal_certificate(model, x[n], ms, 0.5, int(labels[n]))
        case = d.failing_cases(part, labels)[n]
        assert ok == bool(certify_from_table(part, labels)[n]) == (case is None)
        if not ok:
            assert case.pair == pair and case.cls == int(full[n, pair[0], pair[1]])
            assert case.first_round == (pair[0] == pair[1])
            assert list(case.disagree) == [m for m in range(len(ms)) if int(full[n, m, m]) != int(labels[n])]
    # prediction only (labels None): the first round and the needed second rounds
    assert torch.equal(predict_from_table(settled_table(model, x, ms, None, 0.5, batch_size)), pred)


def test_early_exit_skips_the_pairs_a_settled_image_does_not_need():
    x = _images(30, 7, 11)
    model = ExactNet(411).calibrate(x)
    ms = mask_set((7, 7), (2, 2), 3)
    full = masked_prediction_table(model, x, ms, fill=0.5)
    labels = predict_from_table(full)
    part = settled_table(model, x, ms, labels, fill=0.5, batch_size=8)
    cert = certify_from_table(full, labels)
    m = len(ms)
    pairs = m * (m + 1) // 2
    evaluated = ((part != UNKNOWN).sum((1, 2)) + m) // 2  # symmetric entries, diagonal once
    assert bool(cert.any()) and bool((~cert).any())
    assert bool((evaluated[cert] == pairs).all())  # a certificate needs every pair
    assert int(evaluated[~cert].sum()) < int((~cert).sum()) * pairs  # the others stop early
    # the evaluator counts what it ran: fewer masked images than the full table
    ev = _Evaluator(model, x, ms, 0.5, False, 8)
    ev.fill_in(torch.arange(len(x)).repeat_interleave(m), torch.arange(m).repeat(len(x)),
               torch.arange(m).repeat(len(x)))
    assert ev.evaluated == len(x) * m


@pytest.mark.parametrize("seed", range(3))
def test_certify_run_records_equal_the_full_table_records(seed, tmp_path):
    """The certify run (early exit) writes, per example, the records the full table implies."""
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model

    torch.manual_seed(seed)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=6, num_classes=3, size=32, seed=seed)
    run = certify_dataset(m, data, defenses=["double-masking:k=2"], patches=["5x5"], batch_size=4,
                          square_cap=8, device="cpu")
    d = run_defense = create_defense("double-masking", k=2).bind(mask_set((32, 32), (5, 5), 2))
    x = torch.stack([data.images[i] for i in range(6)]).float() / 255
    m.eval()
    full = masked_prediction_table(m, x, d.masks, 0.5)
    y = data.labels[:6]
    pred, cert = predict_from_table(full), certify_from_table(full, y)
    cases = run_defense.failing_cases(full, y)
    for i, r in enumerate(run.records):
        o = r.defenses["double-masking(k=2)"]
        assert o.pred == int(pred[i]) and o.certified["5x5"] == bool(cert[i]) and o.worst["5x5"] == cases[i]
        assert o.largest_square == (d.largest_square(full, y, [None] * 8)[i].item())
