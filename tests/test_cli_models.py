"""``patchcert models``: registered models with their geometry, and shipped pretrained models."""

from __future__ import annotations

import json

import pytest
import torch

from patchcert import create_model, list_models
from patchcert.checkpoint import save_checkpoint
from patchcert.cli import main
from patchcert.models.convert import skeleton_model
from patchcert.pretrained import DEFAULT_MODEL


def _json(capsys, *extra: str) -> dict:
    assert main(["models", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_lists_every_model_with_its_geometry(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHCERT_WEIGHTS_DIR", str(tmp_path))  # no shipped weights
    d = _json(capsys)
    by_name = {m["name"]: m for m in d["results"]}
    assert sorted(by_name) == list_models()
    # other test modules may register throw-away models; the package's own must be documented
    from patchcert.models import model_entrypoint

    ours = {n: m for n, m in by_name.items() if model_entrypoint(n).__module__.startswith("patchcert.")}
    assert {"bagcert_cifar", "bagnet17", "ds_column"} <= set(ours)
    for name, m in ours.items():
        assert m["description"], name
        # the listed default geometry is the geometry of the model built with its defaults
        assert m["geometry"] == skeleton_model(name, m["num_classes"]).geometry.to_dict(), name
    assert by_name["bagnet17"]["geometry"]["rf"] == [17, 17] and by_name["bagnet17"]["geometry"]["stride"] == [8, 8]
    assert by_name["bagnet17"]["num_classes"] == 1000 and by_name["bagnet17"]["options"] == {"width": 64}
    assert by_name["bagcert_cifar"]["geometry"]["input_size"] == [32, 32]
    assert by_name["ds_column"]["geometry"]["wrap"] is True and by_name["ds_column"]["geometry"]["rf"] == [None, 4]
    assert by_name["ds_block"]["geometry"]["rf"] == [12, 12]
    assert by_name["resnet18_cifar"]["geometry"]["rf"] == [None, None]
    assert by_name["ds_column"]["options"]["base"] == "resnet18_cifar"
    assert d["pretrained"] == []


def test_skeletons_leave_initialisation_intact():
    sk = skeleton_model("bagnet9", 7, width=1)
    assert sk.fc.weight.is_meta and sk.fc.weight.shape == (7, 32)
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3).weight
    assert a.abs().sum() > 0 and a.std() > 0  # torch.nn.init works again afterwards
    real = create_model("bagnet9", num_classes=7, width=1)
    assert not real.conv1.weight.is_meta and real.conv1.weight.std() > 0
    assert sk.geometry == real.geometry


def test_table_output(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHCERT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "all x 4" in out  # ds_column: global rows, 4 columns
    assert "none shipped" in out


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A weights folder holding one model as the training loop writes it (+ a recorded command)."""
    torch.manual_seed(0)
    m = create_model("bagcert_cifar", num_classes=10, rf=7, width=2)
    save_checkpoint(tmp_path / f"{DEFAULT_MODEL}.safetensors", m,
                    data={"dataset": "cifar10", "split": "train"}, epoch=30,
                    metrics={"loss": 0.5, "eval_clean_acc": 0.8123, "eval_cert_acc": 0.4567},
                    train_config={"model": "bagcert_cifar", "model_cfg": {"rf": 7, "width": 64}, "objective": "bagcert",
                                  "dataset": "cifar10", "epochs": 30, "lr": 0.001})
    m2 = create_model("bagnet17", num_classes=10, width=1)
    save_checkpoint(tmp_path / "bagnet17_nette.safetensors", m2, command="patchcert convert bagnet16.pth.tar "
                    "--arch bagnet17 --select-classes imagenette", data="imagenette")
    monkeypatch.setenv("PATCHCERT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    return tmp_path


def test_pretrained_models_are_listed(capsys, shipped):
    d = _json(capsys)
    names = [p["name"] for p in d["pretrained"]]
    assert names == sorted([DEFAULT_MODEL, "bagnet17_nette"])
    d["pretrained"] = sorted(d["pretrained"], key=lambda p: p["name"] != DEFAULT_MODEL)
    assert d["pretrained"][0]["metrics"]["eval_cert_acc"] == 0.4567
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL} (default)" in out
    assert "cifar10 (train)" in out and "30/30" in out
    assert "eval_clean_acc=0.8123" in out and "eval_cert_acc=0.4567" in out
    assert "patchcert train model=bagcert_cifar" in out and "objective=bagcert" in out
    assert "patchcert convert bagnet16.pth.tar" in out and "imagenette" in out


def test_shipped_models_show_their_measured_deployment(capsys):
    """The real weights folder: v5 lists the deployment its checkpoint measured; v1 has none."""
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    block = out.split("\ndoublemask_cifar10\n", 1)[1].split("\n\n")[0].split("\ndoublemask_cifar10_v1")[0]
    assert "deployment: double-masking:bf16=true,channels_last=true,flip=true" in block
    v1 = out.split("\ndoublemask_cifar10_v1\n", 1)[1].split("\ndoublemask_cifar10_v2")[0]
    assert "deployment:" not in v1
