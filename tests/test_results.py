"""Records, summaries, score files and run directories (patchcert.results)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.errors import PatchcertError
from patchcert.results import (
    SummaryCounter,
    CONFIG_FILE,
    PROGRESS_FILE,
    RECORDS_FILE,
    SUMMARY_CSV,
    SUMMARY_FILE,
    DefenseOutcome,
    ExampleRecord,
    ResultRow,
    RunMetadata,
    Summary,
    WorstCase,
    append_records,
    load_run,
    load_scores,
    merge_shards,
    read_records,
    read_summary,
    records_to_jsonl,
    repair_records,
    run_status,
    save_scores,
    square_curves,
    summarize,
    write_json,
    write_summary,
)

PATCHES = ["5x5", "2%", "area=24"]

worst_st = st.one_of(st.none(), st.builds(
    WorstCase,
    margin=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64)),
    window=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    row=st.integers(0, 60), col=st.integers(0, 60), cls=st.integers(-1, 9)))


@st.composite
def records_st(draw, keys=("voting(sign,3.2)", "masking(logits,0)")):
    n = draw(st.integers(0, 6))
    out = []
    for i in range(n):
        label = draw(st.integers(0, 9))
        defs = {}
        for k in keys:
            pred = draw(st.integers(0, 9))
            cert = {p: draw(st.booleans()) and pred == label for p in PATCHES}
            shapes = {"area=24": {"1x24": cert["area=24"] or draw(st.booleans()), "24x1": cert["area=24"]}}
            defs[k] = DefenseOutcome(pred, pred == label, cert, {p: draw(worst_st) for p in PATCHES},
                                     draw(st.one_of(st.none(), st.integers(0, 32))), shapes)
        out.append(ExampleRecord(i * 3, label, draw(st.integers(0, 9)), defs))
    return out


def _meta(**kw) -> RunMetadata:
    base = dict(model="m", model_sha256="ab", checkpoint=None, data={"name": "synthetic"}, num_examples=0, seed=0,
                device="cpu", dtype="float64", versions={}, forward_seconds_per_image=0.001,
                geometry={"rf": [7, 7]}, image_size=[32, 32], command="patchcert certify", square_cap=8)
    base.update(kw)
    return RunMetadata(**base)


def _template(keys=("voting(sign,3.2)", "masking(logits,0)")) -> list[ResultRow]:
    return [ResultRow(k, {"name": k}, p, "5x5", [[11, 11]], 0.0, 0.0, 1e-4) for k in keys for p in PATCHES]


@settings(max_examples=30)
@given(records_st())
def test_record_json_round_trip(records):
    text = records_to_jsonl(records)
    lines = text.splitlines()
    assert len(lines) == len(records)
    for r, line in zip(records, lines):
        assert line == json.dumps(json.loads(line), separators=(",", ":"))  # compact, one line
        back = ExampleRecord.from_json(json.loads(line))
        assert back.to_line() == line
        assert back.index == r.index and back.label == r.label and back.clean_pred == r.clean_pred
        for k, o in r.defenses.items():
            b = back.defenses[k]
            assert b.certified == o.certified and b.pred == o.pred and b.largest_square == o.largest_square
            assert b.shapes == o.shapes
            for p in PATCHES:
                assert (b.worst[p] is None) == (o.worst[p] is None)
                if o.worst[p] is not None:
                    assert b.worst[p] == o.worst[p]


def test_record_schema_matches_contract():
    r = ExampleRecord(17, 3, 2, {"voting(sign,3.2)": DefenseOutcome(
        3, True, {"5x5": True}, {"5x5": WorstCase(12.0, (11, 11), 4, 0, 5)}, 7)})
    d = json.loads(r.to_line())
    assert d == {"index": 17, "label": 3, "clean_pred": 2, "defenses": {"voting(sign,3.2)": {
        "pred": 3, "correct": True, "certified": {"5x5": True},
        "worst": {"5x5": {"margin": 12.0, "window": [11, 11], "row": 4, "col": 0, "class": 5}},
        "largest_square": 7}}}


def test_non_finite_margin_is_null():
    w = WorstCase(-math.inf, (3, 3), 0, 0, 1)
    assert w.to_json()["margin"] is None
    line = ExampleRecord(0, 0, 0, {"d": DefenseOutcome(0, True, {"5x5": False}, {"5x5": w}, 0)}).to_line()
    assert "Infinity" not in line and "NaN" not in line


def test_append_and_repair(tmp_path):
    recs = [ExampleRecord(i, i % 2, 0, {"d": DefenseOutcome(0, i % 2 == 0, {"5x5": i % 4 == 0},
                                                             {"5x5": None}, i)}) for i in range(5)]
    p = tmp_path / RECORDS_FILE
    append_records(p, recs[:3])
    append_records(p, recs[3:])
    assert [r.index for r in read_records(p)] == list(range(5))
    full = p.read_bytes()
    # an interrupted write: the last line stops half-way
    cut = full.rfind(b"\n", 0, len(full) - 1) + 1 + 10
    p.write_bytes(full[:cut])
    with pytest.raises(PatchcertError, match="unfinished"):
        read_records(p)
    assert [r.index for r in read_records(p, allow_partial_tail=True)] == [0, 1, 2, 3]
    kept = repair_records(p)
    assert [r.index for r in kept] == [0, 1, 2, 3]
    assert p.read_bytes() == full[:full.rfind(b"\n", 0, len(full) - 1) + 1]
    # a torn multi-byte character in the tail is dropped too
    p.write_bytes(p.read_bytes() + "{\"index\": \"é".encode()[:-1])
    assert len(repair_records(p)) == 4
    # damage in the middle is an error, not silently dropped
    lines = p.read_bytes().split(b"\n")
    lines[1] = b"{not json"
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(PatchcertError, match="line 2"):
        read_records(p)
    assert repair_records(tmp_path / "absent.jsonl") == []


@settings(max_examples=25)
@given(records_st())
def test_summarize_counts(records):
    md = _meta(num_examples=len(records))
    s = summarize(records, _template(), md)
    n = len(records)
    assert s.n == n
    for row in s.results:
        correct = sum(r.defenses[row.defense].correct for r in records)
        cert = sum(r.defenses[row.defense].certified[row.patch] for r in records)
        assert row.num_correct == correct and row.num_certified == cert
        assert row.clean_accuracy == (correct / n if n else 0.0)
        assert row.certified_accuracy == (cert / n if n else 0.0)
        assert row.certified_accuracy <= row.clean_accuracy
        if row.patch == "area=24" and n:
            assert row.shapes == {"1x24": sum(r.defenses[row.defense].shapes["area=24"]["1x24"] for r in records) / n,
                                  "24x1": sum(r.defenses[row.defense].shapes["area=24"]["24x1"] for r in records) / n}
    assert s.undefended_accuracy == (sum(r.clean_pred == r.label for r in records) / n if n else 0.0)
    back = Summary.from_json(json.loads(json.dumps(s.to_json())))
    assert back.to_json() == s.to_json()
    assert s.short() == {"n": n, "results": [
        {"defense": r.defense, "patch": r.patch, "clean_accuracy": r.clean_accuracy,
         "certified_accuracy": r.certified_accuracy} for r in s.results]}


@settings(max_examples=25)
@given(records_st(), st.integers(0, 6), st.data())
def test_summary_counter_fed_in_pieces_equals_one_pass(records, cap, data):
    """The counter ``certify`` feeds batch by batch (records then dropped) gives the summary of
    all records at once, and square curves equal to a direct count of ``side >= s``."""
    md = _meta(num_examples=len(records))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(records)), max_size=4)))
    counter = SummaryCounter(_template())
    for a, b in zip([0, *cuts], [*cuts, len(records)]):
        counter.add(records[a:b])
    assert counter.summary(md, square_cap=cap).to_json() == summarize(records, _template(), md, square_cap=cap).to_json()
    n = len(records)
    for k, curve in counter.square_curves(cap).items():
        sides = [r.defenses[k].largest_square or 0 for r in records]
        searched = any(r.defenses[k].largest_square is not None for r in records)  # else: not searched, no curve
        assert curve == ([sum(x >= s for x in sides) / n for s in range(1, cap + 1)] if n and searched else [])
    if records:
        assert (counter.first_index, counter.last_index) == (records[0].index, records[-1].index)
    other = _template()[::-1]
    if len(other) > 1:
        with pytest.raises(ValueError, match="differ"):
            counter.summary(md, template=other)


def test_square_curves_from_largest_square():
    recs = [ExampleRecord(i, 0, 0, {"d": DefenseOutcome(0, True, {}, {}, side)}) for i, side in enumerate([0, 1, 3, 3, None])]
    assert square_curves(recs, ["d"], 4) == {"d": [3 / 5, 2 / 5, 2 / 5, 0.0]}
    assert square_curves(recs, ["d"], 0) == {"d": []}


def test_summarize_rejects_missing_results():
    recs = [ExampleRecord(0, 0, 0, {"voting(sign,3.2)": DefenseOutcome(0, True, {"5x5": True}, {}, 1)})]
    with pytest.raises(PatchcertError, match="no result"):
        summarize(recs, _template(), _meta())


def test_write_and_read_summary(tmp_path):
    recs = [ExampleRecord(0, 1, 1, {"d": DefenseOutcome(1, True, {"5x5": True}, {"5x5": None}, 5)}),
            ExampleRecord(1, 0, 1, {"d": DefenseOutcome(1, False, {"5x5": False}, {"5x5": None}, 0)})]
    s = summarize(recs, [ResultRow("d", {"name": "d"}, "5x5", "5x5", [[11, 11]], 0, 0, 2e-4)], _meta(num_examples=2))
    write_summary(tmp_path, s)
    assert read_summary(tmp_path).to_json() == s.to_json()
    csv_lines = (tmp_path / SUMMARY_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("defense,patch,resolved,clean_accuracy,certified_accuracy")
    assert csv_lines[1].startswith("d,5x5,5x5,0.5,0.5,2,1,1,0.0002,11x11")
    (tmp_path / SUMMARY_FILE).write_text("{broken")
    with pytest.raises(PatchcertError, match="corrupt JSON"):
        read_summary(tmp_path)


def test_score_file_round_trip_and_validation(tmp_path):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    idx = torch.tensor([10, 11, 12, 13, 14])
    meta = {"geometry": {"rf": [3, 3]}, "image_size": [6, 6], "classes": ["a", "b", "c"], "model": "m"}
    p = tmp_path / "scores.safetensors"
    save_scores(p, s, y, idx, meta)
    sf = load_scores(p)
    assert torch.equal(sf.scores, s) and torch.equal(sf.labels, y) and torch.equal(sf.indices, idx)
    assert sf.meta["classes"] == ["a", "b", "c"] and len(sf) == 5 and len(sf.sha256) == 64
    save_scores(p, s, y, idx, {**meta, "classes": ["a", "b"]})
    with pytest.raises(PatchcertError, match="3-class scores but the metadata lists 2"):
        load_scores(p)
    save_scores(p, s, torch.tensor([0, 1, 2, 3, 1]), idx, meta)
    with pytest.raises(PatchcertError, match="labels outside"):
        load_scores(p)
    save_scores(p, s, y, torch.tensor([1, 1, 2, 3, 4]), meta)
    with pytest.raises(PatchcertError, match="duplicate"):
        load_scores(p)
    save_scores(p, s, y, idx, {"image_size": [6, 6]})
    with pytest.raises(PatchcertError, match="geometry"):
        load_scores(p)
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PatchcertError, match="score file"):
        load_scores(p)
    with pytest.raises(PatchcertError, match="does not exist"):
        load_scores(tmp_path / "nope.safetensors")


def _fake_run(d, records, total, complete=True, shard=None, extra_cfg=None):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"total": total, "dtype": "float64", "shard": shard, **(extra_cfg or {})}
    write_json(d / CONFIG_FILE, cfg)
    append_records(d / RECORDS_FILE, records)
    write_json(d / PROGRESS_FILE, {"done": len(records), "total": len(records), "complete": complete})
    if complete:
        md = _meta(num_examples=len(records), shard=shard, forward_seconds_per_image=0.001 * (1 + len(records)))
        write_summary(d, summarize(records, [ResultRow("d", {"name": "d"}, "5x5", "5x5", [[11, 11]], 0, 0, 1e-3)], md))


def _recs(indices):
    return [ExampleRecord(i, i % 3, i % 3, {"d": DefenseOutcome(i % 3, True, {"5x5": i % 2 == 0}, {"5x5": None},
                                                                i % 5)}) for i in indices]


def test_load_run_refuses_incomplete(tmp_path):
    with pytest.raises(PatchcertError, match="does not exist"):
        load_run(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchcertError, match="not a patchcert certify run"):
        load_run(tmp_path / "empty")
    _fake_run(tmp_path / "half", _recs(range(3)), 6, complete=False)
    assert run_status(tmp_path / "half")["complete"] is False
    with pytest.raises(PatchcertError, match=r"incomplete \(3/3 examples\).*--resume"):
        load_run(tmp_path / "half")
    _fake_run(tmp_path / "full", _recs(range(4)), 4)
    s, recs = load_run(tmp_path / "full")
    assert s.n == 4 and [r.index for r in recs] == [0, 1, 2, 3]
    # a summary whose count disagrees with the records is refused
    append_records(tmp_path / "full" / RECORDS_FILE, _recs([9]))
    with pytest.raises(PatchcertError, match="holds 5"):
        load_run(tmp_path / "full")


def test_merge_shards(tmp_path):
    run = tmp_path / "run"
    _fake_run(run / "shard-0-of-2", _recs(range(0, 4)), 7, shard=[0, 2])
    _fake_run(run / "shard-1-of-2", _recs(range(4, 7)), 7, shard=[1, 2])
    with pytest.raises(PatchcertError, match="not merged"):
        load_run(run)
    summary, recs = merge_shards(run)
    assert [r.index for r in recs] == list(range(7))
    assert (run / RECORDS_FILE).read_text() == records_to_jsonl(_recs(range(7)))
    s2, r2 = load_run(run)
    assert s2.n == 7 and s2.metadata.merged_from == 2 and s2.metadata.shard is None
    assert s2.results[0].num_certified == sum(i % 2 == 0 for i in range(7))
    # timing: per-image average weighted by shard size
    assert s2.metadata.forward_seconds_per_image == pytest.approx((4 * 0.005 + 3 * 0.004) / 7)
    assert json.loads((run / CONFIG_FILE).read_text())["shard"] is None


def test_merge_shards_errors(tmp_path):
    with pytest.raises(PatchcertError, match="no shard directories"):
        merge_shards(tmp_path)
    run = tmp_path / "a"
    _fake_run(run / "shard-0-of-3", _recs(range(2)), 6, shard=[0, 3])
    _fake_run(run / "shard-2-of-3", _recs(range(4, 6)), 6, shard=[2, 3])
    with pytest.raises(PatchcertError, match="shard.s. 1 of 3 are missing"):
        merge_shards(run)
    _fake_run(run / "shard-1-of-3", _recs(range(2, 4)), 6, shard=[1, 3], complete=False)
    with pytest.raises(PatchcertError, match="incomplete"):
        merge_shards(run)
    with pytest.raises(PatchcertError, match="unfinished"):
        load_run(run)
    b = tmp_path / "b"
    _fake_run(b / "shard-0-of-2", _recs(range(2)), 4, shard=[0, 2])
    _fake_run(b / "shard-1-of-2", _recs(range(2, 4)), 4, shard=[1, 2], extra_cfg={"dtype": "float32"})
    with pytest.raises(PatchcertError, match="different options .dtype"):
        merge_shards(b)
    c = tmp_path / "c"
    _fake_run(c / "shard-0-of-2", _recs(range(3)), 4, shard=[0, 2])
    _fake_run(c / "shard-1-of-2", _recs(range(2, 4)), 4, shard=[1, 2])
    with pytest.raises(PatchcertError, match="overlap"):
        merge_shards(c)
    d = tmp_path / "d"
    _fake_run(d / "shard-0-of-2", _recs(range(2)), 5, shard=[0, 2])
    _fake_run(d / "shard-1-of-2", _recs(range(2, 4)), 5, shard=[1, 2])
    with pytest.raises(PatchcertError, match="hold 4 examples, the run selects 5"):
        merge_shards(d)
    e = tmp_path / "e"
    _fake_run(e / "shard-0-of-2", _recs(range(2)), 4, shard=[0, 2])
    _fake_run(e / "shard-0-of-3", _recs(range(2)), 4, shard=[0, 3])
    with pytest.raises(PatchcertError, match="different splits"):
        merge_shards(e)
