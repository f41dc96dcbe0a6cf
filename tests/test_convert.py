"""``patchcert convert`` / models.convert: safe loading, strict name/shape matching, metadata."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from patchcert import CheckpointError, PatchcertError, create_model
from patchcert.checkpoint import file_sha256, read_metadata
from patchcert.models import load_model
from patchcert.cli import main
from patchcert.models.convert import (
    IMAGENETTE_IMAGENET_INDICES,
    IMAGENETTE_WNIDS,
    class_dim_keys,
    convert_checkpoint,
    read_state_dict,
)


def _bn_random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    return _bn_random(create_model("bagnet17", num_classes=12, width=2)).eval()


def _reference_style_file(model, path, legacy=True):
    """What the published BagNet files look like: a training checkpoint dict whose
    ``state_dict`` has DataParallel's ``module.`` prefix, written by an old PyTorch
    (legacy non-zip format), without BatchNorm's ``num_batches_tracked`` counters."""
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    obj = {"epoch": 90, "arch": "bagnet16", "state_dict": sd, "best_prec1": 71.2,
           "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]}}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class _Payload:
    """Unpickling this runs ``open(marker, 'w')`` -- it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [True, False])
def test_reference_style_checkpoint_converts_exactly(tmp_path, source_model, legacy):
    src = _reference_style_file(source_model, tmp_path / "bagnet16.pth.tar", legacy=legacy)
    out = tmp_path / "bagnet17.safetensors"
    res = convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2})
    assert res.num_classes == 12 and res.arch == "bagnet17" and res.config == {"width": 2}
    assert len(res.filled) == 53 and all(k.endswith("num_batches_tracked") for k in res.filled)
    model = load_model(out)
    x = torch.rand(2, 3, 41, 49)
    with torch.no_grad():
        assert torch.equal(model.score_map(x), source_model.score_map(x))
    meta = read_metadata(out)
    assert meta["arch"] == "bagnet17" and meta["num_classes"] == 12 and meta["config"] == {"width": 2}
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() == file_sha256(src)
    assert meta["source"]["file"] == "bagnet16.pth.tar" and meta["source"]["filled_defaults"] == 53
    assert meta["geometry"]["rf"] == [17, 17] and meta["geometry"]["stride"] == [8, 8]
    assert json.loads(out.with_suffix(".json").read_text())["source"]["sha256"] == meta["source"]["sha256"]


def test_plain_state_dict_and_safetensors_sources(tmp_path, source_model):
    from safetensors.torch import save_file

    pt = tmp_path / "plain.pth"
    torch.save(source_model.state_dict(), pt)
    st = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(st))
    x = torch.rand(1, 3, 33, 33)
    for i, src in enumerate((pt, st)):
        out = tmp_path / f"o{i}.safetensors"
        res = convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2}, num_classes=12)
        assert res.filled == []
        with torch.no_grad():
            assert torch.equal(load_model(out).score_map(x), source_model.score_map(x))
    assert read_metadata(tmp_path / "o1.safetensors")["source"]["format"] == "safetensors"


@pytest.mark.parametrize("legacy", [True, False])
def test_hostile_pickle_is_refused_without_running(tmp_path, legacy, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": _Payload(marker)}}, evil, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError) as ei:
        convert_checkpoint(evil, "bagnet17", out, model_cfg={"width": 2})
    msg = str(ei.value)
    assert "\n" not in msg and "refused" in msg and "evil.pth" in msg
    assert not marker.exists() and not out.exists()
    # the same through the command line: one line on stderr, exit status 2
    rc = main(["convert", str(evil), "--arch", "bagnet17", "--out", str(out), "--model-cfg", '{"width": 2}'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("patchcert convert: error:") and "\n" not in err
    assert not marker.exists() and not out.exists()
    # the file really is hostile: an unsafe load would have run it
    opened = torch.load(evil, weights_only=False)["state_dict"]["conv1.weight"]
    opened.close()
    assert marker.exists()


def test_raw_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(evil)
    assert not marker.exists()


def test_mismatches_name_the_first_problem(tmp_path, source_model):
    sd = dict(source_model.state_dict())
    src = tmp_path / "w.pth"
    torch.save(sd, src)
    with pytest.raises(CheckpointError) as ei:  # BagNet-17 weights are not BagNet-33's
        convert_checkpoint(src, "bagnet33", tmp_path / "a.safetensors", model_cfg={"width": 2})
    msg = str(ei.value)
    assert "layer4.0.conv2.weight" in msg and "(16, 16, 1, 1)" in msg and "(16, 16, 3, 3)" in msg and "\n" not in msg

    missing = {k: v for k, v in sd.items() if k != "layer2.1.bn2.weight"}
    torch.save(missing, src)
    with pytest.raises(CheckpointError, match=r"layer2\.1\.bn2\.weight \(shape \(4,\)\) is missing"):
        convert_checkpoint(src, "bagnet17", tmp_path / "b.safetensors", model_cfg={"width": 2})

    torch.save({**sd, "head.extra": torch.zeros(3)}, src)
    with pytest.raises(CheckpointError, match=r"head\.extra .*bagnet17 does not"):
        convert_checkpoint(src, "bagnet17", tmp_path / "c.safetensors", model_cfg={"width": 2})

    torch.save(sd, src)  # wrong width: the first tensor already differs
    with pytest.raises(CheckpointError, match=r"conv1\.weight has shape \(2, 3, 1, 1\)"):
        convert_checkpoint(src, "bagnet17", tmp_path / "d.safetensors", model_cfg={"width": 4})
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir())


@pytest.mark.parametrize("obj,match", [({"state_dict": {"a": 1}}, "not a state dict of tensors"),
                                       ({}, "holds no state dict"), ([torch.zeros(2)], "holds no state dict")])
def test_non_state_dicts_are_rejected(tmp_path, obj, match):
    src = tmp_path / "x.pth"
    torch.save(obj, src)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(src)


def test_classes_count_and_selection(tmp_path, source_model):
    src = tmp_path / "w.pth"
    torch.save(source_model.state_dict(), src)
    with pytest.raises(CheckpointError, match="12 classes in the source but num_classes=10"):
        convert_checkpoint(src, "bagnet17", tmp_path / "a.safetensors", model_cfg={"width": 2}, num_classes=10)
    out = tmp_path / "sel.safetensors"
    res = convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2}, select_classes="3,0,7",
                             classes=["c3", "c0", "c7"])
    assert res.num_classes == 3
    m = load_model(out)
    x = torch.rand(2, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(m.score_map(x), source_model.score_map(x)[:, [3, 0, 7]])
    meta = read_metadata(out)
    assert meta["classes"] == ["c3", "c0", "c7"] and meta["source"]["class_indices"] == [3, 0, 7]
    assert meta["num_source_classes"] == 12
    with pytest.raises(PatchcertError, match="out of range"):
        convert_checkpoint(src, "bagnet17", tmp_path / "b.safetensors", model_cfg={"width": 2}, select_classes="12")
    with pytest.raises(PatchcertError, match="repeats"):
        convert_checkpoint(src, "bagnet17", tmp_path / "b.safetensors", model_cfg={"width": 2}, select_classes=[1, 1])


def test_imagenette_selection_of_an_imagenet_model(tmp_path):
    torch.manual_seed(1)
    full = create_model("bagnet9", num_classes=1000, width=1).eval()
    src = tmp_path / "in1k.pth"
    torch.save(full.state_dict(), src)
    out = tmp_path / "nette.safetensors"
    res = convert_checkpoint(src, "bagnet9", out, model_cfg={"width": 1}, select_classes="imagenette")
    assert res.num_classes == 10
    meta = read_metadata(out)
    assert meta["classes"] == list(IMAGENETTE_WNIDS) and meta["source"]["class_indices"] == list(IMAGENETTE_IMAGENET_INDICES)
    m = load_model(out)
    assert torch.equal(m.fc.weight, full.fc.weight[list(IMAGENETTE_IMAGENET_INDICES)])


def test_output_guards(tmp_path, source_model):
    src = tmp_path / "w.pth"
    torch.save(source_model.state_dict(), src)
    with pytest.raises(PatchcertError, match=r"\.safetensors"):
        convert_checkpoint(src, "bagnet17", tmp_path / "o.pth", model_cfg={"width": 2})
    with pytest.raises(PatchcertError, match="unknown model"):
        convert_checkpoint(src, "bagnet18", tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope.pth", "bagnet17", tmp_path / "o.safetensors")
    out = tmp_path / "o.safetensors"
    convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2})
    with pytest.raises(PatchcertError, match="already exists"):
        convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2})
    convert_checkpoint(src, "bagnet17", out, model_cfg={"width": 2}, overwrite=True)
    with pytest.raises(PatchcertError, match="overwrite the source"):
        convert_checkpoint(out, "bagnet17", out, model_cfg={"width": 2}, overwrite=True)


def test_class_dimension_detection():
    assert class_dim_keys("bagnet17", {"width": 1}) == ["fc.weight", "fc.bias"]
    assert class_dim_keys("ds_column", {"base": "resnet_small"}) == ["base.fc.weight", "base.fc.bias"]
    assert class_dim_keys("bagcert_cifar", {"width": 2}) == ["head.weight", "head.bias"]


def test_other_architectures_convert_too(tmp_path):
    torch.manual_seed(0)
    ds = _bn_random(create_model("ds_column", num_classes=5, b=3, base="resnet_small", base_cfg={"width": 2})).eval()
    src = tmp_path / "ds.pth"
    torch.save({"model": {"module." + k: v for k, v in ds.state_dict().items()}}, src)
    out = tmp_path / "ds.safetensors"
    convert_checkpoint(src, "ds_column", out, model_cfg={"b": 3, "base": "resnet_small", "base_cfg": {"width": 2}})
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(out).score_map(x), ds.score_map(x))


def test_cli_convert(tmp_path, source_model, capsys):
    src = _reference_style_file(source_model, tmp_path / "bagnet16.pth.tar")
    out = tmp_path / "b.safetensors"
    rc = main(["convert", str(src), "--arch", "bagnet17", "--out", str(out), "--model-cfg", '{"width": 2}', "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    d = doc["results"][0]
    assert doc["verb"] == "convert" and doc["out"] == str(out)
    assert d["arch"] == "bagnet17" and d["num_classes"] == 12 and d["source"]["sha256"] == file_sha256(src)
    rc = main(["convert", str(src), "--arch", "bagnet17", "--out", str(out), "--model-cfg", '{"width": 2}'])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["convert", str(src), "--arch", "bagnet17", "--out", str(out), "--model-cfg", '{"width": 2}', "--force"])
    text = capsys.readouterr().out
    assert rc == 0 and "wrote" in text and file_sha256(src) in text
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    rc = main(["convert", str(src), "--arch", "bagnet17", "--out", str(tmp_path / "c.safetensors"),
               "--model-cfg", '{"width": 2}', "--select-classes", "5,6", "--classes", str(names)])
    assert rc == 0 and read_metadata(tmp_path / "c.safetensors")["classes"] == ["a", "b"]
    capsys.readouterr()
    for bad, match in ((["--model-cfg", "{width"], "not valid JSON"), (["--model-cfg", "[1]"], "JSON object"),
                       (["--classes", str(tmp_path / "none.txt")], "does not exist")):
        rc = main(["convert", str(src), "--arch", "bagnet17", "--out", str(tmp_path / "z.safetensors"), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and err.count("\n") == 1
