"""Hypothesis properties of the certificates, and attacks against certified maps.

* a certificate for a window implies one for every window it contains;
* Condition 3.3 implies Condition 3.2;
* on a certified map, replacing the cells of any placement of the window by adversarial values
  (random, extreme, and the crafted worst case of each defense) never changes ``predict``;
* an exhaustive attack over the adversary's effective choices on tiny maps: for voting and
  clipping (whose certificates are exact) a flip exists **iff** the map is not certified; for
  masking a flip never coexists with a certificate;
* margin maps agree in sign with the certificate.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.defenses import create_defense

BIG = 1.0e4


@st.composite
def score_maps(draw, n_max=3, k_min=2, k_max=4, hw_min=1, hw_max=5):
    """(scores [N,K,H,W], labels [N]) biased towards the labels; ties common."""
    N = draw(st.integers(1, n_max))
    K = draw(st.integers(k_min, k_max))
    H, W = draw(st.integers(hw_min, hw_max)), draw(st.integers(hw_min, hw_max))
    n = N * K * H * W
    kind = draw(st.sampled_from(["ternary", "int", "float"]))
    if kind == "ternary":
        vals = draw(st.lists(st.integers(-1, 1), min_size=n, max_size=n))
    elif kind == "int":
        vals = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    else:
        vals = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n))
    s = torch.tensor(vals, dtype=torch.float64).view(N, K, H, W)
    y = torch.tensor(draw(st.lists(st.integers(0, K - 1), min_size=N, max_size=N)))
    bias = draw(st.sampled_from([3, 0, 1, 2, 5, 10]))
    s[torch.arange(N), y] += float(bias)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return s.to(dtype), y


def defense_params(draw, kind, H, W):
    wrap = draw(st.booleans())
    if kind == "voting":
        return {
            "binarize": draw(st.sampled_from(["sign", "argmax", 0.3, 0.5])),
            "condition": draw(st.sampled_from(["3.2", "3.3"])),
            "wrap": wrap,
        }
    if kind == "clipping":
        return {"clip": draw(st.sampled_from(["tanh", (-1.0, 1.0), (-2.0, 0.5)])), "wrap": wrap}
    return {
        "window": (draw(st.integers(1, H)), draw(st.integers(1, W))),
        "threshold": draw(st.sampled_from([0.0, 0.0, 0.3, 0.7])),
        "clip_max": draw(st.sampled_from([None, 1.0])),
        "features": draw(st.sampled_from(["logits", "confidence", "prediction"])),
        "wrap": wrap,
    }


def placements(H, W, wh, ww, wrap):
    if wh > H or ww > W:
        return []
    rows = range(H) if wrap else range(H - wh + 1)
    cols = range(W) if wrap else range(W - ww + 1)
    return [(i, j) for i in rows for j in cols]


def attack_all_placements(s1, window, wrap, patterns):
    """Every placement of ``window`` on map ``s1`` [K,H,W], filled with each pattern
    [A, K, wh, ww]: maps [P*A, K, H, W]."""
    K, H, W = s1.shape
    wh, ww = window
    out = []
    for i, j in placements(H, W, wh, ww, wrap):
        rows = torch.tensor([(i + a) % H for a in range(wh)])
        cols = torch.tensor([(j + b) % W for b in range(ww)])
        m = s1.expand(patterns.shape[0], K, H, W).clone()
        m[:, :, rows[:, None], cols[None, :]] = patterns.to(m.dtype)
        out.append(m)
    return torch.cat(out) if out else s1.new_zeros(0, K, H, W)


def crafted_patterns(K, y, wh, ww, gen):
    """Random, extreme and worst-case fillings for a wh x ww window: [A, K, wh, ww]."""
    pats = []
    for c in range(K):  # the exact worst case of voting/clipping: y nothing, c everything
        p = torch.full((K, wh, ww), -BIG)
        p[c] = BIG
        pats.append(p)
        q = torch.full((K, wh, ww), 1.0)  # masking: spread moderate evidence for c, none for y
        q[y] = -BIG
        q[c] = 2.0
        pats.append(q)
    allc = torch.full((K, wh, ww), BIG)  # sign voting: every class but y votes
    allc[y] = -BIG
    pats += [allc, torch.full((K, wh, ww), BIG), torch.full((K, wh, ww), -BIG), torch.zeros(K, wh, ww)]
    ypos = torch.full((K, wh, ww), -BIG)  # evidence for y inside the patch (masking interplay)
    ypos[y] = BIG
    pats.append(ypos)
    for scale in (1.0, 5.0, 100.0):
        pats += list(torch.randn(6, K, wh, ww, generator=gen, dtype=torch.float64) * scale)
    return torch.stack([p.double() for p in pats])


@st.composite
def defense_and_maps(draw, kinds=("voting", "clipping", "masking"), **kw):
    s, y = draw(score_maps(**kw))
    kind = draw(st.sampled_from(kinds))
    params = defense_params(draw, kind, s.shape[2], s.shape[3])
    return kind, params, s, y


def all_windows(H, W):
    return [(a, b) for a in range(1, H + 2) for b in range(1, W + 2)]


@settings(max_examples=150)
@given(defense_and_maps())
def test_certificate_monotone_in_window(case):
    kind, params, s, y = case
    d = create_defense(kind, **params)
    H, W = s.shape[2:]
    wins = all_windows(H, W)
    per = d.certify_details(s, y, wins).per_window  # [N, len(wins)]
    for a, wa in enumerate(wins):
        for b, wb in enumerate(wins):
            if wa[0] <= wb[0] and wa[1] <= wb[1]:  # wa inside wb
                assert bool((per[:, a] | ~per[:, b]).all()), (d, wa, wb)
    # several windows at once == all of them one by one
    for i in range(len(y)):
        assert bool(per[i].all()) == bool(d.certify(s[i : i + 1], y[i : i + 1], wins)[0])


@settings(max_examples=150)
@given(score_maps(), st.sampled_from(["sign", "argmax", 0.25, 0.5]), st.booleans(), st.data())
def test_condition_33_implies_32(maps, binarize, wrap, data):
    s, y = maps
    H, W = s.shape[2:]
    wins = data.draw(st.lists(st.tuples(st.integers(1, H + 1), st.integers(1, W + 1)), min_size=1, max_size=3))
    c32 = create_defense("voting", binarize=binarize, condition="3.2", wrap=wrap).certify(s, y, wins)
    c33 = create_defense("voting", binarize=binarize, condition="3.3", wrap=wrap).certify(s, y, wins)
    assert bool((c32 | ~c33).all())


@settings(max_examples=120)
@given(defense_and_maps(n_max=2, hw_min=2, hw_max=4), st.data())
def test_attacks_never_flip_a_certified_map(case, data):
    kind, params, s, y = case
    d = create_defense(kind, **params)
    H, W = s.shape[2:]
    K = s.shape[1]
    window = (data.draw(st.integers(1, H)), data.draw(st.integers(1, W)))
    cert = d.certify(s, y, [window])
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for i in torch.nonzero(cert).flatten().tolist():
        pats = crafted_patterns(K, int(y[i]), *window, gen)
        maps = attack_all_placements(s[i], window, d.wrap, pats)
        pred = d.predict(maps)
        assert bool((pred == y[i]).all()), (d, window, s[i].tolist(), int(y[i]))


def vote_menu(binarize, K):
    """Score vectors per cell covering every vote pattern the adversary can cast in one cell."""
    if binarize == "sign":
        return [torch.tensor(v, dtype=torch.float64) for v in itertools.product([-1.0, 1.0], repeat=K)]
    if binarize == "argmax":
        return [torch.where(torch.arange(K) == c, 1.0, -1.0).double() for c in range(K)]
    menu = [torch.zeros(K, dtype=torch.float64)]  # uniform
    for r in (1, 2):
        for cs in itertools.combinations(range(K), r):
            v = torch.full((K,), -BIG, dtype=torch.float64)
            v[list(cs)] = 0.0
            menu.append(v)
    return menu


def exhaustive_patterns(menu, K, wh, ww):
    """Every assignment of a menu entry to each cell of a wh x ww window: [A, K, wh, ww]."""
    M = torch.stack(menu)  # [m, K]
    idx = torch.tensor(list(itertools.product(range(len(menu)), repeat=wh * ww)))  # [A, cells]
    return M[idx].permute(0, 2, 1).reshape(-1, K, wh, ww)


@settings(max_examples=120)
@given(score_maps(n_max=2, k_max=3, hw_min=2, hw_max=4), st.sampled_from(["sign", "argmax", 0.3, 0.5]), st.booleans(),
       st.data())
def test_voting_32_is_exact_against_exhaustive_attack(maps, binarize, wrap, data):
    s, y = maps
    K, H, W = s.shape[1:]
    menu = vote_menu(binarize, K)
    wh = data.draw(st.integers(1, min(H, 2)))
    ww = data.draw(st.integers(1, min(W, 2)))
    if len(menu) ** (wh * ww) > 4096:
        wh, ww = 1, 1
    d = create_defense("voting", binarize=binarize, condition="3.2", wrap=wrap)
    cert = d.certify(s, y, [(wh, ww)])
    pats = exhaustive_patterns(menu, K, wh, ww)
    for i in range(len(y)):
        maps_i = attack_all_placements(s[i].double(), (wh, ww), wrap, pats)
        flipped = bool((d.predict(maps_i) != y[i]).any())
        assert flipped != bool(cert[i]), (binarize, (wh, ww), s[i].tolist(), int(y[i]))


@settings(max_examples=100)
@given(score_maps(n_max=2, k_max=3, hw_min=2, hw_max=4), st.sampled_from(["tanh", (-1.0, 1.0), (-2.0, 0.5)]),
       st.booleans(), st.data())
def test_clipping_is_exact_against_exhaustive_attack(maps, clip, wrap, data):
    s, y = maps
    if clip == "tanh":
        s = s * 20  # the range where tanh(0.05 u - 1) moves
    K, H, W = s.shape[1:]
    wh = data.draw(st.integers(1, min(H, 2)))
    ww = data.draw(st.integers(1, min(W, 3 if K == 2 else 2)))
    if 2 ** (K * wh * ww) > 4096:
        ww = 1
    d = create_defense("clipping", clip=clip, wrap=wrap)
    cert = d.certify(s, y, [(wh, ww)])
    menu = [torch.tensor(v, dtype=torch.float64) for v in itertools.product([-BIG, BIG], repeat=K)]  # lo / hi
    pats = exhaustive_patterns(menu, K, wh, ww)
    for i in range(len(y)):
        maps_i = attack_all_placements(s[i].double(), (wh, ww), wrap, pats)
        flipped = bool((d.predict(maps_i) != y[i]).any())
        assert flipped != bool(cert[i]), (clip, (wh, ww), s[i].tolist(), int(y[i]))


@settings(max_examples=100)
@given(score_maps(n_max=2, k_max=3, hw_min=2, hw_max=4), st.data())
def test_masking_exhaustive_attack_never_beats_a_certificate(maps, data):
    s, y = maps
    K, H, W = s.shape[1:]
    mask = (data.draw(st.integers(1, min(H, 2))), data.draw(st.integers(1, min(W, 2))))
    params = {
        "window": mask,
        "threshold": data.draw(st.sampled_from([0.0, 0.2, 0.5, 0.8])),
        "clip_max": data.draw(st.sampled_from([None, 1.0])),
        "features": data.draw(st.sampled_from(["logits", "confidence", "prediction"])),
        "wrap": data.draw(st.booleans()),
    }
    d = create_defense("masking", **params)
    cert = d.certify(s, y, [mask])
    if not bool(cert.any()):
        return
    values = [-1.0, 0.5, 1.0, 3.0, 50.0] if params["features"] == "logits" else [-BIG, 0.0, BIG]
    cells = K * mask[0] * mask[1]
    while len(values) ** cells > 4096:
        values = values[1:]
    menu = [torch.tensor(v, dtype=torch.float64) for v in itertools.product(values, repeat=K)]
    pats = exhaustive_patterns(menu, K, *mask)
    for i in torch.nonzero(cert).flatten().tolist():
        maps_i = attack_all_placements(s[i].double(), mask, params["wrap"], pats)
        assert bool((d.predict(maps_i) == y[i]).all()), (d, s[i].tolist(), int(y[i]))


@settings(max_examples=100)
@given(defense_and_maps(), st.data())
def test_margin_map_sign_agrees_with_certificate(case, data):
    kind, params, s, y = case
    d = create_defense(kind, **params)
    H, W = s.shape[2:]
    w = (data.draw(st.integers(1, H)), data.draw(st.integers(1, W)))
    mm = d.margin_map(s, y, w)
    cert = d.certify(s, y, [w])
    det = d.certify_details(s, y, [w])
    if mm.numel() == 0:
        assert not bool(cert.any())
        return
    low = mm.flatten(1).amin(1)
    assert bool((~cert | (low >= 0)).all())  # certified -> no negative placement margin
    assert bool((cert | (low <= 0) | (det.row < 0)).all())  # failed -> a non-positive one (or a clean failure)
    ok = det.row >= 0
    assert torch.equal(det.margin[ok], low[ok])  # the worst case is the margin map's minimum


@pytest.mark.parametrize("kind,params", [
    ("voting", {"binarize": "sign"}),
    ("clipping", {"clip": "tanh"}),
    ("masking", {"window": (2, 2)}),
])
def test_predict_is_per_image(kind, params):
    """Batch composition, order and chunking never change a prediction or a certificate."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(30, 4, 6, 6, generator=gen)
    y = torch.randint(0, 4, (30,), generator=gen)
    s[torch.arange(30), y] += 0.8
    d = create_defense(kind, **params)
    perm = torch.randperm(30, generator=gen)
    assert torch.equal(d.predict(s)[perm], d.predict(s[perm]))
    r1 = d.certify_details(s, y, [(2, 2), (1, 3)])
    r2 = d.certify_details(s[perm], y[perm], [(2, 2), (1, 3)])
    assert torch.equal(r1.certified[perm], r2.certified) and torch.equal(r1.margin[perm], r2.margin)
    single = torch.cat([d.certify(s[i : i + 1], y[i : i + 1], [(2, 2), (1, 3)]) for i in range(30)])
    assert torch.equal(single, r1.certified)
