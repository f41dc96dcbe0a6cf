"""Soundness over the whole registry (timm-style: iterate ``list_defenses()``), both families.

Every registered defense runs with each of its own ``example_configs()``:
* the package's defenses against their plain-loop references, exactly: score-map defenses on
  random small maps (``reference_defenses.py``), pixel defenses on tiny images with tiny exact
  models (``reference_pixels.py``: every masked image built by hand);
* every defense -- including ones registered by other test modules, such as the one-class
  defenses of ``test_custom_defense.py`` and ``test_custom_pixel_defense.py`` -- against brute
  force: score maps with crafted and random contents at every placement of the window; images
  with every binary patch content at every placement. A certified example must never be flipped.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

import itertools

import reference_defenses as ref
from patchcert.defenses import Threat, create_defense, list_defenses
from patchcert.defenses.base import _DEFENSES
from patchcert.errors import PatchcertError
from patchcert.geometry import Geometry
from patchcert.planning import plan_patches
from reference_pixels import ExactNet, literal_certificate, literal_predict
from test_defenses_properties import attack_all_placements, crafted_patterns
from test_defenses_reference import compare, random_maps, random_windows


def _voting(s, y, windows, c):
    return (ref.voting_predict(s, c["binarize"]),
            ref.voting_details(s, y, windows, c["binarize"], c["condition"], c["wrap"]))


def _clipping(s, y, windows, c):
    clip = c["clip"] if isinstance(c["clip"], str) else tuple(c["clip"])
    kw = {"scale": c["scale"], "shift": c["shift"]} if clip == "tanh" else {}
    return (ref.clipping_predict(s, clip, **kw), ref.clipping_details(s, y, windows, clip, c["wrap"], **kw))


def _masking(s, y, windows, c):
    w = tuple(c["window"])
    return (ref.masking_predict(s, w, c["threshold"], c["clip_max"], c["features"], c["wrap"]),
            ref.masking_details(s, y, windows, w, c["threshold"], c["clip_max"], c["features"], c["wrap"]))


REFERENCES = {"voting": _voting, "clipping": _clipping, "masking": _masking}
#: pixel defenses: the literal reference of their prediction and certificate (reference_pixels.py)
PIXEL_REFERENCES = {"double-masking"}


def _family(n: str) -> str:
    return _DEFENSES[n].evidence_source


def _ours(family: str | None = None) -> list[str]:
    return [n for n in list_defenses() if _DEFENSES[n].__module__.startswith("patchcert.")
            and (family is None or _family(n) == family)]


def _all(family: str) -> list[str]:
    return [n for n in list_defenses() if _family(n) == family]


def _cases(names):
    return [(n, cfg) for n in names for cfg in _DEFENSES[n].example_configs()]


def _id(case) -> str:
    return create_defense(case[0], **case[1]).key


def test_every_package_defense_has_examples_and_a_reference():
    for n in _ours():
        assert _DEFENSES[n].example_configs(), n
        refs = REFERENCES if _family(n) == "scores" else PIXEL_REFERENCES
        assert n in refs, f"defense {n!r} needs a plain-loop reference (reference_defenses.py / reference_pixels.py)"
    assert "double-masking" in _ours("images")


def test_register_defense_refuses_a_duplicate_name():
    with pytest.raises(PatchcertError, match="already registered"):
        @__import__("patchcert").register_defense("voting")
        class Again(_DEFENSES["voting"]):
            pass
    assert _DEFENSES["voting"].__name__ == "Voting"


@pytest.mark.parametrize("case", _cases(_ours("scores")), ids=_id)
def test_matches_the_reference(case):
    name, cfg = case
    d = create_defense(name, **cfg)
    rng = random.Random(zlib.crc32(d.key.encode()) % 1000)  # not hash(): it changes with every process
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    tally = [0, 0]
    for it in range(30):
        s, y = random_maps(rng, gen, ("ternary", "int", "float64")[it % 3], n_max=6)
        if name == "clipping" and d.config.get("clip") == "tanh":
            s = s * 10
        windows = random_windows(rng, s.shape[2], s.shape[3])
        rp, rd = REFERENCES[name](s, y, windows, d.config)
        tanh = name == "clipping" and d.config.get("clip") == "tanh"
        # one 2^-32 grid step per clipped cell of a window, for two classes
        tol = 2.0 ** -32 * 2 * max(a * b for a, b in windows) if tanh else 0.0
        compare(d, name, cfg, s, y, windows, rp, rd, tally, margin_tol=tol)


@pytest.mark.parametrize("case", _cases(_all("scores")), ids=_id)
def test_attack_on_tiny_maps_never_flips_a_certificate(case):
    name, cfg = case
    d = create_defense(name, **cfg)
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for trial in range(24):
        K = 2 + trial % 2
        H, W = 1 + trial % 3, 2 + (trial // 3) % 2
        s = torch.randint(-2, 3, (4, K, H, W), generator=gen).double()
        y = torch.randint(0, K, (4,), generator=gen)
        s[torch.arange(4), y] += torch.randint(0, 4, (4, 1, 1), generator=gen).double()
        s = s * (20.0 if trial % 2 else 1.0)  # large steps too (tanh clipping barely moves on small ones)
        for window in {(1, 1), (1, 2), (H, 1), (H, W)}:
            if window[0] > H or window[1] > W:
                continue
            cert = d.certify(s, y, [window])
            for i in torch.nonzero(cert).flatten().tolist():
                maps = attack_all_placements(s[i], window, d.wrap, crafted_patterns(K, int(y[i]), *window, gen))
                assert bool((d.predict(maps) == y[i]).all()), (d.key, window, s[i].tolist(), int(y[i]))
                checked += 1
    assert checked > 0, f"{d.key}: nothing certified on the tiny maps; the test would be vacuous"


# -- the pixel family -------------------------------------------------------------------------

SIZE, PATCH = 6, (2, 2)


def _pixel_defense(name, cfg):
    return _DEFENSES[name].for_threat(dict(cfg), Threat((SIZE, SIZE), shapes=(PATCH,), mask_shapes=(PATCH,)))


def _tiny_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 1, SIZE, SIZE), generator=g).double() / 2  # values 0, .5, 1


def _threat():
    return plan_patches([f"{PATCH[0]}x{PATCH[1]}"], Geometry((None, None)), (SIZE, SIZE))[0]


@pytest.mark.parametrize("case", _cases(_ours("images")), ids=_id)
def test_pixel_defense_matches_the_literal_reference(case):
    name, cfg = case
    d = _pixel_defense(name, cfg)
    x = _tiny_images(16, 5)
    model = ExactNet(17).calibrate(x)
    labels = torch.arange(16) % 3
    ev = d.compute_evidence(model, x, None, labels)
    pred = d.predict_evidence(ev)
    cert = d.certify_threat(ev, labels, _threat()).certified
    covered = not d.uncovered([PATCH])
    for n in range(len(x)):
        assert int(pred[n]) == literal_predict(model, x[n], d.masks, d.fill)
        ok, _ = literal_certificate(model, x[n], d.masks, d.fill, int(labels[n]))
        assert bool(cert[n]) == (ok and covered)


def _all_patched(x: torch.Tensor) -> torch.Tensor:
    """Every binary 2x2 patch content at every placement: ``[25 * 16, C, H, W]``."""
    out = []
    for top in range(SIZE - PATCH[0] + 1):
        for left in range(SIZE - PATCH[1] + 1):
            for c in itertools.product([0.0, 1.0], repeat=PATCH[0] * PATCH[1]):
                xp = x.clone()
                xp[:, top:top + PATCH[0], left:left + PATCH[1]] = torch.tensor(c, dtype=x.dtype).view(PATCH)
                out.append(xp)
    return torch.stack(out)


@pytest.mark.parametrize("case", _cases(_all("images")), ids=_id)
def test_brute_force_patches_never_flip_a_pixel_certificate(case):
    """Tiny exact models, 6x6 images: every binary 2x2 patch at every placement (400 patched
    images per certified image) must leave the defended prediction at the label."""
    name, cfg = case
    d = _pixel_defense(name, cfg)
    checked = 0
    for seed in range(3):
        x = _tiny_images(24, 100 + seed)
        model = ExactNet(200 + seed).calibrate(x)
        labels = d.predict_images(model, x)
        cert = d.certify_threat(d.compute_evidence(model, x, None, labels), labels, _threat()).certified
        for n in torch.nonzero(cert).flatten().tolist()[:3]:
            assert bool((d.predict_images(model, _all_patched(x[n])) == labels[n]).all()), (d.key, seed, n)
            checked += 1
    assert checked > 0, f"{d.key}: nothing certified on the tiny images; the test would be vacuous"
