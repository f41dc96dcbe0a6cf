"""Defense API: construction, validation messages, config/key, result records, edge cases,
hand-checked examples, and the geometry that turns pixel patches into the windows certified."""

from __future__ import annotations

import json

import pytest
import torch

import patchcert
from patchcert import Geometry, PatchcertError, patch_windows
from patchcert.defenses import CertifyResult, Defense, check_scores, create_defense, defense_from_config, list_defenses

ALL = [
    ("voting", {}),
    ("voting", {"binarize": "argmax", "condition": "3.3"}),
    ("voting", {"binarize": 0.2, "wrap": True}),
    ("clipping", {}),
    ("clipping", {"clip": (-1, 2)}),
    ("masking", {"window": (2, 2)}),
    ("masking", {"window": 3, "threshold": 0.5, "clip_max": 1.0, "features": "confidence", "wrap": True}),
]


def one_hot_bias(y, K, strength=2.0):
    return strength * torch.nn.functional.one_hot(y, K).double()[:, :, None, None]


# -- construction and identity ---------------------------------------------------------------


def test_registry_and_public_names():
    # other test modules may register throw-away defenses (e.g. a deliberately broken one)
    from patchcert.defenses.base import _DEFENSES

    ours = [n for n in list_defenses() if getattr(_DEFENSES[n], "__module__", "").startswith("patchcert.")]
    assert ours == ["clipping", "double-masking", "masking", "voting"]
    assert patchcert.create_defense is create_defense
    from patchcert.defenses import Defense as D, check_scores as cs, register_defense  # noqa: F401

    assert D is Defense and cs is check_scores and callable(register_defense)


@pytest.mark.parametrize("name,opts,key", [
    ("voting", {}, "voting(sign,3.2)"),
    ("voting", {"binarize": "argmax", "condition": "3.3"}, "voting(argmax,3.3)"),
    ("voting", {"binarize": 0.2, "wrap": True}, "voting(0.2,3.2,wrap)"),
    ("voting", {"binarize": "0.25", "condition": 3.3}, "voting(0.25,3.3)"),
    ("clipping", {}, "clipping(tanh)"),
    ("clipping", {"clip": (-1, 2)}, "clipping(-1:2)"),
    ("clipping", {"clip": "tanh", "scale": 0.1, "shift": 0.0}, "clipping(tanh:0.1:0)"),
    ("masking", {"window": (6, 6)}, "masking(6x6,T=0,logits)"),
    ("masking", {"window": 3, "threshold": 0.5, "clip_max": 1.0, "features": "confidence", "wrap": True},
     "masking(3x3,T=0.5,confidence,clip=1,wrap)"),
])
def test_key_config_roundtrip(name, opts, key):
    d = create_defense(name, **opts)
    assert d.key == key and str(d) == key
    cfg = json.loads(json.dumps(d.config))  # JSON-serialisable
    assert cfg["name"] == name
    d2 = defense_from_config(cfg)
    assert d2 == d and d2.key == d.key and repr(d2) == repr(d)


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts,match", [
    ("nope", {}, "unknown defense 'nope'"),
    ("voting", {"foo": 1}, "unknown option.*'foo'"),
    ("voting", {"binarize": "median"}, "binarize must be"),
    ("voting", {"binarize": 0.0}, r"θ.*\(0, 1\]"),
    ("voting", {"binarize": 1.5}, r"θ.*\(0, 1\]"),
    ("voting", {"binarize": True}, "binarize must be"),
    ("voting", {"condition": "3.4"}, "condition must be '3.2' or '3.3'"),
    ("voting", {"wrap": "yes"}, "wrap must be True or False"),
    ("clipping", {"clip": "relu"}, "clip must be 'tanh' or a pair"),
    ("clipping", {"clip": (1, 0)}, "lo < hi"),
    ("clipping", {"clip": (0, float("inf"))}, "finite"),
    ("clipping", {"clip": (0, 1, 2)}, "pair"),
    ("clipping", {"clip": (0, 1), "scale": 2.0}, "only to clip='tanh'"),
    ("clipping", {"scale": 0.0}, "non-zero"),
    ("masking", {}, "missing required option.*'window'"),
    ("masking", {"window": (0, 2)}, "positive sides"),
    ("masking", {"window": (2, 2), "threshold": 1.0}, r"threshold T must be in \[0, 1\)"),
    ("masking", {"window": (2, 2), "threshold": -0.1}, r"threshold T must be in \[0, 1\)"),
    ("masking", {"window": (2, 2), "threshold": float("nan")}, r"threshold T must be in \[0, 1\)"),
    ("masking", {"window": (2, 2), "clip_max": 0}, "clip_max"),
    ("masking", {"window": (2, 2), "clip_max": -1.0}, "clip_max"),
    ("masking", {"window": (2, 2), "features": "probs"}, "features must be one of"),
    ("masking", {"window": "6x6"}, "window must be a pair"),
])
def test_bad_options_raise(name, opts, match):
    with pytest.raises(PatchcertError, match=match) as e:
        create_defense(name, **opts)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


GOOD = torch.zeros(2, 3, 4, 4)
GOOD_Y = torch.tensor([0, 2])


@pytest.mark.parametrize("scores,match", [
    (torch.zeros(3, 4, 4), "4 dimensions"),
    (torch.zeros(1, 2, 3, 4, 4), "4 dimensions"),
    ([[[[0.0]]]], "torch.Tensor"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.long), "floating point"),
    (torch.zeros(2, 0, 4, 4), "at least one class"),
    (torch.zeros(2, 3, 0, 4), "at least one class and one cell"),
    (torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1), "NaN or Inf.*image 1"),
    (torch.tensor([float("inf"), 0.0]).view(2, 1, 1, 1), "NaN or Inf.*image 0"),
])
@pytest.mark.parametrize("name,opts", ALL)
def test_bad_scores_raise(name, opts, scores, match):
    d = create_defense(name, **opts)
    with pytest.raises(PatchcertError, match=match):
        d.predict(scores)
    with pytest.raises(PatchcertError, match=match):
        d.certify(scores, torch.zeros(2, dtype=torch.long), [(1, 1)])


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 3]), r"labels must be in \[0, 3\)"),
    (torch.tensor([-1, 0]), r"labels must be in \[0, 3\)"),
    (torch.tensor([0]), r"shape \[2\]"),
    (torch.tensor([[0], [1]]), r"shape \[2\]"),
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([True, False]), "integer"),
    ("ab", "integer tensor"),
])
@pytest.mark.parametrize("name,opts", ALL)
def test_bad_labels_raise(name, opts, labels, match):
    d = create_defense(name, **opts)
    with pytest.raises(PatchcertError, match=match):
        d.certify(GOOD, labels, [(1, 1)])
    with pytest.raises(PatchcertError, match=match):
        d.certify_details(GOOD, labels, [(1, 1)])


@pytest.mark.parametrize("windows,match", [
    ([], "windows is empty"),
    ([(0, 2)], "positive sides, got 0x2"),
    ([(2, -1)], "positive sides"),
    ([(2.5, 2)], "must be an int"),
    ([(True, 2)], "must be an int"),
    ([(2,)], "pair"),
    ((2, 2), r"list of \(wh, ww\) pairs.*\[\(2, 2\)\]"),
    ("5x5", "list of"),
    (None, "list of"),
    ([(1, 1), "3x3"], "window 1 must be a pair"),
])
@pytest.mark.parametrize("name,opts", ALL)
def test_bad_windows_raise(name, opts, windows, match):
    d = create_defense(name, **opts)
    with pytest.raises(PatchcertError, match=match):
        d.certify(GOOD, GOOD_Y, windows)


def test_margin_map_validates():
    d = create_defense("voting")
    with pytest.raises(PatchcertError, match="positive sides"):
        d.margin_map(GOOD, GOOD_Y, (0, 1))
    with pytest.raises(PatchcertError, match="labels must be in"):
        d.margin_map(GOOD, torch.tensor([0, 5]), (1, 1))
    with pytest.raises(PatchcertError, match="4 dimensions"):
        d.margin_map(GOOD[0], GOOD_Y, (1, 1))


def test_exactness_guard_on_huge_logits():
    d = create_defense("masking", window=(2, 2))
    with pytest.raises(PatchcertError, match="too large for exact"):
        d.predict(torch.full((1, 2, 4, 4), 1e30))
    # clipped features are bounded: fine
    assert create_defense("masking", window=(2, 2), clip_max=5.0).predict(torch.full((1, 2, 4, 4), 1e30)).tolist() == [0]


# -- types, shapes, edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("name,opts", ALL)
def test_types_and_shapes(name, opts):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (5,), generator=gen)
    s = (torch.randn(5, 3, 6, 6, generator=gen) + one_hot_bias(y, 3).float()).requires_grad_()
    d = create_defense(name, **opts)
    p = d.predict(s)
    assert p.dtype == torch.long and p.shape == (5,) and not p.requires_grad
    c = d.certify(s, y.int(), [(2, 2), (1, 3)])  # int32 labels are fine
    assert c.dtype == torch.bool and c.shape == (5,)
    r = d.certify_details(s, y, [(2, 2), (1, 3)])
    assert isinstance(r, CertifyResult) and len(r) == 5 and r.windows == [(2, 2), (1, 3)]
    assert r.per_window.shape == (5, 2) and r.per_window.dtype == torch.bool
    assert r.margin.dtype == torch.float64
    for t in (r.window_index, r.row, r.col, r.worst_class):
        assert t.dtype == torch.long and t.shape == (5,)
    assert torch.equal(r.certified, r.per_window.all(1))
    w = r.worst(0)
    assert set(w) == {"margin", "window", "row", "col", "class"}
    mm = d.margin_map(s, y, (2, 2))
    assert mm.dtype == torch.float64 and mm.shape[0] == 5
    # any float dtype; labels as a list
    assert torch.equal(d.predict(s.detach().double()), p)
    assert torch.equal(d.certify(s.detach(), y.tolist(), [(2, 2), (1, 3)]), c)


@pytest.mark.parametrize("name,opts", ALL)
def test_empty_batch(name, opts):
    d = create_defense(name, **opts)
    s = torch.zeros(0, 3, 4, 4)
    y = torch.zeros(0, dtype=torch.long)
    assert d.predict(s).shape == (0,) and d.predict(s).dtype == torch.long
    r = d.certify_details(s, y, [(1, 1), (2, 2)])
    assert r.certified.shape == (0,) and r.per_window.shape == (0, 2)
    assert d.margin_map(s, y, (2, 2)).shape[0] == 0


@pytest.mark.parametrize("name,opts", ALL)
def test_window_larger_than_map_is_never_certified(name, opts):
    y = torch.tensor([0, 1])
    s = torch.zeros(2, 3, 3, 3) + one_hot_bias(y, 3, 50.0).float()
    d = create_defense(name, **opts)
    r = d.certify_details(s, y, [(1, 1), (4, 1)])
    assert not bool(r.per_window[:, 1].any()) and not bool(r.certified.any())
    assert r.window_index.tolist() == [1, 1] and r.row.tolist() == [-1, -1] and r.col.tolist() == [-1, -1]
    assert r.margin.tolist() == [float("-inf")] * 2 and r.worst_class.tolist() == [-1, -1]
    mm = d.margin_map(s, y, (4, 1))
    if name == "masking":  # the mask window's placements, none of them certifiable for this window
        assert mm.numel() > 0 and bool((mm == float("-inf")).all())
    else:
        assert mm.numel() == 0


def test_single_class_is_certified_with_infinite_margin():
    s = torch.randn(3, 1, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    for name, opts in ALL:
        r = create_defense(name, **opts).certify_details(s, y, [(2, 2)])
        assert r.certified.all() and r.margin.tolist() == [float("inf")] * 3, name
        assert r.worst_class.tolist() == [-1] * 3


def test_training_loop_usage_still_works():
    """The seed's call pattern (train/loop.py): float32 maps, windows from the geometry."""
    d = create_defense("voting", binarize="sign", condition="3.2")
    g = Geometry(rf=7, stride=1, input_size=(32, 32))
    windows = patch_windows(g, "5x5", (32, 32))
    assert windows == [(11, 11)]
    y = torch.arange(4)
    s = torch.randn(4, 10, 32, 32) - 0.5 + one_hot_bias(y, 10, 1.5).float()
    assert d.predict(s).tolist() == [0, 1, 2, 3]
    assert d.certify(s, y, windows).tolist() == [True] * 4


# -- hand-checked examples -------------------------------------------------------------------


def test_voting_tie_rule_by_hand():
    # 1x4 map, class 0 votes everywhere, class 1 nowhere
    s = torch.tensor([[[[1.0, 1, 1, 1]], [[-1.0, -1, -1, -1]]]])
    d = create_defense("voting")
    # label 0: 1x2 patch -> at worst 2 vs 2, a tie that class 0 wins -> certified with margin 0
    r = d.certify_details(s, torch.tensor([0]), [(1, 2)])
    assert r.certified.tolist() == [True] and r.margin.tolist() == [0.0] and r.worst_class.tolist() == [1]
    assert d.certify(s, torch.tensor([0]), [(1, 1)]).tolist() == [True]
    assert d.certify(s, torch.tensor([0]), [(1, 3)]).tolist() == [False]
    # the same map with the classes swapped: label 1 loses the 2-2 tie to class 0
    r = d.certify_details(s.flip(1), torch.tensor([1]), [(1, 2)])
    assert r.certified.tolist() == [False] and r.margin.tolist() == [0.0] and r.worst_class.tolist() == [0]
    attacked = s.flip(1).clone()
    attacked[0, :, 0, :2] = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # votes for class 0 in the patch
    assert d.predict(attacked).tolist() == [0]
    # Condition 3.3: n_y - n_c = 4 must exceed 2 |P|
    d33 = create_defense("voting", condition="3.3")
    assert d33.certify(s, torch.tensor([0]), [(1, 1)]).tolist() == [True]
    assert d33.certify_details(s, torch.tensor([0]), [(1, 2)]).margin.tolist() == [0.0]
    assert d33.certify(s, torch.tensor([0]), [(1, 2)]).tolist() == [True]


def test_wrap_around_by_hand():
    # a 1x5 band map; class 1 votes only in columns 0 and 4 (adjacent with wrap-around)
    s = torch.full((1, 2, 1, 5), -1.0)
    s[0, 0] = 1.0
    s[0, 1, 0, [0, 4]] = 1.0
    y = torch.tensor([0])
    for wrap in (False, True):
        d = create_defense("voting", wrap=wrap)
        mm = d.margin_map(s, y, (1, 2))
        # margin = (5 - 2) - (2 - in_1) - 2 = in_1 - 1; placements (0,0)..(0,3) [+ (0,4): cols 4 and 0]
        expected = [[0.0, -1.0, -1.0, 0.0] + ([1.0] if wrap else [])]
        assert mm[0].tolist() == expected
    r = create_defense("voting", wrap=True).certify_details(s, y, [(1, 2)])
    assert r.margin.tolist() == [-1.0] and (r.row.item(), r.col.item()) == (0, 1)


def test_masking_by_hand():
    # 1x6 logits map, mask window 1x2, T = 0; label 0 evidence spread, class 1 concentrated
    s = torch.tensor([[[[1.0, 1, 1, 1, 1, 1]], [[0.0, 0, 4, 0, 0, 0]]]])
    y = torch.tensor([0])
    d = create_defense("masking", window=(1, 2))
    # inference: g = (6, 4); masks 2 from class 0 and 4 from class 1 -> (4, 0)
    assert d.predict(s).tolist() == [0]
    # every P: t[0] = 4; the zeroed class-0 map still has a window of 2 ones -> M = 2, lb = 2;
    # ub[1] = 4 - (class 1 inside P): 0 if P covers col 2 (P = cols 1-2, 2-3), else 4
    mm = d.margin_map(s, y, (1, 2))
    assert mm.shape == (1, 1, 5)
    assert mm[0, 0].tolist() == [-2.0, 2.0, 2.0, -2.0, -2.0]
    assert not bool(d.certify(s, y, [(1, 2)]))
    # a patch window that does not fit in the mask window is never certified
    s2 = torch.tensor([[[[3.0, 3, 3, 3, 3, 3]], [[0.0, 0, 1, 0, 0, 0]]]])
    r = d.certify_details(s2, y, [(1, 1), (1, 2), (1, 3), (2, 1)])
    assert r.per_window.tolist() == [[True, True, False, False]]
    assert r.margin.item() == float("-inf") and r.window_index.item() == 2
    # its margin for (1, 1) and (1, 2) is the mask window's analysis
    assert torch.equal(d.margin_map(s2, y, (1, 1)), d.margin_map(s2, y, (1, 2)))


def test_masking_threshold_correction_is_needed():
    """T > 0: the bound without the M_ovl branch certifies a map that an attack flips."""
    import reference_defenses as ref

    T, mask = 0.6, (1, 2)
    s = torch.zeros(1, 2, 1, 7, dtype=torch.float64)
    s[0, 0] = 1.0  # label 0: evidence spread evenly, never detected
    s[0, 1, 0, 5:] = 1.0  # class 1: two cells, masked on the clean map
    y = torch.tensor([0])
    d = create_defense("masking", window=mask, threshold=T)
    assert d.predict(s).tolist() == [0]
    v = ref.mask_features(s[0].tolist())
    uncorrected = ref.masking_cases(v, 0, mask, T, False, corrected=False)
    assert all(ref.passes(m, c, 0) for m, c, _, _ in uncorrected)  # it would certify
    r = d.certify_details(s, y, [mask])
    assert r.certified.tolist() == [False]
    # P = cols 0-1 (first of several): t[0] = 5, M_ovl = 1 (cols 1-2) -> lb = 4 < ub[1] = 2 / 0.4 = 5
    assert r.margin.tolist() == [-1.0] and (r.row.item(), r.col.item(), r.worst_class.item()) == (0, 0, 1)
    # the attack: 8 for class 0 next to its clean evidence gets (cols 2-3) masked; class 1 gets 2.9,
    # spread so that its strongest window holds just under T of its mass (2.9 / 4.9: not
    # detected; 3 / 5 would be, exactly: 3/5 is above the float 0.6)
    x = s.clone()
    x[0, 0, 0, 1:3] = torch.tensor([0.0, 8.0])
    x[0, 1, 0, 1:3] = torch.tensor([1.45, 1.45])
    assert d.predict(x).tolist() == [1]


def test_masking_mask_larger_than_map():
    y = torch.tensor([0])
    s = torch.zeros(1, 2, 3, 3)
    s[0, 0] = 1.0
    d = create_defense("masking", window=(5, 5))
    # inference clamps the mask to the map: everything is masked, all classes tie at 0
    assert d.predict(s).tolist() == [0]
    assert d.certify(s, y, [(1, 1)]).tolist() == [False]


def test_clipping_certifies_over_all_classes_not_just_the_runner_up():
    """A map the reference code's runner-up-only check would certify but that an attack flips."""
    gen = torch.Generator().manual_seed(0)
    d = create_defense("clipping", clip=(-1.0, 1.0))
    N, K, H, W = 4000, 3, 1, 6
    s = torch.randint(-1, 2, (N, K, H, W), generator=gen).double()
    s[:, 0] = torch.randint(0, 2, (N, H, W), generator=gen).double()
    y = torch.zeros(N, dtype=torch.long)
    v = s.clamp(-1, 1)
    g = v.sum((2, 3))
    runner = g[:, 1:].argmax(1) + 1
    win = (1, 1)
    out = g[:, :, None, None] - v  # 1x1 windows: outside sums per placement
    m_all = (out[:, :1] - 1) - (out[:, 1:] + 1)  # [N, 2, H, W]
    m_runner = m_all.gather(1, (runner - 1)[:, None, None, None].expand(-1, 1, H, W))
    runner_only = (g.argmax(1) == 0) & (m_runner.flatten(1).amin(1) >= 0)  # label 0 wins ties
    ours = d.certify(s, y, [win])
    fooled = runner_only & ~ours
    assert bool((ours <= runner_only).all())
    assert int(fooled.sum()) > 0
    i = int(torch.nonzero(fooled)[0])
    # an attack in one cell flips it: give class 0 the minimum and the worst class the maximum there
    det = d.certify_details(s[i : i + 1], y[i : i + 1], [win])
    c, r, q = int(det.worst_class), int(det.row), int(det.col)
    x = s[i : i + 1].clone()
    x[0, :, r, q] = -1.0
    x[0, c, r, q] = 1.0
    assert d.predict(x).item() != 0


# -- geometry: pixel patches to the windows the benchmarks and papers use ---------------------


def test_geometry_windows_used_by_the_certificates():
    g7 = Geometry(rf=7, stride=1, input_size=(32, 32))
    assert g7.window((5, 5)) == (11, 11)
    rects = patch_windows(g7, "area=24", (32, 32))
    assert rects == [(7, 30), (8, 18), (9, 14), (10, 12), (12, 10), (14, 9), (18, 8), (30, 7)]
    bagnet17 = Geometry(rf=17, stride=8)
    assert bagnet17.window((32, 32)) == (6, 6)  # BagNet-17 on 224 px, 2% patch
    assert patchcert.parse_patch("2%").shapes((224, 224)) == [(32, 32)]
    ds_col = Geometry(rf=(None, 4), stride=(1, 1), wrap=True)  # DS column bands of width 4
    assert ds_col.window((5, 5)) == (1, 8)
    # certify with all eight rectangles at once == every one of them
    y = torch.arange(3)
    s = torch.randn(3, 10, 32, 32) - 0.4 + one_hot_bias(y, 10, 1.6).float()
    d = create_defense("voting")
    per = d.certify_details(s, y, rects).per_window
    for i, w in enumerate(rects):
        assert torch.equal(per[:, i], d.certify(s, y, [w]))
