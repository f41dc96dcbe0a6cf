"""The certification loop (patchcert.certify): results equal the defenses called directly,
resume/shard/merge give byte-identical records, and bad input fails up front."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import patchcert
from patchcert.certify import (
    build_defenses,
    certify_dataset,
    parse_defense_spec,
    parse_shard,
    plan_patches,
    shard_batches,
)
from patchcert.data import synthetic_dataset, to_float
from patchcert.defenses import create_defense, list_defenses
from patchcert.errors import PatchcertError
from patchcert.geometry import Geometry, patch_windows
from patchcert.results import (
    PROGRESS_FILE,
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    TIMING_FIELDS,
    ScoreFile,
    load_run,
    load_scores,
    merge_shards,
    run_status,
    save_scores,
)

# every defense spec the tests exercise (those whose defense is not built yet are skipped)
ALL_SPECS = ["voting", "voting:condition=3.3", "voting:binarize=argmax", "voting:binarize=0.3",
             "clipping:clip=tanh", "clipping:clip=-1:1", "masking:threshold=0.0,features=logits",
             "masking:threshold=0.2,features=confidence,clip_max=0.5"]


def available(specs):
    have = set(list_defenses())
    return [s for s in specs if s.split(":")[0] in have]


def tiny_model(num_classes: int = 4, seed: int = 0):
    """bagcert_cifar width 4 whose head makes class 0 vote in most places: label-0 images are
    certified with margins that vary, the rest are not (a mix, so the comparisons mean something)."""
    torch.manual_seed(seed)
    m = patchcert.create_model("bagcert_cifar", num_classes=num_classes, width=4)
    with torch.no_grad():
        m.head.weight.mul_(0.003)
        m.head.bias.copy_(torch.tensor([0.3, -0.3, 0.2, -0.6, 0.0, 0.0][:num_classes]))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(n=22, num_classes=4, size=32, seed=1)


def engineered_scores(n=30, k=4, size=12, seed=0) -> ScoreFile:
    """Score maps with a per-image strength of the label's evidence, so that some images are
    certified, some only predicted correctly and some wrong; geometry rf 3, stride 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    s = torch.randn(n, k, size, size, generator=g, dtype=torch.float64)
    strength = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 1
    s[torch.arange(n), labels] += strength[:, None, None]
    s = s.float()
    geom = Geometry(rf=3, input_size=(size + 2, size + 2), offset=0)
    meta = {"geometry": geom.to_dict(), "image_size": [size + 2, size + 2], "classes": [f"c{i}" for i in range(k)],
            "model": "engineered", "model_sha256": "0" * 64, "data": {"name": "engineered"}}
    return ScoreFile(s, labels, torch.arange(100, 100 + n), meta, "memory", "1" * 64)


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# -- specs ---------------------------------------------------------------------------------

def test_parse_defense_spec():
    assert parse_defense_spec("voting") .params == {}
    s = parse_defense_spec("masking:threshold=0.0,features=logits,window=11x9,clip_max=none")
    assert s.name == "masking"
    assert s.params == {"threshold": 0.0, "features": "logits", "window": (11, 9), "clip_max": None}
    assert parse_defense_spec("clipping:clip=-1:1").params == {"clip": (-1.0, 1.0)}
    assert parse_defense_spec("clipping:clip=tanh").params == {"clip": "tanh"}
    assert parse_defense_spec("voting:binarize=0.2,wrap=true").params == {"binarize": 0.2, "wrap": True}
    assert parse_defense_spec("voting:condition=3.3").params == {"condition": 3.3}
    for bad in ["", "vot ing", "voting:", "voting:x", "voting:=3", "voting:a=1,a=2", "1voting", "voting:a="]:
        with pytest.raises(PatchcertError, match="defense spec"):
            parse_defense_spec(bad)


def test_build_defenses_validates():
    plans = build_defenses(["voting", "voting:condition=3.3"])
    assert [p.key for p in plans] == ["voting(sign,3.2)", "voting(sign,3.3)"]
    assert plans[0].config == {"name": "voting", "binarize": "sign", "condition": "3.2", "wrap": False}
    with pytest.raises(PatchcertError, match="unknown defense 'nosuch'"):
        build_defenses(["nosuch"])
    with pytest.raises(PatchcertError, match="voting:nosuch=1"):
        build_defenses(["voting:nosuch=1"])
    with pytest.raises(PatchcertError, match="condition"):
        build_defenses(["voting:condition=4"])
    with pytest.raises(PatchcertError, match="requested twice"):
        build_defenses(["voting", "voting:condition=3.2"])
    with pytest.raises(PatchcertError, match="no defense"):
        build_defenses([])


def test_wrapping_maps_get_wrapping_defenses():
    plans = build_defenses(available(["voting", "clipping:clip=tanh", "masking:threshold=0.1"]),
                           default_window=(3, 3), wrap=True)
    assert all(p.defense.wrap and p.key.endswith(",wrap)") for p in plans)
    with pytest.raises(PatchcertError, match="wrap=false would miss placements"):
        build_defenses(["voting:wrap=false"], wrap=True)
    # on a wrapping (DS-style) map, the run certifies with wrap-around placements
    sf = engineered_scores(n=12)
    sf.meta["geometry"] = {**sf.meta["geometry"], "wrap": True}
    run = certify_dataset(scores=sf, defenses=["voting:binarize=argmax"], patches=["3x3"], square_cap=4)
    d = create_defense("voting", binarize="argmax", wrap=True)
    cert = d.certify(sf.scores.double(), sf.labels, [(5, 5)])
    assert [r.defenses["voting(argmax,3.2,wrap)"].certified["3x3"] for r in run.records] == cert.tolist()


def test_plan_patches():
    g = Geometry(rf=7, input_size=(32, 32))
    p = plan_patches(["5x5", "2%", "area=24"], g, (32, 32))
    assert p[0].windows == [(11, 11)] and p[0].resolved == "5x5"
    assert p[1].shapes == [(5, 5)] and p[1].resolved == "5x5"  # 2% of 32x32 -> 5x5
    assert p[2].shapes == [(1, 24), (2, 12), (3, 8), (4, 6), (6, 4), (8, 3), (12, 2), (24, 1)]
    assert [p[2].windows[j] for j in p[2].shape_window] == [g.window(s) for s in p[2].shapes]
    with pytest.raises(PatchcertError, match="larger than the image"):
        plan_patches(["40x40"], g, (32, 32))
    with pytest.raises(PatchcertError, match="malformed patch"):
        plan_patches(["5y5"], g, (32, 32))
    with pytest.raises(PatchcertError, match="twice"):
        plan_patches(["5x5", "5x5"], g, (32, 32))


def test_shards_partition_batches():
    assert parse_shard("1/3") == (1, 3) and parse_shard((0, 1)) == (0, 1) and parse_shard(None) is None
    for bad in ["3/3", "-1/2", "1/0", "a/b", "1", (2, 2), (0,)]:
        with pytest.raises(PatchcertError, match="shard"):
            parse_shard(bad)
    for nb in range(0, 12):
        for n in range(1, 6):
            parts = [list(shard_batches(nb, (i, n))) for i in range(n)]
            assert sum(parts, []) == list(range(nb))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# -- results equal the defenses called directly -------------------------------------------

def test_records_equal_direct_defense_calls():
    sf = engineered_scores()
    specs = available(ALL_SPECS)
    patches = ["3x3", "1x4", "area=6"]
    run = certify_dataset(scores=sf, defenses=specs, patches=patches, batch_size=7, dtype="float64",
                          square_cap=8)
    geom = Geometry.from_dict(sf.meta["geometry"])
    img = tuple(sf.meta["image_size"])
    scores = sf.scores.double()
    assert [r.index for r in run.records] == sf.indices.tolist()
    assert [r.clean_pred for r in run.records] == scores.mean((2, 3)).argmax(1).tolist()
    mixed = 0
    for dp in build_defenses(specs, default_window=(8, 8)):
        d = dp.defense
        pred = d.predict(scores)
        assert [r.defenses[dp.key].pred for r in run.records] == pred.tolist()
        for p in patches:
            windows = patch_windows(geom, p, img)
            cert = d.certify(scores, sf.labels, windows)
            got = torch.tensor([r.defenses[dp.key].certified[p] for r in run.records])
            assert torch.equal(got, cert), (dp.key, p)
            mixed += 0 < int(cert.sum()) < len(cert)
            det = d.certify_details(scores, sf.labels, windows)
            for i, r in enumerate(run.records):
                w = r.defenses[dp.key].worst[p]
                m = float(det.margin[i])
                assert (w.margin is None) == (not torch.isfinite(det.margin[i]))
                if w.margin is not None:
                    assert w.margin == m
                assert list(w.window) == list(windows[int(det.window_index[i])])
                assert (w.row, w.col, w.cls) == (int(det.row[i]), int(det.col[i]), int(det.worst_class[i]))
            if p == "area=6":
                shapes = [(1, 6), (2, 3), (3, 2), (6, 1)]
                for j, sh in enumerate(shapes):
                    c = d.certify(scores, sf.labels, [geom.window(sh)])
                    got = torch.tensor([r.defenses[dp.key].shapes[p][f"{sh[0]}x{sh[1]}"] for r in run.records])
                    assert torch.equal(got, c)
        # largest square: certified at that side, not at the next (brute force, per image)
        for i, r in enumerate(run.records[:12]):
            s = r.defenses[dp.key].largest_square
            one = (scores[i:i + 1], sf.labels[i:i + 1])
            if s > 0:
                assert bool(d.certify(*one, [geom.window((s, s))]))
            if s < 8:
                assert not bool(d.certify(*one, [geom.window((s + 1, s + 1))]))
    assert mixed >= 3  # the maps give certified and uncertified images for several defenses
    # summary rows are the counts of the records
    for row in run.summary.results:
        assert row.num_certified == sum(r.defenses[row.defense].certified[row.patch] for r in run.records)
        assert row.clean_accuracy == sum(r.defenses[row.defense].correct for r in run.records) / len(run.records)


def test_model_path_equals_defense_on_score_map(model, data):
    run = certify_dataset(model, data, defenses=available(["voting", "clipping:clip=tanh"]),
                          patches=["5x5", "2x9"], batch_size=5, square_cap=12)
    with torch.no_grad():
        s = model.score_map(to_float(data.images)).double()
    for dp in build_defenses(available(["voting", "clipping:clip=tanh"])):
        for p in ["5x5", "2x9"]:
            c = dp.defense.certify(s, data.labels, patch_windows(model, p, (32, 32)))
            assert [r.defenses[dp.key].certified[p] for r in run.records] == c.tolist()
    cert = [r.defenses["voting(sign,3.2)"].certified["5x5"] for r in run.records]
    assert 0 < sum(cert) < len(cert)
    md = run.summary.metadata
    assert md.model == "bagcert_cifar" and md.model_hash_of == "state_dict" and len(md.model_sha256) == 64
    assert md.forward_seconds_per_image > 0 and md.num_examples == 22 and md.map_size == [32, 32]
    assert all(r.certify_seconds_per_image > 0 for r in run.summary.results)
    assert md.defense_seconds_per_image["voting(sign,3.2)"]["largest_square"] > 0
    assert not model.training


def test_float32_and_float64_agree_on_votes(model, data):
    a = certify_dataset(model, data, batch_size=8, dtype="float32", num_examples=10)
    b = certify_dataset(model, data, batch_size=8, dtype=torch.float64, num_examples=10)
    assert [r.to_line() for r in a.records] == [r.to_line() for r in b.records]
    assert a.summary.metadata.dtype == "float32"


# -- resume, shards, merge, score files ----------------------------------------------------

def run_to(out, model, data, **kw):
    args = dict(defenses=["voting", "voting:binarize=argmax"], patches=["5x5", "area=12"], batch_size=4,
                square_cap=10, out_dir=out)
    args.update(kw)
    return certify_dataset(model, data, **args)


def test_resume_after_interrupt_is_identical(tmp_path, model, data):
    full = run_to(tmp_path / "full", model, data, save_scores=True)
    calls = []

    def stop_after_two_batches(done, total):
        calls.append(done)
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_to(tmp_path / "part", model, data, save_scores=True, progress=stop_after_two_batches)
    part = tmp_path / "part"
    assert not (part / SUMMARY_FILE).exists()
    st = run_status(part)
    assert st == {"complete": False, "done": 8, "total": 22, "shards": None}
    with pytest.raises(PatchcertError, match="incomplete"):
        load_run(part)
    with pytest.raises(PatchcertError, match="already holds a run"):
        run_to(part, model, data, save_scores=True)
    seen = []
    resumed = run_to(part, model, data, save_scores=True, resume=True, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (8, 22) and seen[-1] == (22, 22)
    assert (part / RECORDS_FILE).read_bytes() == (tmp_path / "full" / RECORDS_FILE).read_bytes()
    a = json.loads((tmp_path / "full" / SUMMARY_FILE).read_text())
    b = json.loads((part / SUMMARY_FILE).read_text())
    assert strip_timing(a) == strip_timing(b)
    assert [r.to_line() for r in resumed.records] == [r.to_line() for r in full.records]
    sa, sb = load_scores(tmp_path / "full" / SCORES_FILE), load_scores(part / SCORES_FILE)
    assert torch.equal(sa.scores, sb.scores) and torch.equal(sa.indices, sb.indices)
    assert not (part / "scores.parts").exists()


def test_run_without_records_in_memory_writes_the_same_run(tmp_path, model, data):
    """``keep_records=False`` (the CLI's way: memory flat in the number of examples) returns no
    records but writes the same records.jsonl and summary, also when resuming."""
    full = run_to(tmp_path / "full", model, data)
    lean = run_to(tmp_path / "lean", model, data, keep_records=False)
    assert lean.records == [] and full.records
    assert (tmp_path / "lean" / RECORDS_FILE).read_bytes() == (tmp_path / "full" / RECORDS_FILE).read_bytes()
    assert strip_timing(lean.summary.to_json()) == strip_timing(full.summary.to_json())

    def stop(done, total):
        if done >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_to(tmp_path / "part", model, data, keep_records=False, progress=stop)
    resumed = run_to(tmp_path / "part", model, data, keep_records=False, resume=True)
    assert resumed.records == []
    assert (tmp_path / "part" / RECORDS_FILE).read_bytes() == (tmp_path / "full" / RECORDS_FILE).read_bytes()
    assert strip_timing(resumed.summary.to_json()) == strip_timing(full.summary.to_json())
    assert strip_timing(json.loads((tmp_path / "part" / SUMMARY_FILE).read_text())) == \
        strip_timing(json.loads((tmp_path / "full" / SUMMARY_FILE).read_text()))


def test_resume_after_torn_write_is_identical(tmp_path, model, data):
    run_to(tmp_path / "full", model, data)
    ref = (tmp_path / "full" / RECORDS_FILE).read_bytes()
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    # the process died while appending: half a line at the end, no summary, progress stale
    lines = ref.split(b"\n")
    (part / RECORDS_FILE).write_bytes(b"\n".join(lines[:9]) + b"\n" + lines[9][: len(lines[9]) // 2])
    (part / SUMMARY_FILE).unlink()
    (part / PROGRESS_FILE).write_text(json.dumps({"done": 8, "total": 22, "complete": False}))
    run_to(part, model, data, resume=True)
    assert (part / RECORDS_FILE).read_bytes() == ref
    assert load_run(part)[0].n == 22
    # resuming a finished run changes nothing
    run_to(part, model, data, resume=True)
    assert (part / RECORDS_FILE).read_bytes() == ref


def test_resume_refuses_other_options_and_foreign_records(tmp_path, model, data):
    run_to(tmp_path / "r", model, data, num_examples=8)
    with pytest.raises(PatchcertError, match="different patches"):
        run_to(tmp_path / "r", model, data, num_examples=8, patches=["5x5"], resume=True)
    with pytest.raises(PatchcertError, match="different batch_size"):
        run_to(tmp_path / "r", model, data, num_examples=8, batch_size=3, resume=True)
    other = tiny_model(seed=1)
    with pytest.raises(PatchcertError, match="different model_sha256"):
        run_to(tmp_path / "r", other, data, num_examples=8, resume=True)
    recs = (tmp_path / "r" / RECORDS_FILE).read_text().splitlines()
    (tmp_path / "r" / RECORDS_FILE).write_text("\n".join(recs[1:]) + "\n")
    with pytest.raises(PatchcertError, match="first examples"):
        run_to(tmp_path / "r", model, data, num_examples=8, resume=True)


@pytest.mark.parametrize("n_shards", [3])  # uneven: 6 batches of 4 (last 1) over 3 shards
def test_shards_merge_to_single_run(tmp_path, model, data, n_shards):
    run_to(tmp_path / "single", model, data, save_scores=True, start=1, num_examples=21)
    run = tmp_path / "sharded"
    for i in range(n_shards):
        r = run_to(run, model, data, save_scores=True, start=1, num_examples=21, shard=f"{i}/{n_shards}")
        assert r.out_dir == run / f"shard-{i}-of-{n_shards}"
        assert r.summary.metadata.shard == [i, n_shards]
    summary, records = merge_shards(run)
    assert (run / RECORDS_FILE).read_bytes() == (tmp_path / "single" / RECORDS_FILE).read_bytes()
    assert [r.index for r in records] == list(range(1, 22))
    a = json.loads((tmp_path / "single" / SUMMARY_FILE).read_text())
    b = json.loads((run / SUMMARY_FILE).read_text())
    assert strip_timing(a) == strip_timing(b)
    assert b["metadata"]["merged_from"] == n_shards and b["metadata"]["forward_seconds_per_image"] > 0
    sa, sb = load_scores(tmp_path / "single" / SCORES_FILE), load_scores(run / SCORES_FILE)
    assert torch.equal(sa.scores, sb.scores) and torch.equal(sa.labels, sb.labels)
    assert torch.equal(sa.indices, sb.indices)
    assert load_run(run)[0].n == 21


def test_shards_of_an_unsorted_score_file_merge_to_the_single_run(tmp_path, model, data):
    """Shards are contiguous blocks of the run's positions: the merge joins them in shard order,
    so a score file whose indices are not sorted merges to the single run's records, summary and
    scores (sorting by index reordered them). The merge streams: ``keep_records=False`` returns
    none and writes the same files."""
    run_to(tmp_path / "m", model, data, save_scores=True, num_examples=14)
    sf = load_scores(tmp_path / "m" / SCORES_FILE)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(3))
    save_scores(tmp_path / "perm.safetensors", sf.scores[perm], sf.labels[perm], sf.indices[perm], sf.meta)
    sp = load_scores(tmp_path / "perm.safetensors")
    assert sp.indices.tolist() != sorted(sp.indices.tolist())
    args = dict(scores=sp, defenses=["voting", "masking"], patches=["5x5"], batch_size=3, square_cap=6,
                save_scores=False)
    single = certify_dataset(**args, out_dir=tmp_path / "single")
    for i in range(3):
        certify_dataset(**args, out_dir=tmp_path / "sh", shard=(i, 3))
    summary, records = merge_shards(tmp_path / "sh", keep_records=False)
    assert records == []
    assert (tmp_path / "sh" / RECORDS_FILE).read_bytes() == (tmp_path / "single" / RECORDS_FILE).read_bytes()
    assert [json.loads(line)["index"] for line in (tmp_path / "sh" / RECORDS_FILE).read_text().splitlines()] == \
        sp.indices.tolist()
    assert strip_timing(summary.to_json()) == strip_timing(single.summary.to_json())
    assert summary.metadata.indices == single.summary.metadata.indices == [sp.indices[0].item(), sp.indices[-1].item()]
    again, kept = merge_shards(tmp_path / "sh", write=False)
    assert [r.to_line() for r in kept] == [r.to_line() for r in single.records]
    assert again.to_json()["results"] == summary.to_json()["results"]


def test_merge_refuses_a_shard_whose_records_disagree_with_its_summary(tmp_path, model, data):
    for i in range(2):
        run_to(tmp_path / "r", model, data, num_examples=8, shard=f"{i}/2")
    rec = tmp_path / "r" / "shard-1-of-2" / RECORDS_FILE
    rec.write_text("".join(rec.read_text().splitlines(keepends=True)[:-1]))  # one record lost
    with pytest.raises(PatchcertError, match="shard 1 says 4 examples but its records.jsonl holds 3"):
        merge_shards(tmp_path / "r")
    assert not (tmp_path / "r" / RECORDS_FILE).exists()
    assert not list((tmp_path / "r").glob(".*merging"))


def test_sharded_and_single_runs_do_not_mix(tmp_path, model, data):
    run_to(tmp_path / "s", model, data, num_examples=8, shard="0/2")
    with pytest.raises(PatchcertError, match="holds a sharded run"):
        run_to(tmp_path / "s", model, data, num_examples=8, resume=True)
    run_to(tmp_path / "u", model, data, num_examples=8)
    with pytest.raises(PatchcertError, match="holds an unsharded run"):
        run_to(tmp_path / "u", model, data, num_examples=8, shard="1/2")


def test_empty_shard_is_allowed(tmp_path, model, data):
    # 3 examples in one batch, 2 shards: shard 0 gets no batch
    r0 = run_to(tmp_path / "r", model, data, num_examples=3, shard="0/2")
    r1 = run_to(tmp_path / "r", model, data, num_examples=3, shard="1/2")
    assert r0.summary.n == 0 and r1.summary.n == 3
    assert merge_shards(tmp_path / "r")[0].n == 3


def test_score_file_round_trip(tmp_path, model, data):
    full = run_to(tmp_path / "m", model, data, save_scores=True, start=2, num_examples=15)
    sf = load_scores(tmp_path / "m" / SCORES_FILE)
    assert sf.scores.dtype == torch.float32 and sf.indices.tolist() == list(range(2, 17))
    with torch.no_grad():
        ref = model.score_map(to_float(data.images[2:17]))
    assert torch.equal(sf.scores, ref)
    again = certify_dataset(scores=sf, defenses=["voting", "voting:binarize=argmax"], patches=["5x5", "area=12"],
                            batch_size=4, square_cap=10, out_dir=tmp_path / "s")
    assert (tmp_path / "s" / RECORDS_FILE).read_bytes() == (tmp_path / "m" / RECORDS_FILE).read_bytes()
    assert again.summary.metadata.scores_file == str(tmp_path / "m" / SCORES_FILE)
    assert again.summary.metadata.forward_seconds_per_image is None
    assert again.summary.metadata.model_sha256 == full.summary.metadata.model_sha256
    # a subset of a score file, by position
    sub = certify_dataset(scores=sf, start=3, num_examples=5, batch_size=2)
    assert [r.index for r in sub.records] == [5, 6, 7, 8, 9]


# -- validation ------------------------------------------------------------------------------

class NaNModel(torch.nn.Module):
    """Wraps a model; in the second batch it sees, the score map of row ``bad_row`` gets a NaN."""

    def __init__(self, inner, bad_row):
        super().__init__()
        self.inner, self.bad_row, self.calls = inner, bad_row, 0
        self.geometry, self.num_classes, self.arch, self.config = inner.geometry, inner.num_classes, "nan", {}

    def score_map(self, x):
        s = self.inner.score_map(x)
        self.calls += 1
        if self.calls == 2:
            s[self.bad_row, 1, 3, 3] = float("nan")
        return s

    def map_size(self, image_size):
        return self.inner.map_size(image_size)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=0), "number of examples must be a positive integer"),
    (dict(num_examples=-3), "number of examples must be a positive integer"),
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(start=-1), "start must be a non-negative integer"),
    (dict(start=22), "past the end"),
    (dict(num_examples=30), "exceed the 22 examples"),
    (dict(shard="2/2"), "shard"),
    (dict(patches=["33x1"]), "larger than the image"),
    (dict(patches=["5y5"]), "malformed patch spec"),
    (dict(defenses=["nosuch"]), "unknown defense"),
    (dict(defenses=["voting:binarize=7"]), "binarize"),
    (dict(dtype="float16"), "dtype must be float32 or float64"),
    (dict(square_cap=-1), "square cap"),
    (dict(device="tpu9"), "device"),
    (dict(save_scores=True), "needs an output directory"),
])
def test_bad_arguments_fail_up_front(model, data, kwargs, match):
    with pytest.raises(PatchcertError, match=match) as e:
        certify_dataset(model, data, **kwargs)
    assert "\n" not in str(e.value)


def test_mismatches_fail_up_front(tmp_path, model, data):
    with pytest.raises(PatchcertError, match="the model has 4 classes but synthetic has 3"):
        certify_dataset(model, synthetic_dataset(8, 3, 32), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PatchcertError, match="expects 32x32 images but synthetic has 24x24"):
        certify_dataset(model, synthetic_dataset(8, 4, 24))
    with pytest.raises(PatchcertError, match="model and a dataset, or cached scores"):
        certify_dataset(model)
    with pytest.raises(PatchcertError, match="not both"):
        certify_dataset(model, data, scores=engineered_scores())


def test_nan_scores_name_the_example(tmp_path, model, data):
    with pytest.raises(PatchcertError, match="NaN/Inf scores for example 9$"):
        certify_dataset(NaNModel(model, 1), data, batch_size=4, start=4, out_dir=tmp_path / "n")
    # the records of the finished batches stay; the run is marked incomplete
    assert run_status(tmp_path / "n")["done"] == 4
    assert not (tmp_path / "n" / SUMMARY_FILE).exists()
    sf = engineered_scores(n=6)
    sf.scores[4, 0, 0, 0] = float("inf")
    with pytest.raises(PatchcertError, match="score file holds NaN/Inf scores for example 104"):
        certify_dataset(scores=sf)


def test_model_is_left_in_its_mode(model, data):
    m = tiny_model()
    m.train()
    run = certify_dataset(m, data, num_examples=6)
    assert m.training  # restored
    m.eval()
    ref = certify_dataset(m, data, num_examples=6)
    assert [r.to_line() for r in run.records] == [r.to_line() for r in ref.records]  # certified in eval mode
