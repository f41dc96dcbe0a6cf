"""Training objectives against brute-force references (loops over images, classes, placements)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import patchcert
from patchcert.errors import PatchcertError
from patchcert.train.objectives import (
    OBJECTIVES,
    BagCertObjective,
    CrossEntropyObjective,
    PatchGuardObjective,
    bagcert_loss,
    create_objective,
    cross_entropy_map,
    heaviside_ste,
    one_hot_penalty,
    patchguard_loss,
    register_objective,
    strongest_window_mask,
)

# -- straight-through Heaviside -------------------------------------------------------------------

_special = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-8, -1e-8, 0.5, -0.5, 30.0, -30.0, 100.0, -100.0, 1e30, -1e30]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_heaviside_forward_is_exact_on_special_values(dtype):
    u = torch.tensor(_special, dtype=torch.float64).to(dtype)
    out = heaviside_ste(u)
    assert out.dtype == dtype
    assert torch.equal(out, (u >= 0).to(dtype))  # exactly 0 or 1, -0.0 counts as >= 0


@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True)))
def test_heaviside_forward_is_exactly_the_step(a):
    for dtype in (torch.float32, torch.float64):
        u = torch.from_numpy(a).to(dtype)
        assert torch.equal(heaviside_ste(u), (u >= 0).to(dtype))


@given(arrays(np.float64, st.integers(1, 64), elements=st.floats(-40, 40)))
def test_heaviside_gradient_is_the_sigmoid_derivative(a):
    u = torch.from_numpy(a).requires_grad_(True)
    w = torch.linspace(-2, 3, len(a), dtype=torch.float64)
    (heaviside_ste(u) * w).sum().backward()
    s = torch.sigmoid(u.detach())
    torch.testing.assert_close(u.grad, w * s * (1 - s), rtol=1e-12, atol=1e-300)
    # and bit-identical to autograd through the sigmoid itself
    u2 = u.detach().clone().requires_grad_(True)
    (torch.sigmoid(u2) * w).sum().backward()
    assert torch.equal(u.grad, u2.grad)


# -- BagCert margin loss (Sec. 3.3) -----------------------------------------------------------------

def _bagcert_reference(scores: torch.Tensor, labels: torch.Tensor, margin: float, sigma: float) -> float:
    """Paper's loss per image with explicit loops, votes from the hard Heaviside, in float64."""
    n, k, h, w = scores.shape
    total = 0.0
    for i in range(n):
        votes = [[float(scores[i, c, a, b] >= 0) for a in range(h) for b in range(w)] for c in range(k)]
        y = int(labels[i])
        counts = [sum(v) for v in votes]
        deltas = [sum(votes[y][j] - votes[c][j] for j in range(h * w)) / (h * w) for c in range(k) if c != y]
        loss = -min(min(deltas), margin)
        S = [cnt / (h * w) for cnt in counts]
        cmax = max(range(k), key=lambda c: (S[c], -c))
        loh = max(S[c] for c in range(k) if c != cmax) - S[cmax]
        total += loss + sigma * loh
    return total / n


@settings(max_examples=60)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 5), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from([0.0, 1.0]))
def test_bagcert_loss_matches_paper_formula(seed, n, k, h, w, margin, sigma):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    scores[scores.abs() < 1e-3] = 0.0  # exercise the u == 0 -> vote 1 boundary
    labels = torch.randint(0, k, (n,), generator=g)
    got = float(bagcert_loss(scores, labels, margin=margin, sigma=sigma))
    assert got == pytest.approx(_bagcert_reference(scores, labels, margin, sigma), abs=1e-6)


def test_bagcert_loss_gradient_is_straight_through():
    """d loss / d u = -(1/N)(1/hw)(1[c=y] - 1[c=c*]) sigmoid'(u) for the arg-min class c* (if below M)."""
    g = torch.Generator().manual_seed(3)
    n, k, h, w = 5, 4, 3, 3
    u = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    margin = 0.5
    u1 = u.clone().requires_grad_(True)
    bagcert_loss(u1, labels, margin=margin).backward()
    expected = torch.zeros(n, k, h, w, dtype=torch.float64)
    sp = torch.sigmoid(u.float()).double()
    sp = sp * (1 - sp)
    for i in range(n):
        y = int(labels[i])
        S = (u[i] >= 0).double().mean((1, 2))
        deltas = {c: float(S[y] - S[c]) for c in range(k) if c != y}
        cstar = min(deltas, key=lambda c: (deltas[c], c))
        if deltas[cstar] < margin:
            expected[i, y] -= sp[i, y] / (n * h * w)
            expected[i, cstar] += sp[i, cstar] / (n * h * w)
    torch.testing.assert_close(u1.grad, expected, rtol=1e-5, atol=1e-9)


def test_bagcert_loss_saturates_at_margin_and_one_hot_penalty_range():
    # every vote for y and none for the others: delta = 1 > M -> loss = -M, no gradient
    u = torch.full((2, 3, 4, 4), -5.0)
    u[:, 1] = 5.0
    labels = torch.tensor([1, 1])
    u.requires_grad_(True)
    loss = bagcert_loss(u, labels, margin=0.5)
    loss.backward()
    assert float(loss.detach()) == -0.5
    assert torch.count_nonzero(u.grad) == 0
    S = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.9, 0.4]])
    torch.testing.assert_close(one_hot_penalty(S), torch.tensor([-1.0, 0.0, -0.5]))


def _bagcert_options_reference(scores, labels, margin, classes, dense_bce) -> float:
    """The issue-9 options with explicit loops in float64: per-class margin and the dense BCE."""
    n, k, h, w = scores.shape
    total = 0.0
    for i in range(n):
        y = int(labels[i])
        votes = [[float(scores[i, c, a, b] >= 0) for a in range(h) for b in range(w)] for c in range(k)]
        deltas = [(sum(votes[y]) - sum(votes[c])) / (h * w) for c in range(k) if c != y]
        if classes == "all":
            loss = -sum(min(d, margin) for d in deltas) / (k - 1)
        else:
            loss = -min(min(deltas), margin)
        bce = 0.0
        for c in range(k):
            for a in range(h):
                for b in range(w):
                    x = float(scores[i, c, a, b])
                    p = 1 / (1 + math.exp(-x))
                    bce += -math.log(p) if c == y else -math.log(1 - p)
        total += loss + dense_bce * bce / (k * h * w)
    return total / n


@settings(max_examples=40)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(2, 5), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([0.25, 0.5]), st.sampled_from(["runner_up", "all"]), st.sampled_from([0.0, 0.5]))
def test_bagcert_loss_options_match_reference(seed, n, k, h, w, margin, classes, dense_bce):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    scores[scores.abs() < 1e-3] = 0.0
    labels = torch.randint(0, k, (n,), generator=g)
    got = float(bagcert_loss(scores, labels, margin=margin, classes=classes, dense_bce=dense_bce))
    assert got == pytest.approx(_bagcert_options_reference(scores, labels, margin, classes, dense_bce), abs=1e-6)


def test_bagcert_per_class_margin_pushes_every_wrong_class():
    """classes="all": every wrong class below the margin gets a gradient, not only the runner-up."""
    u = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    u[0, 0] = 1.0   # y votes everywhere
    u[0, 1] = 1.0   # runner-up votes everywhere too
    u[0, 2, 0, 0] = 1.0  # class 2 votes once
    u[0, 3] = -1.0
    u[0, 3, 1, 1] = 1.0  # class 3 votes once elsewhere
    labels = torch.tensor([0])
    for classes, pushed in (("runner_up", {1}), ("all", {1, 2, 3})):
        v = u.clone().requires_grad_(True)
        bagcert_loss(v, labels, margin=1.0, classes=classes).backward()
        got = {c for c in range(1, 4) if torch.count_nonzero(v.grad[0, c]) > 0}
        assert got == pushed, classes
    with pytest.raises(PatchcertError, match="classes"):
        bagcert_loss(u, labels, classes="some")


def test_bagcert_dense_warm_up_falls_linearly_to_zero():
    model = patchcert.create_model("bagcert_cifar", num_classes=3, rf=5, width=2)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.tensor([0, 2])
    obj = create_objective("bagcert", model, (32, 32), dense_bce=2.0, dense_until=0.5)
    for frac, w in ((0.0, 2.0), (0.25, 1.0), (0.5, 0.0), (0.9, 0.0)):
        obj.set_progress(frac)
        assert float(obj.loss(u, labels)) == pytest.approx(float(bagcert_loss(u, labels, dense_bce=w)), abs=1e-6)
    const = create_objective("bagcert", model, (32, 32), dense_bce=2.0)
    const.set_progress(0.9)
    assert float(const.loss(u, labels)) == pytest.approx(float(bagcert_loss(u, labels, dense_bce=2.0)), abs=1e-6)
    assert obj.describe()["dense_until"] == 0.5
    for bad in (0, 1.5, "x"):
        with pytest.raises(PatchcertError, match="dense_until"):
            create_objective("bagcert", model, (32, 32), dense_bce=1.0, dense_until=bad)


def test_bagcert_bf16_scores_are_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 10, 8, 8, generator=g).to(torch.bfloat16)
    labels = torch.arange(4)
    a = bagcert_loss(u, labels)
    b = bagcert_loss(u.float(), labels)
    assert a.dtype == torch.float32 and torch.equal(a, b)


# -- PatchGuard provable adversarial training ---------------------------------------------------------

def _placements(H, W, wh, ww, wrap):
    if wrap:
        return [(i, j) for i in range(H) for j in range(W)]
    return [(i, j) for i in range(max(1, H - wh + 1)) for j in range(max(1, W - ww + 1))]


def _cells(i, j, wh, ww, H, W, wrap):
    if wrap:
        return {((i + a) % H, (j + b) % W) for a in range(wh) for b in range(ww)}
    return {(a, b) for a in range(i, min(H, i + wh)) for b in range(j, min(W, j + ww))}


def _patchguard_reference(scores, labels, windows, clip_max, zero, aggregate, wrap):
    n, k, H, W = scores.shape
    losses = []
    for i in range(n):
        y = int(labels[i])
        f = scores[i].clamp(min=0) if clip_max is None else scores[i].clamp(0, clip_max)
        best, best_cells = -math.inf, None
        for wh, ww in windows:
            wh2, ww2 = min(wh, H), min(ww, W)
            for (a, b) in _placements(H, W, wh2, ww2, wrap):
                cells = _cells(a, b, wh2, ww2, H, W, wrap)
                s = sum(float(f[y, r, c]) for r, c in cells)
                if s > best + 1e-12:
                    best, best_cells = s, cells
        f = f.clone()
        for r, c in best_cells:
            if zero == "true":
                f[y, r, c] = 0
            else:
                f[:, r, c] = 0
        g = f.sum((1, 2))
        if aggregate == "mean":
            g = g / (H * W)
        losses.append(float(torch.logsumexp(g, 0) - g[y]))
    return sum(losses) / n


@settings(max_examples=60)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(2, 4), st.integers(1, 6), st.integers(1, 6),
       st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=3),
       st.sampled_from([None, 1.5]), st.sampled_from(["true", "all"]), st.sampled_from(["mean", "sum"]),
       st.booleans())
def test_patchguard_loss_matches_brute_force(seed, n, k, H, W, windows, clip_max, zero, aggregate, wrap):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, H, W, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (n,), generator=g)
    got = float(patchguard_loss(scores, labels, windows, clip_max=clip_max, zero=zero, aggregate=aggregate, wrap=wrap))
    ref = _patchguard_reference(scores, labels, windows, clip_max, zero, aggregate, wrap)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_strongest_window_mask_brute_force_and_gradient_flow():
    g = torch.Generator().manual_seed(1)
    ev = torch.rand(3, 6, 7, generator=g)
    m = strongest_window_mask(ev, [(2, 3)])
    for i in range(3):
        sums = {(a, b): float(ev[i, a:a + 2, b:b + 3].sum()) for a in range(5) for b in range(5)}
        a, b = max(sums, key=sums.get)
        ref = torch.zeros(6, 7, dtype=torch.bool)
        ref[a:a + 2, b:b + 3] = True
        assert torch.equal(m[i], ref)
    # the zeroed window gets no gradient; everything else of the true class does
    scores = (torch.rand(1, 2, 6, 7, generator=g) + 0.1).requires_grad_(True)
    patchguard_loss(scores, torch.tensor([0]), [(2, 3)]).backward()
    mask = strongest_window_mask(scores.detach()[:, 0], [(2, 3)])[0]
    assert torch.count_nonzero(scores.grad[0, 0][mask]) == 0
    assert torch.all(scores.grad[0, 0][~mask] != 0)
    assert torch.all(scores.grad[0, 1] != 0)


def test_patchguard_window_comes_from_model_geometry_and_threat():
    model = patchcert.create_model("bagcert_cifar", num_classes=10, rf=7, width=4)
    obj = create_objective("patchguard", model, (32, 32), patch="5x5")
    assert obj.windows == [(11, 11)] == [patchcert.feature_window(model, (5, 5))]
    obj = create_objective("patchguard", model, (32, 32), patch="area=4")
    assert sorted(obj.windows) == sorted({model.geometry.window(s) for s in [(1, 4), (2, 2), (4, 1)]})
    obj = create_objective("patchguard", model, (32, 32), window=[6, 6], clip_max=2, zero="all")
    assert obj.windows == [(6, 6)] and obj.clip_max == 2.0
    with pytest.raises(PatchcertError, match="exactly one of patch"):
        create_objective("patchguard", model, (32, 32))
    with pytest.raises(PatchcertError, match="larger than the image"):
        create_objective("patchguard", model, (32, 32), patch="40x40")
    with pytest.raises(PatchcertError, match="zero must be"):
        create_objective("patchguard", model, (32, 32), patch="5x5", zero="some")


def test_objective_options_are_validated():
    model = patchcert.create_model("bagcert_cifar", num_classes=10, rf=5, width=4)
    assert isinstance(create_objective("bagcert", model, (32, 32)), BagCertObjective)
    with pytest.raises(PatchcertError, match="does not take option"):
        create_objective("bagcert", model, (32, 32), margn=0.5)
    with pytest.raises(PatchcertError, match="margin must be > 0"):
        create_objective("bagcert", model, (32, 32), margin=0)
    with pytest.raises(PatchcertError, match="classes must be"):
        create_objective("bagcert", model, (32, 32), classes="every")
    with pytest.raises(PatchcertError, match="dense_bce must be >= 0"):
        create_objective("bagcert", model, (32, 32), dense_bce=-1)
    with pytest.raises(PatchcertError, match="unknown objective"):
        create_objective("nope", model, (32, 32))
    assert isinstance(create_objective("patchguard", model, (32, 32), patch="5x5"), PatchGuardObjective)


def test_cross_entropy_map_is_ce_of_mean_logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, 3, 3, generator=g)
    y = torch.tensor([0, 1, 4, 2])
    ref = -sum(float(torch.log_softmax(s[i].mean((1, 2)), 0)[y[i]]) for i in range(4)) / 4
    assert float(cross_entropy_map(s, y)) == pytest.approx(ref, rel=1e-6)
    assert float(cross_entropy_map(s.mean((2, 3)), y)) == pytest.approx(ref, rel=1e-6)


# -- De-randomized smoothing --------------------------------------------------------------------------

def _ds():
    return pytest.importorskip("patchcert.models.ds", reason="De-randomized smoothing model not built yet")


def test_ds_objective_trains_the_base_on_one_random_ablation_per_image():
    ds = _ds()
    model = patchcert.create_model("ds_column", num_classes=4, b=3, base="resnet_small", base_cfg={"width": 4})
    obj = create_objective("ds", model, (32, 32))
    assert obj.trainable(model) is model.base and (obj.mode, obj.b) == ("column", 3)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    enc = obj.prepare(x, g1)
    assert torch.equal(enc, ds.random_ablate(x, "column", 3, g2))
    assert enc.shape == (5, 6, 32, 32)
    kept = (enc[:, :3] + enc[:, 3:]).sum((1, 2)) > 0  # [N, W]: exactly b kept columns (wrapping)
    assert torch.all(kept.sum(1) == 3)
    # each image keeps b consecutive columns (mod W)
    for i in range(5):
        cols = kept[i].nonzero().flatten().tolist()
        start = next(c for c in cols if (c - 1) % 32 not in cols)
        assert sorted(cols) == sorted((start + t) % 32 for t in range(3))
    model.base.eval()
    y = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        loss = obj.loss(model.base(enc), y)
        ref = torch.nn.functional.cross_entropy(model.base.logits(enc), y)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(PatchcertError, match="needs a De-randomized smoothing model"):
        create_objective("ds", patchcert.create_model("bagcert_cifar", num_classes=4, rf=5, width=4), (32, 32))


# -- each objective declares the defense it is evaluated with -----------------------------------

def test_builtin_objectives_declare_their_evaluation_defense():
    from patchcert.train import default_eval_defense

    assert default_eval_defense("bagcert") == {"name": "voting", "binarize": "sign", "condition": "3.2"}
    assert default_eval_defense("ce") == {"name": "voting", "binarize": "argmax", "condition": "3.2"}
    assert default_eval_defense("ds") == {"name": "voting", "binarize": 0.3, "condition": "3.2", "wrap": True}
    # PatchGuard: masking with one window covering every window of the threat, its clip_max
    assert default_eval_defense("patchguard", {"clip_max": 2.0}, [(3, 5), (4, 2)]) == {
        "name": "masking", "window": [4, 5], "threshold": 0.0, "clip_max": 2.0, "features": "logits"}
    with pytest.raises(PatchcertError, match="needs the evaluation patch window"):
        default_eval_defense("patchguard", {}, [])
    # what each class declares is what the name lookup gives (no switch on names elsewhere)
    for name, cls in OBJECTIVES.items():
        assert default_eval_defense(name, {}, [(3, 3)]) == cls.eval_defense({}, [(3, 3)])


def test_a_registered_objective_chooses_the_defense_training_evaluates_with(tmp_path):
    from patchcert.checkpoint import load_tensors
    from patchcert.train import TrainConfig, train

    if "ce_votes33" not in OBJECTIVES:
        @register_objective
        class CEVotes33(CrossEntropyObjective):
            name = "ce_votes33"

            @classmethod
            def eval_defense(cls, cfg, windows):
                return {"name": "voting", "binarize": "argmax", "condition": "3.3"}

    cfg = TrainConfig(model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, dataset="synthetic", epochs=1,
                      batch_size=16, eval_examples=8, max_train_examples=32, num_threads=1, objective="ce_votes33",
                      objective_cfg={}, out_dir=str(tmp_path / "run"))
    train(cfg)
    _, meta = load_tensors(tmp_path / "run" / "state.safetensors")
    assert meta["eval_defense"] == {"name": "voting", "binarize": "argmax", "condition": "3.3"}
