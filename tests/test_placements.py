"""One placement count with one rule (certification.md, "Placements"): every window position
fully inside the map (one per start cell with wrap-around), one placement for a window equal to
the map, none for a window larger than the map -- and every caller follows it: a window with no
placement certifies nothing, in every registered defense and in a whole run."""

from __future__ import annotations

import itertools

import pytest
import torch

from patchcert.defenses import create_defense, list_defenses
from patchcert.defenses._common import Prepared
from patchcert.defenses.base import _DEFENSES
from patchcert.windows import fits, placements, window_sums


def brute_force_placements(size, window, wrap):
    """Per axis, the start cells whose window covers only map cells, each at most once (with
    wrap-around every start cell, if the window is no longer than the axis)."""
    out = []
    for n, w in zip(size, window):
        starts = [i for i in range(n) if w <= n and (wrap or i + w <= n)]
        out.append(len(starts))
    return tuple(out)


@pytest.mark.parametrize("wrap", [False, True])
def test_placements_match_the_brute_force_count(wrap):
    for H, W, wh, ww in itertools.product(range(1, 5), range(1, 5), range(1, 7), range(1, 7)):
        pl = placements((H, W), (wh, ww), wrap)
        assert pl == brute_force_placements((H, W), (wh, ww), wrap), (H, W, wh, ww)
        # the 2-D placements are the pairs of per-axis ones: none as soon as one axis has none
        cells = {(i, j) for i in range(H) for j in range(W)
                 if wh <= H and ww <= W and (wrap or (i + wh <= H and j + ww <= W))}
        assert pl[0] * pl[1] == len(cells)
        assert fits((H, W), (wh, ww)) == (wh <= H and ww <= W) == (len(cells) > 0)


def test_placements_edge_cases():
    assert placements((4, 4), (4, 4)) == (1, 1)  # a window equal to the map: one placement
    assert placements((4, 4), (4, 4), wrap=True) == (4, 4)  # ... one per start cell with wrap-around
    assert placements((4, 4), (5, 5)) == (0, 0)  # larger than the map: none
    assert placements((4, 4), (5, 5), wrap=True) == (0, 0)  # wrapping does not make it fit
    assert placements((4, 6), (5, 2)) == (0, 5)  # too tall only: no placement at all (0 x 5)
    assert placements((1, 16), (1, 7), wrap=True) == (1, 16)
    assert not fits((4, 6), (5, 2)) and fits((4, 6), (4, 6))


def test_prepared_maps_count_the_same_way():
    for wrap in (False, True):
        prep = Prepared.build(torch.zeros(1, 2, 3, 4), wrap)
        for window in [(1, 1), (3, 4), (2, 3), (4, 1), (1, 5), (6, 6)]:
            assert prep.placements(window) == placements((3, 4), window, wrap)
            assert prep.fits(window) == fits((3, 4), window)
            if prep.fits(window):
                assert tuple(prep.window_sums(window).shape[-2:]) == placements((3, 4), window, wrap)


def test_pooled_window_sums_clip_an_overhanging_window():
    """The attacks' and training objectives' sums (not a certificate) sum an overhanging axis
    whole: the window clipped to the map, whose placements the rule counts."""
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(window_sums(x, (5, 2)), window_sums(x, (3, 2)))
    assert tuple(window_sums(x, (5, 2)).shape[-2:]) == placements((3, 4), (3, 2))
    assert float(window_sums(x, (9, 9)).flatten()[0]) == float(x.sum())


def _registered_cases():
    """Every registered score-map defense (the pixel family has no feature windows: a patch larger
    than the image is refused when its mask set is built; tests/test_double_masking.py)."""
    return [(n, cfg) for n in list_defenses() if _DEFENSES[n].evidence_source == "scores"
            for cfg in _DEFENSES[n].example_configs()]


@pytest.mark.parametrize("case", _registered_cases(), ids=lambda c: create_defense(c[0], **c[1]).key)
def test_a_window_without_placements_certifies_nothing(case):
    d = create_defense(*case[:1], **case[1])
    gen = torch.Generator().manual_seed(3)
    for H, W in [(1, 1), (2, 3), (3, 3)]:
        # the label holds every cell by a wide margin: certified whenever a placement exists
        s = torch.randint(-1, 2, (3, 3, H, W), generator=gen).double()
        y = torch.tensor([0, 1, 2])
        s[torch.arange(3), y] = 50.0
        for window in [(H + 1, 1), (1, W + 1), (H + 2, W + 2)]:
            det = d.certify_details(s, y, [window])
            assert not bool(det.certified.any()), (d.key, (H, W), window)
            assert not bool(d.certify(s, y, [(1, 1), window]).any())  # one unfittable window fails the lot
            aw = d.analysis_window(window)
            assert tuple(d.margin_map(s, y, window).shape[1:]) == placements((H, W), aw, d.wrap)
        if fits((H, W), d.analysis_window((H, W))):
            assert tuple(d.margin_map(s, y, (H, W)).shape[1:]) == placements((H, W), d.analysis_window((H, W)), d.wrap)


def test_a_run_whose_patch_window_exceeds_the_map_certifies_nothing(caplog):
    from patchcert.certify import certify_dataset
    from test_certify import engineered_scores

    sf = engineered_scores(n=12, size=12)  # rf 3, stride 1: an 11x11 patch touches a 13x13 window
    run = certify_dataset(scores=sf, defenses=["voting", "clipping", "masking"], patches=["11x11", "2x2"],
                          square_cap=0)
    rows = {(r.defense, r.patch): r for r in run.summary.results}
    assert all(r.certified_accuracy == 0.0 for (_, p), r in rows.items() if p == "11x11")
    assert any(r.certified_accuracy > 0 for (_, p), r in rows.items() if p == "2x2")  # not vacuous
    assert "larger than the 12x12 score map" in caplog.text
