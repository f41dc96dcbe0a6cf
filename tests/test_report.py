"""``patchcert report``: hand-made run directories (written per the run-directory contract),
shard merging, refusal of incomplete runs, table numbers, and valid PNG plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from patchcert.cli import main
from patchcert.defenses import create_defense
from patchcert.errors import PatchcertError
from patchcert.report import aspect_series, load_certify_run, make_report, square_curve
from patchcert.results import save_scores

V32 = "voting(sign,3.2)"
CLIP = "clipping(-1:1)"
AREA_SHAPES = ["1x6", "2x3", "3x2", "6x1"]

# per example: label, defended pred per defense, certified[5x5], largest_square, per-rectangle certificates
EXAMPLES = [
    # idx, label, {key: (pred, cert_5x5, cert_area6, largest, {shape: bool})}
    (0, 1, {V32: (1, True, True, 6, dict.fromkeys(AREA_SHAPES, True)), CLIP: (1, True, False, 5,
                                                                            {"1x6": False, "2x3": True, "3x2": True, "6x1": True})}),
    (1, 0, {V32: (0, False, False, 3, {"1x6": False, "2x3": True, "3x2": True, "6x1": False}),
            CLIP: (0, False, False, 2, {"1x6": False, "2x3": False, "3x2": True, "6x1": False})}),
    (2, 2, {V32: (1, False, False, 0, dict.fromkeys(AREA_SHAPES, False)), CLIP: (2, False, False, 1,
                                                                               dict.fromkeys(AREA_SHAPES, False))}),
    (3, 3, {V32: (3, True, False, 5, {"1x6": False, "2x3": True, "3x2": True, "6x1": True}),
            CLIP: (3, False, False, 4, {"1x6": False, "2x3": True, "3x2": False, "6x1": False})}),
]
# expected by hand from the table above
EXPECT = {
    (V32, "5x5"): (3 / 4, 2 / 4),
    (V32, "area=6"): (3 / 4, 1 / 4),
    (CLIP, "5x5"): (4 / 4, 1 / 4),
    (CLIP, "area=6"): (4 / 4, 0 / 4),
}


def _record(idx, label, defs):
    out = {}
    for key, (pred, c5, ca, ls, shapes) in defs.items():
        out[key] = {
            "pred": pred, "correct": pred == label,
            "certified": {"5x5": c5, "area=6": ca},
            "worst": {"5x5": {"margin": 3.0 if c5 else -2.0, "window": [7, 7], "row": 1, "col": 0, "class": 0},
                      "area=6": {"margin": 1.0 if ca else -1.0, "window": [3, 8], "row": 0, "col": 0, "class": 0}},
            "largest_square": ls,
            "shapes": {"area=6": shapes},
        }
    return {"index": idx, "label": label, "clean_pred": label, "defenses": out}


def _summary(examples, n=None):
    n = len(examples) if n is None else n
    res = []
    for key, cfg in ((V32, {"name": "voting", "binarize": "sign", "condition": "3.2", "wrap": False}),
                     (CLIP, {"name": "clipping", "clip": [-1.0, 1.0], "wrap": False})):
        for patch, resolved, windows in (("5x5", "5x5", [[7, 7]]),
                                         ("area=6", "1x6,2x3,3x2,6x1", [[3, 8], [4, 5], [5, 4], [8, 3]])):
            recs = [e for e in examples]
            correct = sum(d[key][0] == lab for _, lab, d in recs)
            cert = sum(d[key][1] if patch == "5x5" else d[key][2] for _, _, d in recs)
            res.append({"defense": key, "defense_config": cfg, "patch": patch, "resolved": resolved,
                        "windows": windows, "clean_accuracy": correct / len(recs),
                        "certified_accuracy": cert / len(recs), "certify_seconds_per_image": 0.002})
    md = {"model": "tiny", "model_sha256": "ab" * 32, "checkpoint": None,
          "data": {"name": "synthetic", "dataset": "synthetic", "seed": 0, "num_examples_total": 4},
          "num_examples": n, "seed": 0, "device": "cpu", "dtype": "float64", "versions": {},
          "forward_seconds_per_image": 0.01,
          "geometry": {"rf": [3, 3], "stride": [1, 1], "offset": [1, 1], "wrap": False, "input_size": [8, 8]},
          "image_size": [8, 8], "command": "hand-made", "square_cap": 8, "num_classes": 4,
          "classes": ["class0", "class1", "class2", "class3"]}
    return {"n": n, "results": res, "metadata": md}


def write_run(d: Path, examples=EXAMPLES, n=None, scores=False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "records.jsonl").write_text("".join(json.dumps(_record(*e)) + "\n" for e in examples))
    (d / "summary.json").write_text(json.dumps(_summary(examples, n)))
    if scores:
        g = torch.Generator().manual_seed(0)
        idx = torch.tensor([e[0] for e in examples])
        save_scores(d / "scores.safetensors", torch.randn(len(examples), 4, 8, 8, generator=g),
                    torch.tensor([e[1] for e in examples]), idx,
                    {"geometry": _summary(examples)["metadata"]["geometry"], "image_size": [8, 8]})
    return d


def _valid_png(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG"
        return im.size


def test_tables_have_the_hand_computed_numbers(tmp_path):
    run = write_run(tmp_path / "runA")
    out = make_report([run], tmp_path / "rep")
    got = {(r.defense, r.patch): (r.clean_accuracy, r.certified_accuracy) for r in out.rows}
    assert got == EXPECT
    rows = list(csv.DictReader(io.StringIO((tmp_path / "rep" / "results.csv").read_text())))
    assert len(rows) == 4
    for r in rows:
        assert (float(r["clean_accuracy"]), float(r["certified_accuracy"])) == EXPECT[(r["defense"], r["patch"])]
        assert r["run"] == "runA" and r["n"] == "4" and float(r["certify_seconds_per_image"]) == 0.002
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| runA | tiny | synthetic | voting(sign,3.2) | 5x5 | 4 | 75.00% | 50.00% |" in md
    assert "clipping(-1:1) | area=6 (1x6,2x3,3x2,6x1) | 4 | 100.00% | 0.00% |" in md
    for name in ("certified_vs_square_patch.png", "certified_vs_aspect_ratio.png", "clean_vs_certified.png"):
        w, h = _valid_png(tmp_path / "rep" / name)
        assert w > 400 and h > 300
    assert not (tmp_path / "rep" / "accuracy_bounds.png").exists()  # no attack run
    assert "accuracy_bounds.png: no attack run" in " ".join(out.skipped)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "![Certified accuracy vs square patch size](certified_vs_square_patch.png)" in report


def test_square_and_aspect_curves():
    from patchcert.results import ExampleRecord

    recs = [ExampleRecord.from_json(_record(*e)) for e in EXAMPLES]
    s, acc = square_curve(recs, V32, 8)
    # V32: correct = {0, 1, 3} with largest squares 6, 3, 5 (example 2 is wrong)
    assert s == list(range(9))
    assert acc == [3 / 4, 3 / 4, 3 / 4, 3 / 4, 2 / 4, 2 / 4, 1 / 4, 0, 0]
    s, acc = square_curve(recs, CLIP, 8)
    assert acc[:7] == [1, 1, 3 / 4, 2 / 4, 2 / 4, 1 / 4, 0]


def test_aspect_series_from_area_results(tmp_path):
    run = load_certify_run(write_run(tmp_path / "r"))
    ser = aspect_series(run)
    assert set(ser) == {(V32, 6), (CLIP, 6)}
    assert ser[(V32, 6)] == [(1, 6, 0.25), (2, 3, 0.75), (3, 2, 0.75), (6, 1, 0.5)]
    assert ser[(CLIP, 6)] == [(1, 6, 0.0), (2, 3, 0.5), (3, 2, 0.5), (6, 1, 0.25)]


def test_shards_are_merged_like_a_single_run(tmp_path):
    single = write_run(tmp_path / "single")
    sharded = tmp_path / "sharded"
    write_run(sharded / "shard-0-of-2", EXAMPLES[:2])
    write_run(sharded / "shard-1-of-2", EXAMPLES[2:])
    a = load_certify_run(single)
    b = load_certify_run(sharded)
    assert b.shards == 2 and a.shards == 0
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    key = lambda s: [(r.defense, r.patch, r.clean_accuracy, r.certified_accuracy, r.shapes) for r in s.results]
    assert key(a.summary) == key(b.summary)
    out = make_report([sharded], tmp_path / "rep", plots=False)
    assert {(r.defense, r.patch): (r.clean_accuracy, r.certified_accuracy) for r in out.rows} == EXPECT


def test_attack_run_adds_robust_accuracy_and_bounds_plot(tmp_path):
    run = write_run(tmp_path / "runA")
    att = tmp_path / "att"
    att.mkdir()
    recs = [{"index": i, "label": 0, "clean_pred": 0, "defenses": {}} for i in range(4)]
    (att / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (att / "summary.json").write_text(json.dumps({
        "n": 4, "soundness_failures": 0,
        "results": [{"defense": V32, "patch": "5x5", "clean_accuracy": 0.75, "certified_accuracy": 0.5,
                     "robust_accuracy": 0.5, "soundness_failures": 0, "attack_seconds_per_image": 0.3}],
        "metadata": {"kind": "attack", "model": "tiny", "model_sha256": "ab" * 32, "data": {"name": "synthetic"},
                     "attack": {"strong": True}}}))
    out = make_report([run], tmp_path / "rep", attacks=[att])
    row = next(r for r in out.rows if (r.defense, r.patch) == (V32, "5x5"))
    assert row.robust_accuracy == 0.5 and row.attack == "att (strong)" and row.soundness_failures == 0
    assert all(r.robust_accuracy is None for r in out.rows if (r.defense, r.patch) != (V32, "5x5"))
    _valid_png(tmp_path / "rep" / "accuracy_bounds.png")
    assert "50.00% | att (strong) | ok |" in (tmp_path / "rep" / "results.md").read_text()


def test_vulnerability_maps_from_saved_scores(tmp_path):
    run = write_run(tmp_path / "runS", scores=True)
    out = make_report([run], tmp_path / "rep", examples=[3], plots=False)
    maps = sorted((tmp_path / "rep").glob("vulnerability_*.png"))
    assert [p.name for p in maps] == ["vulnerability_runS_3.png"]
    for p in maps:
        w, h = _valid_png(p)
        assert w > 800 and h > 600  # 2 defenses x 3 panels
    assert all(p in out.files for p in maps)
    # the margin the maps show is the defense's own
    d = create_defense("voting")
    with pytest.raises(PatchcertError, match="not in the run"):
        make_report([run], tmp_path / "rep2", examples=[7])
    assert d.margin_map(torch.zeros(1, 4, 8, 8), torch.tensor([0]), (7, 7)).shape == (1, 2, 2)


@pytest.mark.parametrize("damage, needle", [
    ("no_summary", "incomplete"),
    ("fewer_records", "incomplete"),
    ("missing_shard", "missing"),
    ("unfinished_shard", "incomplete"),
    ("lying_summary", "disagrees"),
    ("missing_dir", "does not exist"),
    ("attack_as_run", "attack run"),
])
def test_incomplete_or_damaged_runs_are_refused_with_one_line(tmp_path, capsys, damage, needle):
    run = tmp_path / "run"
    if damage == "no_summary":
        write_run(run)
        (run / "summary.json").unlink()
    elif damage == "fewer_records":
        write_run(run, n=5)
    elif damage == "missing_shard":
        write_run(run / "shard-0-of-3", EXAMPLES[:2])
        write_run(run / "shard-2-of-3", EXAMPLES[2:])
    elif damage == "unfinished_shard":
        write_run(run / "shard-0-of-2", EXAMPLES[:2])
        write_run(run / "shard-1-of-2", EXAMPLES[2:])
        (run / "shard-1-of-2" / "summary.json").unlink()
    elif damage == "lying_summary":
        write_run(run)
        s = json.loads((run / "summary.json").read_text())
        s["results"][0]["certified_accuracy"] = 1.0
        (run / "summary.json").write_text(json.dumps(s))
    elif damage == "attack_as_run":
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"n": 0, "results": [], "metadata": {"kind": "attack"}}))
    rc = main(["report", str(run), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("patchcert report: error:") and needle in err[0], err
    assert not (tmp_path / "rep" / "results.csv").exists()  # nothing that looks like a result


def test_cli_json_and_bad_examples(tmp_path, capsys):
    run = write_run(tmp_path / "runA")
    rc = main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-plots", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    doc = json.loads(out[-1])
    assert {(r["defense"], r["patch"]): (r["clean_accuracy"], r["certified_accuracy"]) for r in doc["results"]} == EXPECT
    assert not list((tmp_path / "rep").glob("*.png"))
    rc = main(["report", str(run), "--out", str(tmp_path / "rep"), "--examples", "1,x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--examples" in err[0]


# -- end to end: certify -> attack -> report on a tiny checkpoint ------------------------------

def _tiny_checkpoint(path: Path) -> Path:
    import torch.nn as nn

    from patchcert.checkpoint import save_checkpoint
    from patchcert.models import list_models, register_model
    from patchcert.models.base import ScoreMapModel, trace_geometry

    class ReportTestNet(ScoreMapModel):
        def __init__(self, num_classes: int = 4) -> None:
            super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
            self.arch, self.config, self.num_classes = "report_test_net", {}, num_classes
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.head = nn.Conv2d(6, num_classes, 1)
            self.geometry = trace_geometry([(3, 1, 1), (1, 1, 0)], input_size=(16, 16))

        def forward_features(self, x):
            return torch.relu(self.conv(x))

        def forward_head(self, f):
            return self.head(f)

    if "report_test_net" not in list_models():
        def report_test_net(num_classes: int = 4) -> ReportTestNet:
            return ReportTestNet(num_classes)

        register_model(report_test_net)
    torch.manual_seed(1)
    model = ReportTestNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    save_checkpoint(path, model, classes=[f"class{i}" for i in range(4)], data={"dataset": "synthetic", "seed": 0})
    return path


def test_certify_attack_report_end_to_end(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    common = ["--model", str(ckpt), "--dataset", "synthetic", "-n", "12", "--patch", "3x3", "--no-progress", "--json"]
    assert main(["certify", *common, "--patch", "area=4", "--save-scores", "--out", str(tmp_path / "cert")]) == 0
    cert = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["attack", *common, "--steps", "20", "--step-size", "0.1", "--out", str(tmp_path / "att")]) == 0
    att = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rc = main(["report", str(tmp_path / "cert"), "--attack", str(tmp_path / "att"), "--out", str(tmp_path / "rep"),
               "--examples", "0,5", "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["defense"], r["patch"]): r for r in doc["results"]}
    c = next(r for r in cert["results"] if r["patch"] == "3x3")
    a = att["results"][0]
    row = rows[(c["defense"], "3x3")]
    assert row["certified_accuracy"] == c["certified_accuracy"] == a["certified_accuracy"]
    assert row["clean_accuracy"] == c["clean_accuracy"] == a["clean_accuracy"]
    assert row["robust_accuracy"] == a["robust_accuracy"] and row["attack"] == "att"
    assert rows[(c["defense"], "area=4")]["robust_accuracy"] is None
    names = sorted(Path(f).name for f in doc["files"] if f.endswith(".png"))
    assert names == ["accuracy_bounds.png", "certified_vs_aspect_ratio.png", "certified_vs_square_patch.png",
                     "clean_vs_certified.png", "vulnerability_cert_0.png", "vulnerability_cert_5.png"]
    for n in names:
        _valid_png(tmp_path / "rep" / n)
