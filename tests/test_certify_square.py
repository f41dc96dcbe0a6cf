"""largest_square: the vectorised bisection equals a linear scan over sizes (brute force)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.certify import build_defenses, largest_certified_square, square_windows
from patchcert.defenses import list_defenses
from patchcert.geometry import Geometry

SPECS = ["voting", "voting:condition=3.3", "voting:binarize=argmax", "voting:binarize=0.4",
         "clipping:clip=tanh", "clipping:clip=-1:1", "masking:threshold=0.0,features=logits",
         "masking:threshold=0.3,features=prediction"]


def available():
    have = set(list_defenses())
    return [s for s in SPECS if s.split(":")[0] in have]


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(2, 4))
    H, W = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    rf = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 2))
    cap = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    discrete = draw(st.booleans())  # small integers: many exact ties
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    if discrete:
        s = torch.randint(-2, 3, (n, k, H, W), generator=g).double()
    else:
        s = torch.randn(n, k, H, W, generator=g, dtype=torch.float64)
    s[torch.arange(n), labels] += torch.rand(n, generator=g, dtype=torch.float64)[:, None, None] * 3
    geom = Geometry(rf=rf, stride=stride)
    spec = draw(st.sampled_from(available()))
    return s, labels, geom, cap, spec


def brute_force(defense, scores, labels, geom, cap):
    """Per image, the largest s with every side 1..s certified (one certify call per image and side)."""
    out = []
    for i in range(scores.shape[0]):
        best = 0
        for side in range(1, cap + 1):
            if not bool(defense.certify(scores[i:i + 1], labels[i:i + 1], [geom.window((side, side))])):
                break
            best = side
        out.append(best)
    return torch.tensor(out)


@settings(max_examples=50)
@given(problems())
def test_bisection_equals_linear_scan(problem):
    scores, labels, geom, cap, spec = problem
    d = build_defenses([spec], default_window=(3, 3))[0].defense
    windows = square_windows(geom, cap)
    ref = brute_force(d, scores, labels, geom, cap)
    assert torch.equal(largest_certified_square(d, scores, labels, windows, "bisect"), ref)
    assert torch.equal(largest_certified_square(d, scores, labels, windows, "scan"), ref)


@settings(max_examples=50)
@given(problems(), st.integers(1, 9), st.integers(1, 9), st.integers(0, 3), st.integers(0, 3))
def test_certificates_are_monotone_in_the_window(problem, wh, ww, dh, dw):
    """What the bisection relies on: certified against a window => against every smaller one."""
    scores, labels, geom, cap, spec = problem
    d = build_defenses([spec], default_window=(5, 5))[0].defense
    big = d.certify(scores, labels, [(wh + dh, ww + dw)])
    small = d.certify(scores, labels, [(wh, ww)])
    assert bool((small | ~big).all())


def test_strided_geometry_dedupes_windows():
    """Stride 8: sides 1..8 share one window; the answer is the last side of the window."""
    calls = []

    class Counting:
        def certify(self, scores, labels, windows):
            calls.append(windows[0])
            return torch.tensor([windows[0][0] <= lim for lim in labels.tolist()])

    geom = Geometry(rf=9, stride=8)
    windows = square_windows(geom, 40)  # windows 2x2 (s=1..8), 3x3 (9..16), ... 6x6 (33..40)
    labels = torch.tensor([0, 1, 2, 3, 4, 6, 7])  # certified up to window side `label`
    got = largest_certified_square(Counting(), torch.zeros(7, 1, 8, 8), labels, windows)
    assert got.tolist() == [0, 0, 8, 16, 24, 40, 40]
    assert len(set(calls)) <= 5 and len(calls) <= 3 * 3  # log2(5 windows) rounds, grouped by window
    assert largest_certified_square(Counting(), torch.zeros(7, 1, 8, 8), labels, windows, "scan").tolist() == got.tolist()
    assert largest_certified_square(Counting(), torch.zeros(0, 1, 8, 8), labels[:0], windows).tolist() == []
    with pytest.raises(ValueError, match="unknown method"):
        largest_certified_square(Counting(), torch.zeros(7, 1, 8, 8), labels, windows, "guess")


@settings(max_examples=60)
@given(problems(), st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), max_size=3), st.booleans())
def test_shortcuts_never_change_the_answer(problem, known_windows, use_pred):
    """Known certificates (the requested patches' windows, in certify_batch), the predictions and
    the defense's window classes only skip work: the answer equals the brute force."""
    scores, labels, geom, cap, spec = problem
    d = build_defenses([spec], default_window=(3, 3))[0].defense
    windows = square_windows(geom, cap)
    ref = brute_force(d, scores, labels, geom, cap)
    known = {w: d.certify(scores, labels, [w]) for w in known_windows}
    pred = d.predict(scores) if use_pred else None
    got = largest_certified_square(d, scores, labels, windows, "bisect", known=known, pred=pred)
    assert torch.equal(got, ref)


def test_masking_square_search_runs_its_analysis_at_most_once():
    """Every window inside the mask window shares one analysis (window_class); with the patch's
    certificate known, the search needs no analysis at all."""
    from patchcert.defenses import create_defense

    g = torch.Generator().manual_seed(3)
    n, K = 40, 4
    labels = torch.randint(0, K, (n,), generator=g)
    s = torch.randn(n, K, 12, 12, generator=g, dtype=torch.float64)
    s[torch.arange(n), labels] += 2 * torch.rand(n, generator=g, dtype=torch.float64)[:, None, None]
    d = create_defense("masking", window=(6, 6))
    geom = Geometry(rf=3, stride=1)
    windows = square_windows(geom, 12)  # 3x3 .. 14x14
    ref = brute_force(d, s, labels, geom, 12)
    assert 0 < int((ref > 0).sum()) < n
    calls = []
    orig = d.certify

    def counting(scores, labs, ws):
        calls.append((scores.shape[0], d.window_class(ws[0])))
        return orig(scores, labs, ws)

    d.certify = counting
    assert torch.equal(largest_certified_square(d, s, labels, windows, pred=d.predict(s)), ref)
    inside = sum(k for k, c in calls if c[0] == "mask")
    assert inside <= n
    calls.clear()
    known = {(6, 6): orig(s, labels, [(6, 6)])}
    assert torch.equal(largest_certified_square(d, s, labels, windows, known=known), ref)
    assert all(c[0] != "mask" for _, c in calls)


def test_square_summary_is_informative():
    from patchcert.certify import square_summary

    line = square_summary([0.45, 0.30, 0.10, 0.0, 0.0])
    assert "mean side 0.85" in line  # E[side] = sum of the tail fractions
    assert "1x1 45.0%" in line and "3x3 10.0%" in line and "4x4 0.0%" in line and "largest: 3x3" in line
    assert "5x5" not in line.split(";")[1]
    assert "none certified" in square_summary([0.0, 0.0])
    assert "the search cap" in square_summary([0.5, 0.25])
    assert "0.01%" in square_summary([0.0001])
