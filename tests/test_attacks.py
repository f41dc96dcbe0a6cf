"""Heuristic patch attack (BagCert A.2): geometry, candidate selection, PGD, soundness."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.attacks import (
    PatchAttackConfig,
    affected_mask,
    attack_and_check,
    class_margins,
    patch_attack,
    patch_masks,
    pixel_start,
    select_candidates,
)
from patchcert.defenses import create_defense, list_defenses
from patchcert.errors import PatchcertError
from patchcert.geometry import Geometry
from patchcert.models.base import ScoreMapModel, trace_geometry


# -- tiny models -----------------------------------------------------------------------------

class LinearVotes(ScoreMapModel):
    """Receptive field 1: the score of class c at a pixel is ``x[c] - 0.5`` (c < 3)."""

    def __init__(self, num_classes: int = 3, size: int = 8) -> None:
        super().__init__((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.arch, self.config, self.num_classes = "linear_votes", {}, num_classes
        self.head = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(-0.5)
            for c in range(min(3, num_classes)):
                self.head.weight[c, c] = 1.0
        self.geometry = trace_geometry([(1, 1, 0)], input_size=(size, size))

    def forward_features(self, x):
        return x

    def forward_head(self, f):
        return self.head(f)


class TinyConv(ScoreMapModel):
    """Random small CNN: ``k x k`` conv (padding k//2, optional stride) -> ReLU -> 1x1 head."""

    def __init__(self, num_classes: int = 3, k: int = 3, stride: int = 1, width: int = 6, seed: int = 0,
                 bias_scale: float = 0.0) -> None:
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        g = torch.Generator().manual_seed(seed)
        self.arch, self.config, self.num_classes = "tiny_conv", {}, num_classes
        self.conv = nn.Conv2d(3, width, k, stride=stride, padding=k // 2)
        self.head = nn.Conv2d(width, num_classes, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.head.bias.add_(torch.randn(num_classes, generator=g) * bias_scale)
        self.geometry = trace_geometry([(k, stride, k // 2), (1, 1, 0)])

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, f):
        return self.head(f)


def easy_flip_batch(n: int = 6):
    """Class 0 owns 40 of 64 cells, class 1 owns 24: a 3x3 patch flips it, a 2x2 cannot."""
    x = torch.zeros(n, 3, 8, 8)
    x[:, 0, :, :5] = 1.0
    x[:, 1, :, 5:] = 1.0
    x[:, 2] = torch.rand(n, 8, 8) * 0.4  # class 2 never votes
    return x, torch.zeros(n, dtype=torch.long)


# -- geometry: feature placement <-> pixel patch ------------------------------------------------

def _cells_touched(geom: Geometry, axis: int, start: int, side: int, image: int, n: int) -> set[int]:
    out = set()
    for i in range(n):
        lo, hi = geom.cell_extent(axis, i, image)
        if lo <= start + side - 1 and hi >= start:
            out.add(i)
    return out


@settings(max_examples=60)
@given(
    k=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3),
    strides=st.lists(st.sampled_from([1, 1, 2]), min_size=3, max_size=3),
    patch=st.integers(1, 9),
    image=st.integers(10, 24),
)
def test_pixel_start_lands_inside_the_window(k, strides, patch, image):
    layers = [(kk, s, kk // 2) for kk, s in zip(k, strides)]
    geom = trace_geometry(layers)
    stride = geom.stride[0]
    n = (image - 1) // stride + 1  # map size of 'same'-padded convs
    patch = min(patch, image)
    win = geom.window((patch, patch))[0]
    for f in range(0, max(0, n - win) + 1):
        wanted = set(range(f, f + win))
        feasible = [p for p in range(image - patch + 1) if _cells_touched(geom, 0, p, patch, image, n) <= wanted]
        p = int(pixel_start(geom, 0, torch.tensor([f]), win, patch, image)[0])
        assert 0 <= p <= image - patch
        if feasible:
            assert p in feasible, (f, p, feasible)


@settings(max_examples=60)
@given(
    rf=st.integers(1, 5), stride=st.integers(1, 3), off=st.integers(0, 3), wrap=st.booleans(),
    size=st.integers(4, 12), ph=st.integers(1, 4), pw=st.integers(1, 4), data=st.data(),
)
def test_affected_mask_matches_cell_extents(rf, stride, off, wrap, size, ph, pw, data):
    geom = Geometry(rf=(rf, rf), stride=(stride, stride), offset=(off, off), wrap=wrap)
    n = -(-size // stride)
    image = n * stride
    py = data.draw(st.integers(0, image - min(ph, image)))
    px = data.draw(st.integers(0, image - min(pw, image)))
    m = affected_mask(geom, torch.tensor([py]), torch.tensor([px]), ph, pw, (n, n))[0]
    for i, j in itertools.product(range(n), range(n)):
        def hit(idx, start, side):
            lo = idx * stride - off
            pix = {(lo + t) % image if wrap else lo + t for t in range(rf)}
            return bool(pix & set(range(start, start + side)))
        assert bool(m[i, j]) == (hit(i, py, ph) and hit(j, px, pw))


def test_patch_outside_its_reach_changes_no_score():
    """Empirical check of affected_mask on a real conv net (stride 2, padding)."""
    torch.manual_seed(0)
    model = TinyConv(k=5, stride=2, seed=3).eval()
    x = torch.rand(4, 3, 16, 16)
    py, px = torch.tensor([0, 5, 11, 3]), torch.tensor([0, 9, 12, 6])
    mask = patch_masks(py, px, torch.tensor(4), torch.tensor(5), (16, 16))
    x2 = torch.where(mask, torch.rand_like(x), x)
    with torch.no_grad():
        d = (model.score_map(x2) - model.score_map(x)).abs().amax(1)
    reach = affected_mask(model.geometry, py, px, 4, 5, d.shape[-2:])
    assert float(d.masked_fill(reach, 0).max()) == 0.0
    assert float(d.masked_fill(~reach, 0).max()) > 0.0


# -- Condition 3.2 margins and candidate selection --------------------------------------------

@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), K=st.integers(2, 4), H=st.integers(2, 6), W=st.integers(2, 6),
       wh=st.integers(1, 3), ww=st.integers(1, 3))
def test_class_margins_bruteforce_and_agree_with_voting_certify(seed, K, H, W, wh, ww):
    g = torch.Generator().manual_seed(seed)
    N = 3
    scores = torch.randn(N, K, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (N,), generator=g)
    e = (scores >= 0).double()
    wh, ww = min(wh, H), min(ww, W)
    m = class_margins(e, labels, (wh, ww))
    assert m.shape == (N, K, H - wh + 1, W - ww + 1)
    n = e.sum((2, 3))
    for b, c, r, q in itertools.product(range(N), range(K), range(H - wh + 1), range(W - ww + 1)):
        y = int(labels[b])
        if c == y:
            assert m[b, c, r, q] == float("inf")
            continue
        inside = e[b, :, r:r + wh, q:q + ww].sum((1, 2))
        ref = (n[b, y] - inside[y]) - (n[b, c] - inside[c]) - wh * ww
        assert float(m[b, c, r, q]) == float(ref)
    # Condition 3.2 certificate == "every placement and class has margin > 0 (or 0 with y < c)"
    d = create_defense("voting", binarize="sign", condition="3.2")
    cls = torch.arange(K)[None, :, None, None]
    ok_mc = ((m > 0) | ((m == 0) & (labels[:, None, None, None] < cls))).flatten(1).all(1)
    ok = ok_mc & (d.predict(scores) == labels)
    assert torch.equal(ok, d.certify(scores, labels, [(wh, ww)]))


def test_select_candidates_is_argmin_then_diverse():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 4, 10, 10, generator=g)
    labels = torch.randint(0, 4, (5,), generator=g)
    d = create_defense("voting")
    wins = [(3, 3), (2, 4)]
    cand = select_candidates(d, scores, labels, wins, locations=3, targets=2)
    assert cand.count == 6
    chunked = select_candidates(d, scores, labels, wins, locations=3, targets=2, budget=1)  # one example at a time
    for f in ("shape", "row", "col", "target", "margin", "window"):
        assert torch.equal(getattr(cand, f), getattr(chunked, f)), f
    e = d.votes(scores)
    for b in range(5):
        best = min(float(class_margins(e, labels, w)[b].min()) for w in wins)
        assert float(cand.margin[b, 0]) == best  # BagCert's l*, c*
        s0, r0, c0, t0 = (int(v[b, 0]) for v in (cand.shape, cand.row, cand.col, cand.target))
        assert float(class_margins(e, labels, wins[s0])[b, t0, r0, c0]) == best
        assert t0 != int(labels[b]) and int(cand.target[b, 1]) != int(labels[b])
        # the location-major layout: columns 0,1 share a placement, different targets
        assert (int(cand.row[b, 1]), int(cand.col[b, 1])) == (r0, c0) and int(cand.target[b, 1]) != t0
        # margins are non-decreasing over locations; locations differ
        assert float(cand.margin[b, 2]) >= best
        assert (int(cand.shape[b, 2]), int(cand.row[b, 2]), int(cand.col[b, 2])) != (s0, r0, c0)


# -- the attack ----------------------------------------------------------------------------------

def test_attack_finds_an_easy_flip_and_changes_only_patch_pixels():
    torch.manual_seed(0)
    model = LinearVotes().eval()
    x, y = easy_flip_batch()
    d = create_defense("voting")
    res = patch_attack(model, d, x, y, "3x3", keep_images=True)
    assert bool(res.attacked.all())
    assert float(res.success.float().mean()) > 0
    adv = res.adv_images
    assert adv is not None and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        pred = d.predict(model.score_map(adv))
    assert torch.equal(pred, res.adv_pred)
    assert torch.equal(pred != y, res.success)
    for i in range(len(res)):
        py, px = (int(v) for v in res.pixel[i])
        ph, pw = (int(v) for v in res.shape[i])
        assert (ph, pw) == (3, 3) and 0 <= py <= 5 and 0 <= px <= 5
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[py:py + ph, px:px + pw] = True
        changed = (adv[i] != x[i]).any(0)
        assert not bool((changed & ~inside).any())
        if bool(res.success[i]):
            assert bool(changed.any())
            assert int(res.target[i]) == 1 and float(res.predicted_margin[i]) < 0
    assert float(res.outside_change.max()) == 0.0
    rec = res.example(0)
    assert rec["patch"] == [3, 3] and rec["success"] is True


def test_attack_respects_certificates_on_the_easy_setup():
    model = LinearVotes().eval()
    x, y = easy_flip_batch()
    d = create_defense("voting")
    chk = attack_and_check(model, d, x, y, "2x2", PatchAttackConfig.strong(steps=40))
    assert bool(chk.certified.all()) and not bool(chk.result.success.any()) and chk.failures == 0
    chk = attack_and_check(model, d, x, y, "3x3")
    assert not bool(chk.certified.any()) and chk.failures == 0 and bool(chk.result.success.all())


def test_misclassified_examples_are_not_attacked():
    model = LinearVotes().eval()
    x, y = easy_flip_batch(4)
    y[:2] = 1
    res = patch_attack(model, create_defense("voting"), x, y, "3x3", PatchAttackConfig(steps=5))
    assert res.attacked.tolist() == [False, False, True, True]
    assert res.success[:2].all() and int(res.steps[:2].sum()) == 0
    assert res.example(0)["patch"] is None


def test_attack_is_seeded_and_independent_of_batching():
    model = TinyConv(k=3, seed=1, num_classes=3).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, 10, 10, generator=g)
    with torch.no_grad():
        y = create_defense("voting").predict(model.score_map(x))
    d = create_defense("voting")
    cfg = PatchAttackConfig(steps=15, restarts=2, locations=2)
    full = patch_attack(model, d, x, y, "3x3", cfg, keep_images=True)
    again = patch_attack(model, d, x, y, "3x3", cfg, keep_images=True)
    halves = [patch_attack(model, d, x[s], y[s], "3x3", cfg, indices=torch.arange(8)[s], keep_images=True)
              for s in (slice(0, 3), slice(3, 8))]
    assert torch.equal(full.adv_images, again.adv_images)
    for name in ("success", "adv_pred", "pixel", "target", "steps"):
        assert torch.equal(getattr(full, name), torch.cat([getattr(h, name) for h in halves])), name
    assert torch.allclose(full.adv_images, torch.cat([h.adv_images for h in halves]))


def test_strong_setting_finds_at_least_what_the_default_finds():
    d = create_defense("voting")
    found_more = 0
    for seed in range(2):
        model = TinyConv(k=3, seed=seed, num_classes=4).eval()
        x = torch.rand(12, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = d.predict(model.score_map(x))
        base = patch_attack(model, d, x, y, "2x2", PatchAttackConfig(steps=20))
        strong = patch_attack(model, d, x, y, "2x2", PatchAttackConfig.strong(steps=20, locations=3))
        # the strong run's first attempt is the default attempt (same location, target, seed, surrogate)
        assert bool((strong.success | ~base.success).all())
        found_more += int(strong.success.sum() - base.success.sum())
    assert found_more >= 0


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(restarts=0), dict(step_size=0.0), dict(init="zeros"),
                                 dict(surrogates=("nope",)), dict(locations=1.5)])
def test_bad_config_is_a_one_line_error(bad):
    with pytest.raises(PatchcertError) as e:
        PatchAttackConfig(**bad)
    assert "\n" not in str(e.value)


def test_bad_patch_is_a_one_line_error():
    model = LinearVotes().eval()
    x, y = easy_flip_batch(2)
    with pytest.raises(PatchcertError, match="larger than the image"):
        patch_attack(model, create_defense("voting"), x, y, "9x9")


# -- soundness from the attack side ---------------------------------------------------------------

def _defenses_under_test():
    """Every registered aggregation, with parameters that certify something on tiny models."""
    specs = [
        ("voting", dict(binarize="sign", condition="3.2")),
        ("voting", dict(binarize="argmax", condition="3.2")),
        ("voting", dict(binarize="sign", condition="3.3")),
        ("voting", dict(binarize=0.4)),
        ("clipping", dict(clip=(-1.0, 1.0))),
        ("clipping", dict(clip="tanh", scale=1.0, shift=0.0)),
        ("masking", dict(window=(5, 5), threshold=0.0)),
        ("masking", dict(window=(5, 5), threshold=0.3)),
        ("masking", dict(window=(5, 5), features="prediction")),
    ]
    out = []
    for name, kw in specs:
        if name in list_defenses():
            out.append(create_defense(name, **kw))
    return out


@pytest.mark.parametrize("defense", _defenses_under_test(),
                         ids=lambda d: str(getattr(d, "key", None) or getattr(d, "name", type(d).__name__)))
def test_attack_never_breaks_a_certified_example(defense):
    """Many random tiny models: no certified example may ever be flipped by the attack."""
    certified = attacked_ok = broken = 0
    for seed in range(3):
        model = TinyConv(k=3, seed=seed, num_classes=3, bias_scale=0.5).eval()
        x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            s = model.score_map(x)
        y = defense.predict(s)  # every example correct: all of them are attacked
        for patch in ("1x1", "2x2", "3x3"):
            chk = attack_and_check(model, defense, x, y, patch,
                                   PatchAttackConfig(steps=20, step_size=0.1, locations=2, restarts=2),
                                   clean_scores=s)
            assert chk.failures == 0, f"{defense} {patch} seed {seed}: certified example flipped"
            certified += int(chk.certified.sum())
            broken += int(chk.result.success.sum())
            attacked_ok += int((~chk.certified).sum())
    assert certified > 0, "the setup certifies nothing; the test would be vacuous"
    assert broken > 0, "the attack never succeeds here; the test would be vacuous"
