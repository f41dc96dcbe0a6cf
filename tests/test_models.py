"""Models: registry, BagNet structure, backbones, DS ablation, and the declared geometry of
every registered model checked by perturbation (exact, float64, eval mode)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchcert
from patchcert import PatchcertError, create_model, feature_window, list_models
from patchcert.checkpoint import save_checkpoint
from patchcert.models import load_model
from patchcert.models.convert import skeleton_model
from patchcert.models.ds import ablate, band_positions, keep_masks, random_ablate

# ---------------------------------------------------------------------------------------------
# helpers


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (eval-mode BN is then a real map)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model


def prep(model: torch.nn.Module) -> torch.nn.Module:
    return randomize_bn(model).to(torch.float64).eval()


def axis_pixels(geom, axis: int, index: int, size: int) -> torch.Tensor:
    """Pixels (along one axis) seen by cell ``index``: Geometry.cell_extent, or the wrapped band."""
    if geom.rf[axis] is None:
        return torch.arange(size)
    if geom.wrap:
        lo = index * geom.stride[axis] - geom.offset[axis]
        return torch.arange(lo, lo + geom.rf[axis]) % size
    lo, hi = geom.cell_extent(axis, index, size)
    return torch.arange(lo, hi + 1)


def field_mask(geom, i: int, j: int, size: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    rows, cols = axis_pixels(geom, 0, i, size[0]), axis_pixels(geom, 1, j, size[1])
    m[rows[:, None], cols[None, :]] = True
    return m


def unclipped(geom, axis: int, index: int, size: int) -> bool:
    if geom.rf[axis] is None or geom.wrap:
        return True
    lo = index * geom.stride[axis] - geom.offset[axis]
    return lo >= 0 and lo + geom.rf[axis] - 1 <= size - 1


def pick_cells(h: int, w: int, g: torch.Generator, n_random: int = 4) -> list[tuple[int, int]]:
    if h * w <= 16:
        return [(i, j) for i in range(h) for j in range(w)]
    cells = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)}
    for _ in range(n_random):
        cells.add((int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))))
    return sorted(cells)


def same_slot_forward(model, xs: torch.Tensor, x: torch.Tensor, chunk: int = 128):
    """Score maps of ``xs`` and of ``x`` repeated in the same batch slots.

    Kernels may vectorise across the flattened batch, so one image's result can differ in the
    last bit between batch slots; comparing slot by slot makes "unchanged" mean bit-identical.
    """
    outs, refs = [], []
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for k in range(0, len(xs), chunk):
            part = xs[k:k + chunk]
            outs.append(model.score_map(part))
            if len(part) not in cache:
                cache[len(part)] = model.score_map(x.expand_as(part).contiguous())
            refs.append(cache[len(part)])
    return torch.cat(outs), torch.cat(refs)


def cyclic_span(idx: list[int], n: int) -> int:
    """Length of the shortest cyclic arc of ``range(n)`` holding every index."""
    s = sorted(set(idx))
    if len(s) <= 1:
        return len(s)
    gaps = [b - a for a, b in zip(s, s[1:])] + [s[0] + n - s[-1]]
    return n - max(gaps) + 1


# every registered model, small: (name, cfg, image size)
GEOMETRY_CASES = (
    [("bagcert_cifar", {"rf": rf, "width": 8}, (32, 32)) for rf in (5, 7, 9, 11, 13)]
    + [("bagcert_cifar", {"rf": 9, "width": 8, "shake": True}, (32, 32))]
    + [("bagcert_cifar_s2", {"rf": rf, "width": 8}, (32, 32)) for rf in (6, 10, 14)]
    + [("bagcert_imagenet", {"rf": rf, "width": 4}, (44, 52)) for rf in (17, 25, 29)]
    + [("bagnet9", {"width": 2}, (9 + 24, 9 + 35)),
       ("bagnet17", {"width": 2}, (17 + 24, 17 + 35)),
       ("bagnet33", {"width": 2}, (33 + 24, 33 + 35))]
    + [("resnet18_cifar", {"width": 2}, (16, 16)),
       ("resnet18", {"width": 2}, (32, 32)),
       ("resnet_small", {"width": 2}, (16, 16)),
       ("ds_column", {"b": 3, "base": "resnet_small", "base_cfg": {"width": 2}}, (10, 12)),
       ("ds_column", {"b": 4, "stride": 2, "base": "resnet_small", "base_cfg": {"width": 2}}, (8, 12)),
       ("ds_block", {"b": 3, "base": "resnet_small", "base_cfg": {"width": 2}}, (8, 9)),
       ("ds_block", {"b": 4, "stride": 2, "base": "resnet_small", "base_cfg": {"width": 2}}, (8, 10))]
    + [("fastnet_cifar", {"widths": [4, 4, 4], "stem": 4}, (16, 16))]
)


TRIALS = 5  # random fills per border line (a ReLU can hide one fill, hardly all of them)


def _case_id(c) -> str:
    return c[0] + "-" + "-".join(f"{k}{v}" for k, v in c[1].items() if k != "base_cfg")


def test_every_registered_model_has_a_geometry_case():
    # other test modules may register throw-away models; every model of the package needs a case
    from patchcert.models import model_entrypoint

    ours = {n for n in list_models() if model_entrypoint(n).__module__.startswith("patchcert.")}
    assert {c[0] for c in GEOMETRY_CASES} == ours


@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=_case_id)
def test_geometry_by_perturbation(case):
    """Outside a cell's declared field nothing changes it (bit-exact); its field is tight.

    References are computed in the same forward batch as the perturbed images, so batch-size
    dependent kernels cannot fake a difference.
    """
    name, cfg, size = case
    torch.manual_seed(0)
    check_geometry(prep(create_model(name, num_classes=3, **cfg)), size)


def check_geometry(model, size: tuple[int, int]) -> None:
    """AssertionError unless ``model.geometry`` is exact: see test_geometry_by_perturbation."""
    geom = model.geometry
    g = torch.Generator().manual_seed(1)
    C = model.mean.shape[1]

    def rand(n: int = 1, *shape: int) -> torch.Tensor:
        return torch.rand(n, C, *(shape or size), generator=g, dtype=torch.float64)

    x = rand()
    with torch.no_grad():
        h, w = model.score_map(x).shape[-2:]
    for a, n in ((0, h), (1, w)):
        if geom.rf[a] is None:
            assert n == 1  # a global axis has one cell
    cells = pick_cells(h, w, g)

    # 1) every pixel outside the field replaced at once: the cell is bit-identical
    outside = torch.cat([torch.where(field_mask(geom, i, j, size), x, rand()) for i, j in cells])
    s, ref = same_slot_forward(model, outside, x)
    for k, (i, j) in enumerate(cells):
        assert torch.equal(s[k, :, i, j], ref[k, :, i, j]), f"cell {(i, j)} changed by pixels outside its field"
        if h * w > 1:
            assert not torch.equal(s[k], ref[k]), "the perturbation changed no cell at all"

    # 2) tightness: each border line of an unclipped field changes the cell (for some of
    #    TRIALS random backgrounds; one background can hide a line behind dead ReLUs)
    base, pert, owners = [], [], []
    for i, j in cells:
        rows, cols = axis_pixels(geom, 0, i, size[0]), axis_pixels(geom, 1, j, size[1])
        lines = []
        if geom.rf[0] is not None and unclipped(geom, 0, i, size[0]):
            lines += [(rows[:1], cols), (rows[-1:], cols)]
        if geom.rf[1] is not None and unclipped(geom, 1, j, size[1]):
            lines += [(rows, cols[:1]), (rows, cols[-1:])]
        if geom.rf[0] is None and geom.rf[1] is None:  # global: a single corner pixel matters
            lines += [(rows[:1], cols[:1]), (rows[-1:], cols[-1:])]
        for r_idx, c_idx in lines:
            for _ in range(TRIALS):
                xb = rand()
                xp = xb.clone()
                xp[..., r_idx[:, None], c_idx[None, :]] = rand(1, len(r_idx), len(c_idx))
                base.append(xb)
                pert.append(xp)
                owners.append((i, j))
    assert owners, "no unclipped cell to test tightness on"
    with torch.no_grad():
        sb = torch.cat([model.score_map(torch.cat(base[k:k + 128])) for k in range(0, len(base), 128)])
        sp = torch.cat([model.score_map(torch.cat(pert[k:k + 128])) for k in range(0, len(pert), 128)])
    for line in range(len(owners) // TRIALS):
        i, j = owners[TRIALS * line]
        t = slice(TRIALS * line, TRIALS * (line + 1))
        assert (sb[t, :, i, j] != sp[t, :, i, j]).any(), \
            f"cell {(i, j)}: a pixel line on the border of its declared field never changes it"


@pytest.mark.parametrize("rf,stride,offset,what", [
    (15, 8, 0, "outside its field"), (19, 8, 1, "border"), (17, 8, 1, "outside its field"),
    (17, 7, 0, "outside its field")])
def test_perturbation_check_catches_a_wrong_geometry(rf, stride, offset, what):
    """The checker is not vacuous: an understated, overstated or shifted field fails it."""
    torch.manual_seed(0)
    model = prep(create_model("bagnet17", num_classes=3, width=2))
    model.geometry = patchcert.Geometry(rf=rf, stride=stride, offset=offset)
    with pytest.raises(AssertionError, match=what):
        check_geometry(model, (17 + 24, 17 + 35))


# (name, cfg, image size, patch sizes)
WINDOW_CASES = [
    ("bagcert_cifar", {"rf": 7, "width": 3}, (32, 32), [(5, 5)]),
    ("bagcert_imagenet", {"rf": 17, "width": 2}, (40, 40), [(6, 6)]),
    ("bagnet17", {"width": 2}, (33, 41), [(8, 8), (3, 12)]),
    ("bagnet9", {"width": 2}, (41, 41), [(5, 5)]),
    ("resnet_small", {"width": 2}, (12, 12), [(3, 3)]),
    ("ds_column", {"b": 3, "base": "resnet_small", "base_cfg": {"width": 2}}, (6, 12), [(2, 2), (4, 3)]),
    ("ds_column", {"b": 4, "stride": 2, "base": "resnet_small", "base_cfg": {"width": 2}}, (6, 12), [(3, 3)]),
    ("ds_block", {"b": 3, "base": "resnet_small", "base_cfg": {"width": 2}}, (7, 8), [(2, 2)]),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=_case_id)
def test_feature_window_matches_brute_force(case):
    """A patch at every position changes only cells inside one window of the declared size
    (cyclic for wrap=True), and some position needs the whole window (not overstated)."""
    name, cfg, size, patches = case
    torch.manual_seed(0)
    model = prep(create_model(name, num_classes=3, **cfg))
    geom = model.geometry
    g = torch.Generator().manual_seed(2)
    C = model.mean.shape[1]
    H, W = size
    x = torch.rand(1, C, H, W, generator=g, dtype=torch.float64)
    with torch.no_grad():
        h, w = model.score_map(x).shape[-2:]
    for ph, pw in patches:
        wh, ww = feature_window(model, (ph, pw))
        assert (wh, ww) == geom.window((ph, pw))
        pos = list(itertools.product(range(H - ph + 1), range(W - pw + 1)))
        xs = x.repeat(len(pos), 1, 1, 1)
        for k, (r, c) in enumerate(pos):
            xs[k, :, r:r + ph, c:c + pw] = torch.rand(C, ph, pw, generator=g, dtype=torch.float64)
        out, ref = same_slot_forward(model, xs, x, chunk=256)
        changed = (out != ref).any(dim=1)  # [P, h, w]
        spans_r, spans_c = [], []
        for k in range(len(pos)):
            idx = changed[k].nonzero()
            if len(idx) == 0:  # dead ReLUs can hide a patch entirely; nothing to check
                continue
            rows, cols = idx[:, 0].tolist(), idx[:, 1].tolist()
            if geom.wrap:
                sr, sc = cyclic_span(rows, h), cyclic_span(cols, w)
            else:
                sr, sc = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
            assert sr <= wh and sc <= ww, f"patch {ph}x{pw} at {pos[k]} touches {sr}x{sc} cells > window {wh}x{ww}"
            spans_r.append(sr)
            spans_c.append(sc)
        assert len(spans_r) >= 0.9 * len(pos), "most patch positions should change some cell"
        assert max(spans_r) == min(wh, h) and max(spans_c) == min(ww, w), "declared window is larger than needed"


# ---------------------------------------------------------------------------------------------
# BagNet


# Reference parameter names/shapes (ResNet-50 bottlenecks; conv2 of the first block of a stage is
# 3x3 only in the stages listed by the BagNet variant; fc 2048 -> 1000).
def _expected_bagnet_shapes(k3: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
    exp = {"conv1.weight": (64, 3, 1, 1), "conv2.weight": (64, 64, 3, 3), "bn1.weight": (64,),
           "bn1.running_var": (64,), "fc.weight": (1000, 2048), "fc.bias": (1000,)}
    cin = 64
    for s, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            k = 3 if (b == 0 and k3[s]) else 1
            exp[p + "conv1.weight"] = (planes, cin, 1, 1)
            exp[p + "conv2.weight"] = (planes, planes, k, k)
            exp[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            exp[p + "bn3.running_mean"] = (planes * 4,)
            if b == 0:
                exp[p + "downsample.0.weight"] = (planes * 4, cin, 1, 1)
                exp[p + "downsample.1.weight"] = (planes * 4,)
            cin = planes * 4
    return exp


@pytest.mark.parametrize("name,k3", [("bagnet9", (1, 1, 0, 0)), ("bagnet17", (1, 1, 1, 0)), ("bagnet33", (1, 1, 1, 1))])
def test_bagnet_parameter_names_match_reference(name, k3):
    m = skeleton_model(name, 1000)  # full width on the meta device: names and shapes only
    sd = m.state_dict()
    for k, shape in _expected_bagnet_shapes(k3).items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # 54 convs, 53 BN layers (5 tensors each), fc weight + bias
    assert len(sd) == 54 + 53 * 5 + 2
    assert not any(k.startswith("layer1.0.downsample.2") for k in sd)
    assert m.num_classes == 1000 and m.config == {"width": 64}


@pytest.mark.parametrize("name,rf,side", [("bagnet9", 9, 27), ("bagnet17", 17, 26), ("bagnet33", 33, 24)])
def test_bagnet_geometry_and_map_size(name, rf, side):
    m = create_model(name, num_classes=5, width=1).eval()
    assert m.geometry.rf == (rf, rf) and m.geometry.stride == (8, 8) and m.geometry.offset == (0, 0)
    assert m.map_size((224, 224)) == (side, side)  # BagNet-17 on 224 px: 26x26 (PatchGuard)
    assert m.map_size((rf, rf)) == (1, 1)
    assert m.map_size((rf + 8, rf + 17)) == (2, 3)
    assert feature_window(m, (32, 32)) == (-(-(32 + rf - 1) // 8),) * 2
    with pytest.raises(PatchcertError, match="at least"):
        m.score_map(torch.rand(1, 3, rf - 1, 64))


def test_bagnet_score_map_mean_is_the_ordinary_logits():
    torch.manual_seed(0)
    m = prep(create_model("bagnet17", num_classes=7, width=2))
    x = torch.rand(3, 3, 50, 43, dtype=torch.float64)
    with torch.no_grad():
        f = m.forward_features(m.normalize(x))
        ref = m.fc(f.mean(dim=(2, 3)))  # avg-pool + fc (the reference's avg_pool=True path)
        per_loc = torch.einsum("nchw,kc->nkhw", f, m.fc.weight) + m.fc.bias[:, None, None]
        s = m.score_map(x)
    assert s.shape == (3, 7, 5, 4)
    torch.testing.assert_close(s, per_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.logits(x), ref, rtol=1e-12, atol=1e-12)


def test_bagnet_trains_and_rejects_bad_width():
    m = create_model("bagnet9", num_classes=3, width=1)
    m.train()
    s = m.score_map(torch.rand(2, 3, 17, 17))
    s.mean().backward()
    assert m.conv1.weight.grad is not None and m.fc.weight.grad is not None
    with pytest.raises(PatchcertError, match="width"):
        create_model("bagnet9", num_classes=3, width=0)


# ---------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize("name,cfg,size", [("resnet18_cifar", {"width": 2}, 32), ("resnet18", {"width": 2}, 64),
                                           ("resnet_small", {"width": 2, "blocks": 2}, 32),
                                           ("resnet_small", {"width": 2, "stem": "imagenet"}, 64)])
def test_backbones_shapes_and_channels(name, cfg, size):
    for c in (3, 6):
        m = create_model(name, num_classes=4, in_chans=c, **cfg).eval()
        x = torch.rand(2, c, size, size)
        s = m.score_map(x)
        assert s.shape == (2, 4, 1, 1)
        torch.testing.assert_close(m.logits(x), s.flatten(1))
        assert m.geometry.rf == (None, None) and feature_window(m, (5, 5)) == (1, 1)
    with pytest.raises(PatchcertError, match="channels"):
        m.score_map(torch.rand(1, 3, size, size))


def test_backbone_normalisation_and_errors():
    m3 = create_model("resnet_small", num_classes=2)
    assert torch.allclose(m3.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    m6 = create_model("resnet_small", num_classes=2, in_chans=6)
    assert torch.equal(m6.mean.flatten(), torch.full((6,), 0.5)) and torch.equal(m6.std.flatten(), torch.full((6,), 0.5))
    mi = create_model("resnet18", num_classes=2, width=2)
    assert torch.allclose(mi.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(PatchcertError, match="norm"):
        create_model("resnet_small", num_classes=2, in_chans=6, norm="cifar10")
    with pytest.raises(PatchcertError, match="stem"):
        create_model("resnet_small", num_classes=2, stem="vit")
    with pytest.raises(PatchcertError, match="in_chans"):
        create_model("resnet_small", num_classes=2, in_chans=0)


# ---------------------------------------------------------------------------------------------
# De-randomized smoothing: ablation


def _ablate_reference(x: torch.Tensor, mode: str, b: int, pos) -> torch.Tensor:
    N, C, H, W = x.shape
    out = torch.zeros(N, 2 * C, H, W, dtype=x.dtype)
    for n in range(N):
        for r in range(H):
            for c in range(W):
                if mode == "column":
                    keep = (c - pos[n]) % W < b
                else:
                    keep = (r - pos[n][0]) % H < b and (c - pos[n][1]) % W < b
                if keep:
                    out[n, :C, r, c] = x[n, :, r, c]
                    out[n, C:, r, c] = 1 - x[n, :, r, c]
    return out


@settings(max_examples=40)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.data())
def test_ablate_matches_reference(H, W, C, data):
    mode = data.draw(st.sampled_from(["column", "block"]))
    b = data.draw(st.integers(1, W if mode == "column" else min(H, W)))
    N = data.draw(st.integers(1, 3))
    x = torch.rand(N, C, H, W, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    if mode == "column":
        pos = [data.draw(st.integers(0, W - 1)) for _ in range(N)]
    else:
        pos = [(data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))) for _ in range(N)]
    out = ablate(x, mode, b, torch.tensor(pos))
    assert out.shape == (N, 2 * C, H, W)
    assert torch.equal(out, _ablate_reference(x, mode, b, pos))
    # scalar position = the same position for every image
    one = ablate(x, mode, b, pos[0])
    assert torch.equal(one, _ablate_reference(x, mode, b, [pos[0]] * N))


def test_ablation_encoding_tells_kept_from_ablated():
    x = torch.tensor([0.0, 1.0, 0.25]).view(1, 1, 1, 3).repeat(1, 3, 2, 1)  # black, white, grey columns
    out = ablate(x, "column", 2, 2)  # keeps columns 2 and 0 (wrap)
    assert torch.equal(out[0, :3, 0], torch.tensor([[0.0, 0.0, 0.25]] * 3))
    assert torch.equal(out[0, 3:, 0], torch.tensor([[1.0, 0.0, 0.75]] * 3))
    # an ablated pixel (0, 0) is distinguishable from every kept value (x, 1 - x) since x + (1 - x) = 1
    kept_sum = out[0, :3] + out[0, 3:]
    assert torch.equal(kept_sum[..., 1], torch.zeros(3, 2)) and torch.equal(kept_sum[..., 0], torch.ones(3, 2))


def test_random_ablate_keeps_one_band_reproducibly():
    x = torch.rand(64, 3, 8, 10)
    for mode, b, area in (("column", 3, 8 * 3), ("block", 3, 9)):
        a = random_ablate(x, mode, b, torch.Generator().manual_seed(5))
        a2 = random_ablate(x, mode, b, torch.Generator().manual_seed(5))
        assert torch.equal(a, a2) and a.shape == (64, 6, 8, 10)
        kept = (a[:, :3] + a[:, 3:]).sum(1) > 0  # [N, H, W]
        assert torch.equal(kept.flatten(1).sum(1), torch.full((64,), area))
        # every image's kept set is exactly one wrapped band
        for n in range(64):
            starts = band_positions(mode, (8, 10))
            masks = keep_masks(mode, b, (8, 10), starts)
            assert any(torch.equal(kept[n], m) for m in masks)
    starts = {int((random_ablate(x, "column", 1, torch.Generator().manual_seed(s))[:, 3:].sum((1, 2)) > 0)
                  .float().argmax(-1)[0]) for s in range(40)}
    assert len(starts) > 5  # positions vary


def test_ablate_rejects_bad_arguments():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(PatchcertError, match="mode"):
        ablate(x, "row", 2, 0)
    with pytest.raises(PatchcertError, match="larger"):
        ablate(x, "column", 9, 0)
    with pytest.raises(PatchcertError, match="positive"):
        ablate(x, "block", 0, (0, 0))
    with pytest.raises(PatchcertError, match="positions"):
        ablate(x, "block", 2, torch.zeros(3, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# De-randomized smoothing: the model


def _tiny_ds(mode: str, **kw):
    name = "ds_column" if mode == "column" else "ds_block"
    return prep(create_model(name, num_classes=4, base="resnet_small", base_cfg={"width": 2}, **kw))


@pytest.mark.parametrize("mode,b,stride,size", [("column", 3, 1, (6, 8)), ("column", 2, 2, (6, 8)),
                                                ("block", 3, 1, (5, 6)), ("block", 2, 2, (4, 6))])
def test_ds_score_map_is_base_logits_per_band(mode, b, stride, size):
    torch.manual_seed(0)
    m = _tiny_ds(mode, b=b, stride=stride, chunk_size=7)
    x = torch.rand(3, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        s = m.score_map(x)
    H, W = size
    exp_shape = (3, 4, 1, W // stride) if mode == "column" else (3, 4, H // stride, W // stride)
    assert s.shape == exp_shape
    with torch.no_grad():
        for i in range(s.shape[2]):
            for j in range(s.shape[3]):
                pos = j * stride if mode == "column" else (i * stride, j * stride)
                ref = m.base.score_map(ablate(x, mode, b, pos)).flatten(1)
                torch.testing.assert_close(s[:, :, i, j], ref, rtol=1e-12, atol=1e-12)
        # the chunk size is only a memory bound
        m.chunk_size = 10_000
        torch.testing.assert_close(m.score_map(x), s, rtol=1e-12, atol=1e-12)


def test_ds_geometry_and_windows():
    col = create_model("ds_column", num_classes=10, b=4, base="resnet_small", base_cfg={"width": 2})
    blk = create_model("ds_block", num_classes=10, b=12, base="resnet_small", base_cfg={"width": 2})
    assert col.geometry.wrap and blk.geometry.wrap
    for p in (1, 5, 7):
        assert feature_window(col, (p, p)) == (1, p + 4 - 1)
        assert feature_window(blk, (p, p)) == (p + 12 - 1, p + 12 - 1)
    col2 = create_model("ds_column", num_classes=10, b=4, stride=2, base="resnet_small", base_cfg={"width": 2})
    assert feature_window(col2, (5, 5)) == (1, 4)  # ceil((5 + 4 - 1) / 2)
    assert col.base.in_chans == 6 and isinstance(col.base, patchcert.models.ScoreMapModel)
    assert col.num_classes == 10 and col.base.num_classes == 10


def test_ds_defaults_and_errors():
    m = create_model("ds_column", num_classes=10)
    assert m.config["b"] == 4 and m.config["base"] == "resnet18_cifar" and m.base.arch == "resnet18_cifar"
    # BagCert nets take in_chans, so they can serve as DS base classifiers (6-channel encoding)
    assert create_model("ds_column", num_classes=3, base="bagcert_cifar", base_cfg={"width": 4}).base.stem[0].in_channels == 6
    with pytest.raises(PatchcertError, match="backbone"):
        create_model("ds_column", num_classes=3, base="ds_block")
    with pytest.raises(PatchcertError, match="unknown model"):
        create_model("ds_block", num_classes=3, base="nope")
    with pytest.raises(PatchcertError, match="must not set"):
        create_model("ds_block", num_classes=3, base="resnet_small", base_cfg={"in_chans": 3})
    tiny = create_model("ds_column", num_classes=3, b=4, stride=3, base="resnet_small", base_cfg={"width": 2}).eval()
    with pytest.raises(PatchcertError, match="divide"):
        tiny.score_map(torch.rand(1, 3, 8, 8))
    with pytest.raises(PatchcertError, match="larger"):
        tiny.score_map(torch.rand(1, 3, 3, 3))


def test_ds_base_trains_on_random_ablations():
    m = create_model("ds_column", num_classes=3, b=2, base="resnet_small", base_cfg={"width": 2})
    m.base.train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    enc = random_ablate(x, "column", 2, torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(m.base.score_map(enc).flatten(1), y)
    loss.backward()
    assert all(p.grad is not None for p in m.base.parameters())


@pytest.mark.parametrize("name,cfg,size", [
    ("ds_column", {"b": 3, "base": "resnet_small", "base_cfg": {"width": 2, "blocks": 2}}, (8, 8)),
    ("bagnet33", {"width": 1}, (40, 40)),
    ("resnet_small", {"width": 2, "in_chans": 6}, (8, 8)),
    ("fastnet_cifar", {"widths": [4, 8, 8], "stem": 4}, (32, 32)),
])
def test_checkpoint_round_trip(tmp_path, name, cfg, size):
    torch.manual_seed(0)
    m = randomize_bn(create_model(name, num_classes=3, **cfg)).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, m)
    m2 = load_model(path)
    x = torch.rand(2, m.mean.shape[1], *size)
    with torch.no_grad():
        assert torch.equal(m2.score_map(x), m.score_map(x))
    assert m2.config == m.config and m2.geometry == m.geometry


class _BandColourBase(torch.nn.Module):
    """A transparent base classifier: logits = A @ (mean colour of the kept pixels)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # [K, C]

    def score_map(self, enc: torch.Tensor) -> torch.Tensor:
        C = enc.shape[1] // 2
        kept = (enc[:, :C] + enc[:, C:]).amax(dim=1, keepdim=True)  # 1 at kept pixels
        colour = enc[:, :C].sum(dim=(2, 3)) / kept.sum(dim=(2, 3))
        return (colour @ self.weight.T)[:, :, None, None]


def test_ds_map_with_voting_gives_the_ds_certificate():
    """Voting with θ and condition 3.3 on the DS map, windows from feature_window, is Levine &
    Feizi's certificate: n_y - n_c > 2 (p + b - 1) for every c != y (== allowed when y < c)."""
    from patchcert import create_defense

    g = torch.Generator().manual_seed(0)
    b, p, theta, N, K, W = 3, 2, 0.4, 60, 3, 24
    m = create_model("ds_column", num_classes=K, b=b, base="resnet_small", base_cfg={"width": 2}).eval()
    m.base = _BandColourBase(20 * torch.randn(K, 3, generator=g, dtype=torch.float64))
    # images whose colour drifts along the columns, so bands disagree
    t = torch.linspace(0, 1, W, dtype=torch.float64)
    a, c = torch.rand(N, 3, 1, 1, generator=g, dtype=torch.float64), torch.rand(N, 3, 1, 1, generator=g, dtype=torch.float64)
    x = (a + (c - a) * t ** (1 + 3 * torch.rand(N, 1, 1, 1, generator=g, dtype=torch.float64))).expand(N, 3, 5, W)
    with torch.no_grad():
        s = m.score_map(x.contiguous())  # [N, K, 1, W]
    votes = (s.softmax(dim=1) >= theta).sum(dim=(2, 3))  # [N, K] bands voting for each class
    labels = torch.where(torch.arange(N) % 3 == 0, torch.randint(K, (N,), generator=g), votes.argmax(1))
    delta = p + b - 1
    expect = []
    for n in range(N):
        y = int(labels[n])
        ok = all(votes[n, y] - votes[n, c] > 2 * delta or (votes[n, y] - votes[n, c] == 2 * delta and y < c)
                 for c in range(K) if c != y)
        expect.append(ok and int(votes[n].argmax()) == y)
    assert 5 <= sum(expect) <= N - 5, "the test needs both outcomes"
    window = feature_window(m, (p, p))
    assert window == (1, delta)
    got = create_defense("voting", binarize=theta, condition="3.3", wrap=True).certify(s, labels, [window])
    assert got.tolist() == expect
    strong = create_defense("voting", binarize=theta, condition="3.2", wrap=True).certify(s, labels, [window])
    assert bool((strong | ~got).all())  # 3.2 is never weaker than 3.3
