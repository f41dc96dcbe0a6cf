"""A user's own classifier, end to end (issue 17): a plain ``nn.Sequential`` from a user's file,
weights saved with ``safetensors.torch.save_file``, certified by double masking from the CLI
and from Python with no subclassing, registration or geometry; ``attack_dataset`` on it;
selection of examples; refusals that name the fix."""

from __future__ import annotations

import json
import logging
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import patchcert
from patchcert.cli import main
from patchcert.data import synthetic_dataset
from patchcert.defenses.double_masking import DoubleMasking
from patchcert.masks import apply_masks

MYNET = textwrap.dedent("""
    import torch.nn as nn

    def build(width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * width, 10))
""")


def _load_build(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build


@pytest.fixture
def user_model(tmp_path):
    """``mynet.py`` with ``build()``, a trained-looking module biased towards predicting its labels, and
    its weights in ``w.safetensors``."""
    src = tmp_path / "mynet.py"
    src.write_text(MYNET)
    torch.manual_seed(0)
    m = _load_build(src)()
    with torch.no_grad():  # make the classes depend on colour so that some images are certified
        m[-1].weight.mul_(4.0)
    w = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(w))
    return src, w, m


def _data(n=6):
    ds = synthetic_dataset(n=n, num_classes=10, size=32, seed=1, pattern="colour")
    return ds.images.float() / 255, ds.labels


def _brute_force_certified(module, x, y, k=2, patch=(5, 5), fill=0.5):
    """Certified iff the raw module (called directly, no patchcert wrapper) predicts the label on
    every image hidden by any one or two masks of the k x k mask set."""
    ms = DoubleMasking(k=k).mask_set(tuple(x.shape[-2:]), [patch])
    masks = ms.boolean()
    out = []
    with torch.no_grad():
        for n in range(len(x)):
            ok = True
            for i in range(len(masks)):
                for j in range(i, len(masks)):
                    xm = apply_masks(x[n:n + 1], (masks[i] | masks[j])[None], fill)
                    ok &= int(module(xm).argmax(1)) == int(y[n])
            out.append(ok)
    return out


def test_python_certifies_a_plain_module_against_brute_force(user_model):
    _, _, m = user_model
    x, y = _data()
    run = patchcert.certify_dataset(m.eval(), (x, y), defenses=["double-masking:k=2"], patches=["5x5"])
    assert run.summary.metadata.num_classes == 10 and [r.index for r in run.records] == list(range(6))
    cert = [r.defenses["double-masking(k=2)"].certified["5x5"] for r in run.records]
    assert cert == _brute_force_certified(m, x, y)
    assert run.summary.results[0].certified_accuracy == sum(cert) / len(cert)
    for r in run.records:  # certified implies correctly classified
        o = r.defenses["double-masking(k=2)"]
        assert not o.certified["5x5"] or o.correct


def test_wrap_classifier_normalises_inside(user_model):
    _, _, m = user_model
    x, _ = _data(3)
    w = patchcert.wrap_classifier(m, mean="cifar10")
    from patchcert.models.base import CIFAR10_MEAN, CIFAR10_STD

    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(w.logits(x), m((x - mean) / std), atol=1e-6)
    w2 = patchcert.wrap_classifier(m, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    with torch.no_grad():
        assert torch.allclose(w2.logits(x), m((x - 0.5) / 0.25), atol=1e-6)
    with pytest.raises(patchcert.PatchcertError, match="unknown normalisation preset"):
        patchcert.wrap_classifier(m, mean="imagenet21k")


def test_cli_certifies_the_users_file(user_model, tmp_path, capsys):
    src, w, m = user_model
    args = ["certify", "--model", f"{src}:build", "--weights", str(w), "--defense", "double-masking:k=2",
            "--patch", "5x5", "-n", "4", "--json", "--dataset", "synthetic", "--dataset-cfg",
            '{"pattern": "colour", "seed": 1}', "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["verb"] == "certify" and doc["n"] == 4 and doc["out_dir"] == str(tmp_path / "run")
    x, y = _data(6)
    cert = _brute_force_certified(m, x[:4], y[:4])
    assert doc["results"][0]["defense"] == "double-masking(k=2)"
    assert doc["results"][0]["certified_accuracy"] == sum(cert) / 4
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == f"{src}:build" and cfg["model_config"]["weights"] == str(w)
    # the same weights as a torch.save state dict give the same run
    pt = tmp_path / "w.pt"
    torch.save(m.state_dict(), pt)
    args2 = [a if a != str(w) else str(pt) for a in args]
    args2[args2.index("--out") + 1] = str(tmp_path / "run2")
    assert main(args2) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"] == doc["results"]


@pytest.mark.data
def test_cli_done_when_command_on_cifar10(user_model, tmp_path, capsys, shared_data, monkeypatch):
    src, w, _ = user_model
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "--model", "mynet.py:build", "--weights", "w.safetensors", "--defense",
                 "double-masking:k=2", "--patch", "5x5", "-n", "4", "--json", "--data-dir", str(shared_data),
                 "--no-progress", "--out", "r"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["n"] == 4 and doc["results"][0]["patch"] == "5x5"


def test_module_factory_and_model_cfg(user_model, tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["certify", "--model", "userpkg.nets:build", "--model-cfg", '{"width": 4}', "--dataset", "synthetic",
                 "-n", "2", "--no-progress", "--json", "--out", str(tmp_path / "r"), "--patch", "5x5"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out.strip().splitlines()[-1])
    # the default defense of a classifier is double masking; no --weights: a warning
    assert doc["results"][0]["defense"].startswith("double-masking") and "randomly initialised" in cap.err
    sys.modules.pop("userpkg.nets", None)
    sys.modules.pop("userpkg", None)


@pytest.mark.parametrize("case,match", [
    ("nofile", "does not exist"),
    ("nofactory", "defines no 'nope'"),
    ("badweights", "does not match the model"),
    ("pickled", "weights_only"),
    ("voting", "plain classifier (no score map)"),
    ("badmean", "--mean must be a preset"),
    ("weights_without_user_model", "--weights applies to"),
    ("both_selections", "not both"),
])
def test_cli_refusals_are_one_line(user_model, tmp_path, capsys, case, match):
    src, w, m = user_model
    base = ["certify", "--dataset", "synthetic", "-n", "2", "--no-progress", "--out", str(tmp_path / case)]
    model = ["--model", f"{src}:build", "--weights", str(w)]
    if case == "nofile":
        extra = ["--model", str(tmp_path / "none.py") + ":build"]
    elif case == "nofactory":
        extra = ["--model", f"{src}:nope"]
    elif case == "badweights":
        save_file({"0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        extra = ["--model", f"{src}:build", "--weights", str(tmp_path / "bad.safetensors")]
    elif case == "pickled":
        torch.save(m, tmp_path / "whole.pt")
        extra = ["--model", f"{src}:build", "--weights", str(tmp_path / "whole.pt")]
    elif case == "voting":
        extra = model + ["--defense", "voting"]
    elif case == "badmean":
        extra = model + ["--mean", "0.5;0.5"]
    elif case == "weights_without_user_model":
        extra = ["--model", "bagcert_cifar", "--weights", str(w)]
    else:
        extra = model + ["--indices", "1,2", "--subset", "random:2"]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


def test_bad_images_are_refused_where_they_enter(user_model):
    _, _, m = user_model
    x, y = _data(2)
    with pytest.raises(patchcert.DataError, match="divide by 255"):
        patchcert.certify_dataset(m, (x * 255, y), defenses=["double-masking:k=2"])
    with pytest.raises(patchcert.DataError, match="undo any normalisation"):
        patchcert.certify_dataset(m, (x - 0.5, y), defenses=["double-masking:k=2"])
    w = patchcert.wrap_classifier(m)
    with pytest.raises(patchcert.PatchcertError, match=r"images are uint8.*float\(\) / 255"):
        w.score_map((x * 255).to(torch.uint8))
    with pytest.raises(patchcert.PatchcertError, match="divide by 255"):
        w.score_map(x * 255)
    sm = patchcert.create_model("bagcert_cifar", width=2)  # the registry's models check the same way
    with pytest.raises(patchcert.PatchcertError, match="images are uint8"):
        sm.score_map((x * 255).to(torch.uint8))
    with pytest.raises(patchcert.PatchcertError, match="no score map.*double-masking"):
        patchcert.certify_dataset(m, (x, y), defenses=["masking"])


def test_attack_dataset_takes_a_plain_module(user_model):
    _, _, m = user_model
    x, y = _data(4)
    run = patchcert.attack_dataset(m, (x, y), defenses=["double-masking:k=2"], patches=["5x5"], indices=[3, 0])
    assert [r.index for r in run.records] == [3, 0]
    res = run.summary["results"][0]
    assert res["certified_accuracy"] <= res["robust_accuracy"] <= res["clean_accuracy"]
    assert not run.failures
    cert = _brute_force_certified(m, x[[3, 0]], y[[3, 0]])
    assert [r.defenses["double-masking(k=2)"].certified["5x5"] for r in run.records] == cert


def test_selection_is_seeded_recorded_and_resumable(user_model, tmp_path):
    _, _, m = user_model
    x, y = _data(10)
    kw = dict(defenses=["double-masking:k=2"], patches=["5x5"], subset="random:4", seed=7, batch_size=2)
    a = patchcert.certify_dataset(m, (x, y), out_dir=tmp_path / "a", **kw)
    b = patchcert.certify_dataset(m, (x, y), **kw)
    idx = [r.index for r in a.records]
    assert idx == [r.index for r in b.records] and idx == sorted(idx) and len(set(idx)) == 4
    assert a.summary.metadata.data["selection"] == {"kind": "random", "n": 4, "seed": 7, "of": 10}
    c = patchcert.certify_dataset(m, (x, y), **{**kw, "seed": 8})
    g = torch.Generator().manual_seed(8)
    assert [r.index for r in c.records] == sorted(torch.randperm(10, generator=g)[:4].tolist())
    # an interrupted run (the first 2 records) resumes with the same selection, and only with it
    recs = (tmp_path / "a" / "records.jsonl").read_text().splitlines()
    (tmp_path / "a" / "records.jsonl").write_text("\n".join(recs[:2]) + "\n")
    (tmp_path / "a" / "summary.json").unlink()
    r = patchcert.certify_dataset(m, (x, y), out_dir=tmp_path / "a", resume=True, **kw)
    assert [e.index for e in r.records] == idx
    assert [e.to_json() for e in r.records] == [e.to_json() for e in a.records]
    with pytest.raises(patchcert.PatchcertError, match="cannot resume"):
        patchcert.certify_dataset(m, (x, y), out_dir=tmp_path / "a", resume=True, **{**kw, "seed": 8})
    d = patchcert.certify_dataset(m, (x, y), defenses=["double-masking:k=2"], indices="7,2-3", num_examples=2)
    assert [e.index for e in d.records] == [7, 2]


def test_parse_selection_errors():
    from patchcert.selection import parse_indices, parse_subset

    assert parse_indices("3,17,40-42") == [3, 17, 40, 41, 42]
    for bad in ("3,,4", "a", "5-2"):
        with pytest.raises(patchcert.PatchcertError):
            parse_indices(bad)
    assert parse_subset("random:12") == 12
    for bad in ("random:0", "first:3", "random"):
        with pytest.raises(patchcert.PatchcertError, match="random:N"):
            parse_subset(bad)


def test_single_class_selection_warns(user_model, caplog):
    _, _, m = user_model
    x, _ = _data(6)
    y = torch.tensor([4, 4, 4, 1, 2, 3])
    with caplog.at_level(logging.WARNING, logger="patchcert"):
        patchcert.certify_dataset(m, (x, y), defenses=["double-masking:k=2"], num_examples=3)
    assert "all of class '4'" in caplog.text and "--subset random:N" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchcert"):
        patchcert.certify_dataset(m, (x, y), defenses=["double-masking:k=2"], num_examples=4)
    assert "all of class" not in caplog.text


@pytest.mark.parametrize("hub", ["torchvision", "timm"])
def test_hub_models_when_installed(hub, tmp_path, capsys):
    try:
        __import__(hub)
    except Exception as e:  # not installed, or built for another torch (see the README)
        pytest.skip(f"{hub} is not importable here ({type(e).__name__}); install a matching pair to run this")
    name = "resnet18"
    assert main(["certify", "--model", f"{hub}:{name}", "--model-cfg", '{"num_classes": 10}', "--dataset",
                 "synthetic", "-n", "1", "--no-progress", "--json", "--out", str(tmp_path / "r"),
                 "--defense", "double-masking:k=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 1
