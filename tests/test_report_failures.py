"""The report's split of a double-masking run's failures (one mask / only a pair) and the masks
that fail most often, checked against records written by hand, and on a real certify run."""

from __future__ import annotations

import pytest
import torch

from patchcert.report import failure_sections, load_certify_run, make_report, mask_failures, plot_mask_failures
from patchcert.results import DefenseOutcome, MaskPairCase

KEY = "double-masking(k=2)"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny real certify run (double masking + a score-map defense), shared by the tests."""
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.models import create_model

    torch.manual_seed(0)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    out = tmp_path_factory.mktemp("failures") / "run"
    certify_dataset(m, synthetic_dataset(n=6, num_classes=3, size=32), defenses=["double-masking:k=2", "voting"],
                    patches=["5x5"], batch_size=6, out_dir=out, square_cap=0)
    return out


def _outcome(correct, certified, worst):
    return DefenseOutcome(pred=0 if correct else 1, correct=correct, certified={"5x5": certified},
                          worst={"5x5": worst}, largest_square=None)


# (correct, certified, worst): two certified, one misclassified, two one-mask failures (masks
# {1, 3} and {3}), one pair-only failure (pair (0, 2))
CASES = [
    (True, True, None),
    (True, True, None),
    (False, False, MaskPairCase((0, 0), 1, True, (0, 1, 2, 3))),
    (True, False, MaskPairCase((1, 1), 2, True, (1, 3))),
    (True, False, MaskPairCase((3, 3), 2, True, (3,))),
    (True, False, MaskPairCase((0, 2), 1, False, ())),
]


def _with_cases(run):
    for rec, case in zip(run.records, CASES):
        rec.defenses[KEY] = _outcome(*case)
    return run


def test_mask_failures_counts_each_kind(run_dir):
    run = _with_cases(load_certify_run(run_dir))
    f = mask_failures(run.records, KEY, "5x5")
    assert (f.n, f.certified, f.misclassified, f.one_mask, f.pair_only) == (6, 2, 1, 2, 1)
    assert f.uncertified_correct == 3
    assert dict(f.disagree) == {1: 1, 3: 2}  # the misclassified image's masks are not counted
    assert dict(f.first_pair) == {0: 1, 2: 1}
    assert mask_failures(run.records, KEY, "7x7").n == 0  # another patch: nothing
    # a score-map defense carries no mask pair: not tallied (one of its records made correct and uncertified)
    vote = run.records[0].defenses["voting(sign,3.2)"]
    vote.correct, vote.certified["5x5"] = True, False
    assert not isinstance(vote.worst.get("5x5"), MaskPairCase)
    assert mask_failures(run.records, "voting(sign,3.2)", "5x5") is None


def test_failure_section_and_map(run_dir, tmp_path):
    run = _with_cases(load_certify_run(run_dir))
    run.name = "toy"
    text = "\n".join(failure_sections([run]))
    assert f"## Where {KEY} fails: toy, 5x5" in text
    assert "| correct, uncertified: fails under one mask | 2 | 33.3% | 66.7% |" in text
    assert "| correct, uncertified: only under a pair | 1 | 16.7% | 33.3% |" in text
    assert "| misclassified (by the defense) | 1 | 16.7% | |" in text
    # mask 3 first (2 images), then mask 1; with their rectangles from the rebuilt mask set
    rows = [ln for ln in text.splitlines() if ln.startswith("| 3 |") or ln.startswith("| 1 |")]
    assert rows[0].startswith("| 3 |") and rows[0].endswith("| 2 | 100.0% |") and "rows " in rows[0]
    assert rows[1].startswith("| 1 |") and rows[1].endswith("| 1 | 50.0% |")
    (p,) = plot_mask_failures(run, tmp_path)
    assert p.name == "mask_failures_toy.png" and p.stat().st_size > 0


def test_heat_map_values_match_the_masks(run_dir, tmp_path, monkeypatch):
    """The map is the per-pixel share of one-mask failures whose disagreeing masks cover the pixel."""
    import patchcert.report.failures as fl

    run = _with_cases(load_certify_run(run_dir))
    seen = {}

    def grab(self, a, **kw):
        seen["heat"] = torch.as_tensor(a)
        return orig(self, a, **kw)

    from matplotlib.axes import Axes

    orig = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", grab)
    fl.plot_mask_failures(run, tmp_path)
    d = fl._tallies(run)[0][1]
    masks = d.masks.boolean().double()
    want = 100 * (masks[[1, 3]].amax(0) + masks[[3]].amax(0)) / 2
    assert torch.allclose(seen["heat"].double(), want)


def test_make_report_includes_the_failure_split(run_dir, tmp_path):
    res = make_report([run_dir], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert f"## Where {KEY} fails: run, 5x5" in text
    assert "## Where voting" not in text  # score-map defenses have no mask pairs
    assert res.rows
