"""The fast defenses against the plain-loop references in ``reference_defenses.py``, on thousands of
random small maps: integer maps with many ties, float32/float64, wrap-around, rectangles,
windows as large as the map and larger, several windows at once, K = 1..5.

Every clipped value lives on a fixed-point grid (see ``patchcert.defenses.base``), so all sums are
exact and the comparison is *exact*: predictions, certificates, per-window results, the worst
margin (bitwise), its window, placement and class, and the margin maps.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import reference_defenses as ref
from patchcert.defenses import create_defense

KINDS = ("ternary", "int", "float32", "float64")


def details_as_dicts(r):
    return [
        {
            "certified": bool(r.certified[i]),
            "per_window": r.per_window[i].tolist(),
            "margin": float(r.margin[i]),
            "window_index": int(r.window_index[i]),
            "row": int(r.row[i]),
            "col": int(r.col[i]),
            "worst_class": int(r.worst_class[i]),
        }
        for i in range(len(r))
    ]


def random_maps(rng: random.Random, gen: torch.Generator, kind: str, n_max: int = 16, k_min: int = 1):
    """A batch of maps biased towards their labels by a random per-image strength, so that a good
    share of them is certified (and a good share is not)."""
    N = rng.randint(1, n_max)
    K = rng.randint(k_min, 5)
    H, W = rng.randint(1, 7), rng.randint(1, 7)
    if kind == "ternary":
        s = torch.randint(-1, 2, (N, K, H, W), generator=gen).double()
    elif kind == "int":
        s = torch.randint(-2, 3, (N, K, H, W), generator=gen).double()
    else:
        s = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=gen)
    strength = torch.randint(0, 4, (N, 1, 1, 1), generator=gen).double()
    s = s + strength * torch.nn.functional.one_hot(y, K).double()[:, :, None, None]
    s = s.float() if kind in ("ternary", "int", "float32") else s
    return s, y


def random_windows(rng: random.Random, H: int, W: int):
    out = []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.1:
            out.append((H, W))
        elif r < 0.2:
            out.append((H + rng.randint(0, 1), W + 1))  # larger than the map
        else:
            out.append((rng.randint(1, H), rng.randint(1, W)))
    return out


def compare(d, kind, params, s, y, windows, ref_predict, ref_details, tally, margin_tol: float = 0.0):
    """``margin_tol``: for a clipping whose values come from a transcendental function (tanh), the
    reference's tanh may differ from the vectorised one by an ulp, which can move a value by one
    step of the 2^-32 grid the defense rounds to: margins then agree within ``margin_tol`` and
    everything else exactly, except for images whose margin is within ``margin_tol`` of 0."""
    assert d.predict(s).tolist() == ref_predict, (d, s, y)
    fast = d.certify_details(s, y, windows)
    exp = ref_details
    got = details_as_dicts(fast)
    for i, (a, b) in enumerate(zip(got, exp)):
        msg = f"{d} image {i} windows {windows}\nscores {s[i].tolist()} label {int(y[i])}\nfast {a}\nref  {b}"
        if margin_tol and a["margin"] is not None and b["margin"] is not None and math.isfinite(b["margin"]):
            assert abs(a["margin"] - b["margin"]) <= margin_tol, msg
            if abs(b["margin"]) > margin_tol:
                assert {**a, "margin": None} == {**b, "margin": None}, msg
            continue
        assert a == b, msg
    assert torch.equal(d.certify(s, y, windows), fast.certified)
    # the documented invariant: certified == tie rule applied to the worst margin
    rule = (fast.margin > 0) | ((fast.margin == 0) & (fast.worst_class > y))
    assert torch.equal(rule, fast.certified)
    tally[0] += int(fast.certified.sum())
    tally[1] += len(y)
    # margin map for one of the windows
    w = windows[0]
    mm = d.margin_map(s, y, w)
    exp_mm = ref.margin_map(kind, params, s, y, w)
    if mm.shape[1] * mm.shape[2] == 0:
        assert all(m == [] for m in exp_mm)
    else:
        assert mm.dtype == torch.float64
        assert mm.tolist() == exp_mm, f"{d} margin map window {w}"


def run_many(kind_name, make, iterations, seed, n_max=16):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tally = [0, 0]
    for it in range(iterations):
        kind = KINDS[it % len(KINDS)]
        s, y = random_maps(rng, gen, kind, n_max=n_max)
        windows = random_windows(rng, s.shape[2], s.shape[3])
        d, params, rp, rd = make(rng, s, y, windows, kind)
        compare(d, kind_name, params, s, y, windows, rp, rd, tally)
    # the comparison must have seen both outcomes in quantity
    assert 0.1 * tally[1] < tally[0] < 0.9 * tally[1], tally
    return tally


def make_voting(rng, s, y, windows, kind):
    p = {
        "binarize": rng.choice(["sign", "sign", "argmax", 0.2, 0.3, 0.5]),
        "condition": rng.choice(["3.2", "3.2", "3.3"]),
        "wrap": rng.random() < 0.3,
    }
    d = create_defense("voting", **p)
    return (
        d,
        p,
        ref.voting_predict(s, p["binarize"]),
        ref.voting_details(s, y, windows, p["binarize"], p["condition"], p["wrap"]),
    )


def make_masking(rng, s, y, windows, kind):
    H, W = s.shape[2], s.shape[3]
    if rng.random() < 0.5:
        mask = max(windows, key=lambda w: w[0] * w[1])  # a mask matching (or exceeding) a patch window
    else:
        mask = (rng.randint(1, H + (rng.random() < 0.1)), rng.randint(1, W))
    p = {
        "window": mask,
        "threshold": rng.choice([0.0, 0.0, 0.2, 0.5, 0.9]),
        "clip_max": rng.choice([None, None, 1.0, 2.0, 0.3]),
        "features": rng.choice(["logits", "logits", "confidence", "prediction"]),
        "wrap": rng.random() < 0.3,
    }
    d = create_defense("masking", **p)
    rp = ref.masking_predict(s, mask, p["threshold"], p["clip_max"], p["features"], p["wrap"])
    rd = ref.masking_details(s, y, windows, mask, p["threshold"], p["clip_max"], p["features"], p["wrap"])
    return d, p, rp, rd


@pytest.mark.parametrize("seed", [0, 1])
def test_voting_matches_reference(seed):
    run_many("voting", make_voting, 300, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_clipping_matches_reference(seed):
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(100 + seed)
    tally = [0, 0]
    for it in range(200):
        kind = KINDS[it % len(KINDS)]
        s, y = random_maps(rng, gen, kind)
        windows = random_windows(rng, s.shape[2], s.shape[3])
        clip = rng.choice(["tanh", "tanh", (-1.0, 1.0), (-2.0, 1.0), (-0.3, 0.7), (0.0, 2.0)])
        p = {"clip": clip, "wrap": rng.random() < 0.3}
        if clip == "tanh":
            s = s * 10  # steps tanh(0.05 u - 1) can tell apart
        d = create_defense("clipping", **p)
        rp = ref.clipping_predict(s, clip)
        rd = ref.clipping_details(s, y, windows, clip, p["wrap"])
        compare(d, "clipping", p, s, y, windows, rp, rd, tally)
    assert 0.1 * tally[1] < tally[0] < 0.9 * tally[1], tally


@pytest.mark.parametrize("seed", [0, 1])
def test_masking_matches_reference(seed):
    run_many("masking", make_masking, 150, 200 + seed, n_max=10)


def test_large_batch_matches_reference():
    """N up to 64 in one call (several chunks when the element budget is small)."""
    gen = torch.Generator().manual_seed(7)
    s = torch.randint(-1, 2, (64, 4, 6, 5), generator=gen).float()
    y = torch.randint(0, 4, (64,), generator=gen)
    s[torch.arange(64), y] += torch.randint(0, 3, (64,), generator=gen).float()[:, None, None]
    windows = [(2, 3), (3, 2), (1, 5)]
    d = create_defense("voting", binarize="sign", condition="3.2")
    exp = ref.voting_details(s, y, windows)
    assert details_as_dicts(d.certify_details(s, y, windows)) == exp
    import patchcert.defenses.base as base

    old = base.ELEMENT_BUDGET
    try:
        base.ELEMENT_BUDGET = 500  # forces chunks of one image
        assert details_as_dicts(d.certify_details(s, y, windows)) == exp
        m = create_defense("masking", window=(3, 3), threshold=0.3)
        exp_m = ref.masking_details(s[:12], y[:12], [(3, 3), (2, 2)], (3, 3), 0.3)
        assert details_as_dicts(m.certify_details(s[:12], y[:12], [(3, 3), (2, 2)])) == exp_m
    finally:
        base.ELEMENT_BUDGET = old


@pytest.mark.parametrize("name,opts", [
    ("voting", {"binarize": "sign"}),
    ("voting", {"binarize": "argmax", "condition": "3.3"}),
    ("clipping", {"clip": (-1.0, 1.0)}),
    ("masking", {"window": (2, 2), "threshold": 0.4}),
])
def test_float32_and_float64_agree_on_integer_maps(name, opts):
    gen = torch.Generator().manual_seed(3)
    s = torch.randint(-2, 3, (40, 3, 5, 5), generator=gen).double()
    y = torch.randint(0, 3, (40,), generator=gen)
    s[torch.arange(40), y] += 1.0
    d = create_defense(name, **opts)
    a = d.certify_details(s, y, [(2, 2), (1, 3)])
    b = d.certify_details(s.float(), y, [(2, 2), (1, 3)])
    assert torch.equal(a.certified, b.certified) and torch.equal(a.margin, b.margin)
    assert torch.equal(d.predict(s), d.predict(s.float()))
