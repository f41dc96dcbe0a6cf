"""Soundness over the whole registry (timm-style: iterate ``list_defenses()``).

Every registered defense runs with each of its own ``example_configs()``:
* the package's defenses against their plain-loop references (``reference_defenses.py``),
  exactly, on random small maps;
* every defense -- including ones registered by other test modules, such as the one-class
  defense of ``test_custom_defense.py`` -- against an attack on tiny maps: crafted and random
  contents at every placement of the window; a certified map must never be flipped.
"""

from __future__ import annotations

import random

import pytest
import torch

import reference_defenses as ref
from patchcert.defenses import create_defense, list_defenses
from patchcert.defenses.base import _DEFENSES
from patchcert.errors import PatchcertError
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


def _ours() -> list[str]:
    return [n for n in list_defenses() if _DEFENSES[n].__module__.startswith("patchcert.")]


def _cases(names):
    return [(n, cfg) for n in names for cfg in _DEFENSES[n].example_configs()]


def _id(case) -> str:
    return create_defense(case[0], **case[1]).key


def test_every_package_defense_has_examples_and_a_reference():
    for n in _ours():
        assert _DEFENSES[n].example_configs(), n
        assert n in REFERENCES, f"defense {n!r} needs a plain-loop reference in reference_defenses.py"


def test_register_defense_refuses_a_duplicate_name():
    with pytest.raises(PatchcertError, match="already registered"):
        @__import__("patchcert").register_defense("voting")
        class Again(_DEFENSES["voting"]):
            pass
    assert _DEFENSES["voting"].__name__ == "Voting"


@pytest.mark.parametrize("case", _cases(_ours()), ids=_id)
def test_matches_the_reference(case):
    name, cfg = case
    d = create_defense(name, **cfg)
    rng = random.Random(hash(d.key) % 1000)
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    tally = [0, 0]
    for it in range(30):
        s, y = random_maps(rng, gen, ("ternary", "int", "float64")[it % 3], n_max=6)
        if name == "clipping" and d.config.get("clip") == "tanh":
            s = s * 10
        windows = random_windows(rng, s.shape[2], s.shape[3])
        rp, rd = REFERENCES[name](s, y, windows, d.config)
        compare(d, name, cfg, s, y, windows, rp, rd, tally)


@pytest.mark.parametrize("case", _cases(list_defenses()), ids=_id)
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
