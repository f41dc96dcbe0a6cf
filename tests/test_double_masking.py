"""Double masking (PatchCleanser): mask sets, the table, prediction and the certificate.

Everything is checked against plain references that literally build every masked image and
run the published algorithm with Python loops, and the certificate is attacked exhaustively
on tiny images with a tiny exact (integer-arithmetic) model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.defenses.double_masking import (
    DoubleMasking,
    certify_from_table,
    covers,
    double_masking_predict,
    first_failing_pair,
    masked_prediction_table,
    pair_indices,
    predict_from_table,
    union_mask_set,
)
from patchcert.errors import PatchcertError
from patchcert.masks import apply_masks, axis_masks, centre_weights, mask_set, random_masks
from reference_pixels import ExactNet, literal_predict, literal_table, table_predict_ref

# -- references ------------------------------------------------------------------------------


def ref_axis(n: int, p: int, k: int) -> list[tuple[int, int]]:
    """The issue's words: stride ceil((n-p+1)/k), size p+s-1, starts 0, s, 2s, ..., last moved to n-m."""
    s = math.ceil((n - p + 1) / k)
    m = p + s - 1
    starts = [i * s for i in range(k)]
    starts[-1] = n - m
    out: list[tuple[int, int]] = []
    for a in starts:
        a = min(a, n - m)
        if (a, m) not in out:
            out.append((a, m))
    return out


# -- mask sets -------------------------------------------------------------------------------


def test_issue_example_k6_cifar():
    ms = mask_set((32, 32), (5, 5), 6)
    assert axis_masks(32, 5, 6) == [(0, 9), (5, 9), (10, 9), (15, 9), (20, 9), (23, 9)]
    assert len(ms) == 36 and len(pair_indices(36)) == 666


@pytest.mark.parametrize("n", range(1, 13))
def test_axis_masks_match_the_words_and_cover(n):
    for p in range(1, n + 1):
        for k in range(1, n + 3):
            got = axis_masks(n, p, k)
            assert got == ref_axis(n, p, k), (n, p, k)
            assert len(got) <= k
            for a, m in got:
                assert 0 <= a and a + m <= n
            for a in range(n - p + 1):  # every placement inside a mask
                assert any(s <= a and a + p <= s + m for s, m in got), (n, p, k, a)


@given(h=st.integers(1, 14), w=st.integers(1, 14), data=st.data())
@settings(max_examples=200, deadline=None)
def test_mask_set_covers_every_placement(h, w, data):
    ph, pw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    k = data.draw(st.integers(1, 8))
    ms = mask_set((h, w), (ph, pw), k)
    assert covers(ms, (ph, pw))
    b = ms.boolean()
    for top in range(h - ph + 1):
        for left in range(w - pw + 1):
            i = ms.covering(top, left)
            assert bool(b[i, top:top + ph, left:left + pw].all())
    # smaller patches are covered too (masks for p cover every p' <= p)
    assert covers(ms, (max(1, ph - 1), pw)) and covers(ms, (ph, max(1, pw - 1)))


def test_covers_detects_a_gap():
    ms = mask_set((10, 10), (3, 3), 2)
    assert covers(ms, (3, 3)) and not covers(ms, (10, 10)) and not covers(ms, (11, 3))
    hole = type(ms)(ms.image_size, ms.patch, ms.k, ms.rects[1:])  # drop the first mask
    assert not covers(hole, (3, 3))


def test_union_mask_set_covers_every_shape():
    shapes = [(1, 6), (2, 3), (3, 2), (6, 1)]
    ms = union_mask_set((12, 12), shapes, 3)
    assert all(covers(ms, s) for s in shapes)
    assert len(set(ms.rects)) == len(ms.rects)


@pytest.mark.parametrize("args", [((32, 32), (5, 5), 0), ((32, 32), (40, 5), 6), ((32, 32), (0, 5), 6),
                                  ((32, 32), (5, 5), True)])
def test_bad_mask_set_is_one_line_error(args):
    with pytest.raises(PatchcertError) as e:
        mask_set(*args)
    assert "\n" not in str(e.value)


def test_defense_options_are_checked():
    for bad in ({"k": 0}, {"k": 2.5}, {"fill": 2.0}, {"fill": "gray"}, {"patch": "5y5"}, {"bf16": "yes"}):
        with pytest.raises(PatchcertError):
            DoubleMasking(**bad)
    d = DoubleMasking(k=6)
    with pytest.raises(PatchcertError, match="larger than the image"):
        DoubleMasking(patch="40x40").mask_set((32, 32))
    with pytest.raises(PatchcertError, match="no patch"):
        d.mask_set((32, 32))
    assert d.mask_set((32, 32), [(5, 5)]).rects == mask_set((32, 32), (5, 5), 6).rects


def test_random_masks_follow_the_set():
    ms = mask_set((16, 16), (3, 3), 4)
    g = torch.Generator().manual_seed(0)
    m = random_masks(ms, 400, (0.2, 0.3, 0.5), g)
    table = ms.boolean()
    area = m.sum((1, 2))
    assert (area == 0).any() and (area > 0).any()
    for row in m[:50]:
        if row.any():  # a union of one or two masks of the set
            assert any(torch.equal(row, table[i] | table[j]) for i in range(len(ms)) for j in range(len(ms)))
    with pytest.raises(PatchcertError):
        random_masks(ms, 4, (0.5, 0.6, 0.1), g)


def test_uniform_random_masks_are_unchanged_by_the_weights_option():
    """Runs made before ``weights`` existed draw the same masks (same generator calls)."""
    ms = mask_set((16, 16), (3, 3), 4)
    g = torch.Generator().manual_seed(7)
    m = random_masks(ms, 64, (0.2, 0.3, 0.5), torch.Generator().manual_seed(7))
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    count = torch.multinomial(p, 64, replacement=True, generator=g)
    a = torch.randint(0, len(ms), (64,), generator=g)
    b = torch.randint(0, len(ms), (64,), generator=g)
    t = ms.boolean()
    want = (t[a] & (count >= 1)[:, None, None]) | (t[b] & (count >= 2)[:, None, None])
    assert torch.equal(m, want)


def test_centre_weights_by_distance_from_the_centre():
    ms = mask_set((32, 32), (5, 5), 6)  # 6 x 6 masks of 9x9, starts 0, 5, 10, 15, 20, 23 on each axis
    w = centre_weights(ms, 2.0).view(6, 6)
    d = torch.tensor([4.5, 9.5, 14.5, 19.5, 24.5, 27.5], dtype=torch.float64) - 16  # centres - image centre
    dist = (d[:, None] ** 2 + d[None, :] ** 2).sqrt()
    assert torch.allclose(w, 1 + (1 - dist / dist.max()))
    assert torch.equal(centre_weights(ms, 1.0), torch.ones(36, dtype=torch.float64))
    assert float(w.min()) == 1.0 and w[0, 0] == w[0, 5] == w[5, 0] == w[5, 5] == 1.0  # the corners are farthest
    assert torch.equal(w, w.T) and float(w[2, 2]) == float(w.max()) > w[3, 3] > w[1, 1] > w[0, 0]
    # a mask centred exactly on the image weighs c
    odd = mask_set((12, 12), (4, 4), 3)  # masks at 0, 3, 6 of extent 6: the middle one is centred
    assert float(centre_weights(odd, 3.0).view(3, 3)[1, 1]) == 3.0
    assert float(centre_weights(odd, 0.5).view(3, 3)[1, 1]) == 0.5  # c < 1 favours the border
    assert torch.equal(centre_weights(mask_set((8, 8), (8, 8), 2), 5.0), torch.ones(1, dtype=torch.float64))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PatchcertError, match="centre weight"):
            centre_weights(ms, bad)


def test_weighted_random_masks_follow_the_weights():
    ms = mask_set((16, 16), (3, 3), 4)  # 16 masks
    t = ms.boolean()
    w = torch.zeros(16, dtype=torch.float64)
    w[5], w[10] = 1.0, 3.0
    m = random_masks(ms, 4000, (0.0, 1.0, 0.0), torch.Generator().manual_seed(0), weights=w)
    hit = torch.stack([(m == t[i]).all((1, 2)) for i in range(16)], 1)  # [n, 16]
    assert bool((hit.sum(1) == 1).all())  # every image shows exactly one mask of the set
    freq = hit.sum(0)
    assert int(freq.sum() - freq[5] - freq[10]) == 0  # zero weight: never drawn
    assert abs(int(freq[10]) / 4000 - 0.75) < 0.03  # 3 : 1 (binomial sd 0.007)
    two = random_masks(ms, 200, (0.0, 0.0, 1.0), torch.Generator().manual_seed(1), weights=w)
    assert all(any(torch.equal(r, t[i] | t[j]) for i in (5, 10) for j in (5, 10)) for r in two)
    for bad in (torch.zeros(16), torch.ones(15), -torch.ones(16), torch.full((16,), float("nan"))):
        with pytest.raises(PatchcertError, match="mask weights"):
            random_masks(ms, 4, (0.0, 1.0, 0.0), weights=bad)


# -- table, prediction, certificate vs the literal reference ---------------------------------


def _tiny_images(n: int, size: int, seed: int, chans: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, chans, size, size), generator=g).double() / 2  # values 0, .5, 1


@pytest.mark.parametrize("seed", range(4))
def test_table_prediction_and_certificate_match_literal_reference(seed):
    x = _tiny_images(12, 7, seed)
    model = ExactNet(seed).calibrate(x)
    ms = mask_set((7, 7), (2, 2), 3)
    tab = masked_prediction_table(model, x, ms, fill=0.5, batch_size=7)
    assert torch.equal(tab, literal_table(model, x, ms, 0.5))
    ref = [literal_predict(model, x[i], ms, 0.5) for i in range(len(x))]
    assert predict_from_table(tab).tolist() == ref
    assert double_masking_predict(model, x, ms, fill=0.5, batch_size=5).tolist() == ref
    labels = torch.tensor(ref)
    cert = certify_from_table(tab, labels)
    assert cert.tolist() == [bool((tab[i] == labels[i]).all()) for i in range(len(x))]
    cnt, i, j = first_failing_pair(tab, labels)
    assert ((cnt == 0) == cert).all() and ((i == -1) == cert).all()


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_predict_from_table_matches_reference_on_random_tables(data):
    n, m, k = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    vals = data.draw(st.lists(st.integers(0, k - 1), min_size=n * m * m, max_size=n * m * m))
    t = torch.tensor(vals).view(n, m, m)
    t = torch.triu(t) + torch.triu(t, 1).transpose(1, 2)  # symmetric
    assert predict_from_table(t).tolist() == table_predict_ref(t)
    lab = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    cert = certify_from_table(t, lab)
    # certified => the prediction from the table is the label
    assert (predict_from_table(t)[cert] == lab[cert]).all()


def test_bad_tables_and_labels_are_errors():
    with pytest.raises(PatchcertError, match="symmetric"):
        predict_from_table(torch.tensor([[[0, 1], [0, 0]]]))
    with pytest.raises(PatchcertError, match="integer"):
        predict_from_table(torch.zeros(1, 2, 2))
    with pytest.raises(PatchcertError, match="negative"):
        predict_from_table(-2 * torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(PatchcertError, match="first-round"):  # -1: not evaluated, never in the first round
        predict_from_table(-torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(PatchcertError, match="labels"):
        certify_from_table(torch.zeros(2, 2, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatchcertError, match="images"):
        masked_prediction_table(ExactNet(0), torch.zeros(1, 1, 6, 6), mask_set((7, 7), (2, 2), 3))


def test_nan_logits_are_an_error():
    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(PatchcertError, match="non-finite"):
        masked_prediction_table(Nan(), torch.zeros(1, 1, 6, 6), mask_set((6, 6), (2, 2), 2))


# -- soundness: certified examples survive every patch -----------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_patch_attack_never_flips_a_certified_example(seed):
    """Tiny images (6x6, one channel), 2x2 patches with every binary content at every
    placement (16 x 25 patched images per example); the literal double-masking prediction of
    every patched image must be the label of every certified example."""
    size, patch = 6, (2, 2)
    x = _tiny_images(40, size, seed)
    model = ExactNet(100 + seed).calibrate(x)
    ms = mask_set((size, size), patch, 3)
    tab = masked_prediction_table(model, x, ms, fill=0.5)
    labels = predict_from_table(tab)
    cert = certify_from_table(tab, labels)
    assert 0 < int(cert.sum()) < len(x), "the test needs both certified and uncertified examples"
    assert _every_binary_2x2_patch(model, x, ms, labels, cert) > 0  # the attack is strong enough to matter


def _every_binary_2x2_patch(model, x, ms, labels, cert) -> int:
    """Every binary 2x2 patch at every placement, judged by the literal double masking of
    ``model``: a certified example never changes; returns how many uncertified ones changed."""
    size = x.shape[-1]
    contents = [torch.tensor(c, dtype=torch.float64).view(1, 2, 2) for c in itertools.product([0.0, 1.0], repeat=4)]
    flipped_uncertified = 0
    for n in range(len(x)):
        for top in range(size - 1):
            for left in range(size - 1):
                for c in contents:
                    xp = x[n].clone()
                    xp[:, top:top + 2, left:left + 2] = c
                    p = literal_predict(model, xp, ms, 0.5)
                    if bool(cert[n]):
                        assert p == int(labels[n]), (n, top, left, c)
                    elif p != int(labels[n]):
                        flipped_uncertified += 1
    return flipped_uncertified


def test_defense_object_end_to_end_on_a_multi_shape_threat():
    from patchcert.defenses import Threat, create_defense
    from patchcert.geometry import Geometry
    from patchcert.planning import plan_patches

    model = ExactNet(7)
    x = _tiny_images(6, 8, 3)
    d = create_defense("double-masking", k=3, patch="area=4")
    assert isinstance(d, DoubleMasking)
    ms = d.mask_set((8, 8))
    d = d.bind(ms)
    shapes = [(1, 4), (2, 2), (4, 1)]
    assert all(covers(ms, s) for s in shapes) and d.uncovered(shapes) == []
    tab = d.table(model, x)
    pred = d.predict_evidence(tab)
    assert torch.equal(pred, d.predict_images(model, x))
    threat = plan_patches(["area=4"], Geometry((None, None)), (8, 8))[0]
    res = d.certify_threat(tab, pred, threat)
    assert torch.equal(res.certified, certify_from_table(tab, pred))
    assert res.per_shape is not None and res.per_shape.shape == (6, len(threat.shapes))
    # the early-exit evidence answers the same
    ev = d.compute_evidence(model, x, None, pred)
    assert torch.equal(d.predict_evidence(ev), pred)
    assert torch.equal(d.certify_threat(ev, pred, threat).certified, res.certified)
    # a threat the mask set does not cover is never certified
    big = plan_patches(["5x5"], Geometry((None, None)), (8, 8))[0]
    assert not d.certify_threat(tab, pred, big).certified.any() and d.uncovered([(5, 5)]) == [(5, 5)]
    assert d.key == "double-masking(k=3,patch=area=4)"
    assert DoubleMasking.for_threat({"k": 3}, Threat((8, 8), mask_shapes=((2, 2),))).masks.rects == \
        mask_set((8, 8), (2, 2), 3).rects


def test_apply_masks_per_channel_fill():
    x = torch.ones(1, 3, 4, 4)
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True
    y = apply_masks(x, m, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3])) and (y[0, :, 3, 3] == 1).all()


# -- the attack and the certify pipeline --------------------------------------------------------


def test_pgd_attack_never_breaks_a_certified_example_and_finds_breaks():
    from patchcert.attacks.pixels import attack_double_masking

    x = _tiny_images(30, 6, 11)
    model = ExactNet(211).calibrate(x)
    ms = mask_set((6, 6), (2, 2), 3)
    tab = masked_prediction_table(model, x, ms, fill=0.5)
    labels = predict_from_table(tab)  # every example is "correct": the attack must do the work
    d = DoubleMasking(k=3)
    res = attack_double_masking(model, x, labels, d, ms, (2, 2), steps=10, step_size=0.25, n_random=3, table=tab)
    assert res.soundness_failures == []
    assert bool(res.certified.any()) and bool((~res.robust).any())
    assert bool((res.robust | ~res.certified).all())
    for n, (top, left) in ((n, p) for n, p in enumerate(res.placement) if p is not None):
        adv = res.adv_images[n]
        # only the patch differs, and the literal defense agrees with the reported prediction
        diff = (adv != x[n]).any(0)
        assert not diff[:top].any() and not diff[top + 2:].any() and not diff[:, :left].any() \
            and not diff[:, left + 2:].any()
        assert literal_predict(model, adv, ms, 0.5) == int(res.adv_pred[n]) != int(labels[n])


def test_certify_dataset_runs_double_masking_next_to_score_map_defenses(tmp_path):
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model
    from patchcert.results import read_records

    torch.manual_seed(0)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=5, num_classes=3, size=32)
    run = certify_dataset(m, data, defenses=["double-masking:k=2", "voting"], patches=["5x5", "area=12"],
                          batch_size=3, out_dir=tmp_path / "run", square_cap=0)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert [r.index for r in recs] == list(range(5))
    ms = mask_set((32, 32), (5, 5), 2)
    x = torch.stack([data.images[i] for i in range(5)]).float() / 255
    m.eval()
    tab = masked_prediction_table(m, x, union_mask_set((32, 32), [(5, 5)] + [(a, b) for a, b in
                                  __import__("patchcert.geometry", fromlist=["x"]).parse_patch("area=12")
                                  .shapes((32, 32))], 2))
    key = "double-masking(k=2)"
    assert key in recs[0].defenses
    pred = predict_from_table(tab)
    cert = certify_from_table(tab, data.labels[:5])
    for i, r in enumerate(recs):
        o = r.defenses[key]
        assert o.pred == int(pred[i]) and o.certified["5x5"] == bool(cert[i])
        assert o.certified["area=12"] == bool(cert[i]) and set(o.shapes["area=12"]) >= {"1x12", "3x4"}
        assert not r.defenses["voting(sign,3.2)"].certified["5x5"]  # a one-cell map certifies nothing
    rows = {(row.defense, row.patch): row for row in run.summary.results}
    assert rows[(key, "5x5")].certified_accuracy == pytest.approx(float(cert.float().mean()))
    assert len(ms) == 4
    # the row's certify cost includes double masking's own masked passes (its real cost), not
    # only the microseconds of reading the certificate off the table
    ev = run.summary.metadata.defense_seconds_per_image[key]["evidence"]
    assert ev > 0
    for p in ("5x5", "area=12"):
        assert rows[(key, p)].certify_seconds_per_image >= ev


def test_certify_refuses_double_masking_on_cached_scores(tmp_path):
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model
    from patchcert.results import load_scores

    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=2, num_classes=3, size=32)
    certify_dataset(m, data, defenses=["voting"], batch_size=2, out_dir=tmp_path / "a", save_scores=True,
                    square_cap=0)
    with pytest.raises(PatchcertError, match="needs the model"):
        certify_dataset(scores=load_scores(tmp_path / "a" / "scores.safetensors"), defenses=["double-masking"])
    with pytest.raises(PatchcertError, match="unknown option"):
        certify_dataset(m, data, defenses=["double-masking:q=3"], square_cap=0)
    with pytest.raises(PatchcertError, match="k must be"):
        certify_dataset(m, data, defenses=["double-masking:k=0"], square_cap=0)


def test_report_tables_and_plots_include_double_masking(tmp_path):
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model
    from patchcert.report import make_report

    torch.manual_seed(1)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=4, num_classes=3, size=32)
    certify_dataset(m, data, defenses=["double-masking:k=2", "voting"], patches=["5x5"], batch_size=4,
                    out_dir=tmp_path / "run", square_cap=4)
    res = make_report([tmp_path / "run"], tmp_path / "rep", examples=[0], map_patch="5x5")
    keys = {(r.defense, r.patch) for r in res.rows}
    assert ("double-masking(k=2)", "5x5") in keys and ("voting(sign,3.2)", "5x5") in keys
    assert (tmp_path / "rep" / "results.md").read_text().count("double-masking(k=2)") >= 1


def test_attack_dataset_attacks_double_masking_through_the_defense(tmp_path):
    from patchcert.attacks import attack_dataset
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model

    torch.manual_seed(2)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=4, num_classes=3, size=32)
    run = attack_dataset(m, data, defenses=["double-masking:k=2"], patches=["5x5"], batch_size=4,
                         out_dir=tmp_path / "att", device="cpu")
    cert = certify_dataset(m, data, defenses=["double-masking:k=2"], patches=["5x5"], batch_size=4, square_cap=0)
    key = "double-masking(k=2)"
    assert run.failures == []
    for r, c in zip(run.records, cert.records):
        o = r.defenses[key]
        assert o.pred == c.defenses[key].pred and o.certified["5x5"] == c.defenses[key].certified["5x5"]
        a = o.attack["5x5"]
        assert a.attacked == o.correct and not (a.success and o.certified["5x5"])
        if a.attacked:
            assert a.attempts >= 1 and a.steps == 100 * a.attempts  # the attack flags' defaults
    row = run.summary["results"][0]
    assert row["certified_accuracy"] <= row["robust_accuracy"] <= row["clean_accuracy"]


def test_channels_last_is_an_option_of_the_deployed_defense():
    """channels_last hands the masked batches over in NHWC layout: part of the key and config
    (it may round differently), absent when off (earlier runs' configs are unchanged); on a
    float32 model the tables agree with the default layout here."""
    import patchcert
    from patchcert.masks import mask_set
    from patchcert.models import create_model

    d = patchcert.create_defense("double-masking", k=2, channels_last=True)
    assert d.key == "double-masking(k=2,channels_last)" and d.config["channels_last"] is True
    assert "channels_last" not in patchcert.create_defense("double-masking", k=2).config
    with pytest.raises(patchcert.PatchcertError, match="channels_last must be true or false"):
        patchcert.create_defense("double-masking", channels_last="yes")
    torch.manual_seed(0)
    m = create_model("fastnet_cifar", widths=[4, 8, 8], stem=4, num_classes=3).eval()
    x = torch.rand(3, 3, 32, 32)
    ms = mask_set((32, 32), (5, 5), 2)
    from patchcert.defenses.double_masking import masked_prediction_table

    assert torch.equal(masked_prediction_table(m, x, ms, channels_last=True), masked_prediction_table(m, x, ms))


# -- flip: the flip-averaged classifier ---------------------------------------------------------


class LiteralFlip(nn.Module):
    """The reference flip-averaged classifier: two separate passes, image and mirror image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x).flatten(1) + self.model(torch.flip(x, dims=[3])).flatten(1)) / 2


def test_flip_averaged_is_the_mean_of_the_image_and_mirror_passes():
    from patchcert.defenses.double_masking import FlipAveraged
    from patchcert.models import create_model

    x = _tiny_images(5, 7, 0)
    m = ExactNet(3)
    assert torch.equal(FlipAveraged(m)(x), LiteralFlip(m)(x).float())
    torch.manual_seed(0)
    f = create_model("fastnet_cifar", widths=[4, 8, 8], stem=4, num_classes=3).eval()
    xs = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = (f(xs).mean((2, 3)) + f(xs.flip(-1)).mean((2, 3))) / 2
        got = FlipAveraged(f)(xs)
        got_cl = FlipAveraged(f)(xs.contiguous(memory_format=torch.channels_last))
    assert got.shape == (4, 3) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got_cl, want, atol=1e-5)
    # a mirror-symmetric image gets the model's own logits
    sym = torch.cat((xs[..., :16], xs[..., :16].flip(-1)), -1)
    with torch.no_grad():
        assert torch.allclose(FlipAveraged(f)(sym), f(sym).mean((2, 3)), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_flip_table_prediction_and_certificate_match_literal_reference(seed):
    x = _tiny_images(12, 7, seed)
    model = ExactNet(seed + 20).calibrate(x)
    ms = mask_set((7, 7), (2, 2), 3)
    d = DoubleMasking(k=3, patch="2x2", flip=True).bind(ms)
    d.batch_size = 5
    ref_model = LiteralFlip(model)
    full = d.table(model, x)
    assert torch.equal(full, literal_table(ref_model, x, ms, 0.5))
    assert not torch.equal(full, literal_table(model, x, ms, 0.5)), "flip must change some prediction here"
    ref = [literal_predict(ref_model, x[i], ms, 0.5) for i in range(len(x))]
    assert predict_from_table(full).tolist() == ref
    labels = torch.tensor(ref)
    early = d.compute_evidence(model, x, None, labels)
    assert d.predict_evidence(early).tolist() == ref
    assert certify_from_table(early, labels).tolist() == [bool((full[i] == labels[i]).all()) for i in range(len(x))]
    assert d.predict_images(model, x).tolist() == ref


@pytest.mark.parametrize("seed", range(2))
def test_exhaustive_patch_attack_never_flips_a_certified_example_with_flip(seed):
    """As the exhaustive test above, for the flip-averaged classifier: every binary 2x2 patch
    at every placement, judged by the literal double masking on the literal flip classifier."""
    size, patch = 6, (2, 2)
    x = _tiny_images(40, size, seed + 7)
    model = ExactNet(300 + seed).calibrate(x)
    ms = mask_set((size, size), patch, 3)
    d = DoubleMasking(k=3, flip=True).bind(ms)
    tab = d.table(model, x)
    labels = predict_from_table(tab)
    cert = certify_from_table(tab, labels)
    assert 0 < int(cert.sum()) < len(x), "the test needs both certified and uncertified examples"
    assert _every_binary_2x2_patch(LiteralFlip(model), x, ms, labels, cert) > 0


def test_pgd_attack_on_the_flip_classifier_never_breaks_a_certified_example():
    from patchcert.attacks.pixels import attack_double_masking

    x = _tiny_images(30, 6, 12)
    model = ExactNet(212).calibrate(x)
    ms = mask_set((6, 6), (2, 2), 3)
    d = DoubleMasking(k=3, flip=True)
    labels = predict_from_table(d.bind(ms).table(model, x))
    res = attack_double_masking(model, x, labels, d, ms, (2, 2), steps=10, step_size=0.25, n_random=3)
    assert res.soundness_failures == []
    assert bool(res.certified.any()) and bool((~res.robust).any())
    for n in (n for n, p in enumerate(res.placement) if p is not None):
        assert literal_predict(LiteralFlip(model), res.adv_images[n], ms, 0.5) == int(res.adv_pred[n]) != int(labels[n])


def test_flip_is_an_option_of_the_deployed_defense():
    import patchcert

    d = patchcert.create_defense("double-masking", k=2, flip=True, bf16=True)
    assert d.key == "double-masking(k=2,bf16,flip)" and d.config["flip"] is True
    assert "flip" not in patchcert.create_defense("double-masking", k=2).config  # earlier runs' configs unchanged
    with pytest.raises(patchcert.PatchcertError, match="flip must be true or false"):
        patchcert.create_defense("double-masking", flip="yes")
    from patchcert.specs import parse_defense_spec

    spec = parse_defense_spec("double-masking:k=6,flip=true")
    assert patchcert.create_defense(spec.name, **spec.params).key == "double-masking(k=6,flip)"
    m = ExactNet(1)
    assert d.classifier(m) is not m and patchcert.create_defense("double-masking").classifier(m) is m
