"""The shipped-weights registry (patchcert.pretrained)."""

from __future__ import annotations

import json

import pytest
import torch

import patchcert
from patchcert.checkpoint import file_sha256, save_checkpoint
from patchcert.errors import CheckpointError, PatchcertError
from patchcert.pretrained import (
    DEFAULT_MODEL,
    WEIGHTS_ENV,
    list_pretrained,
    load_pretrained,
    pretrained_path,
    weights_dir,
)


def _ship(d, name, width=4, num_classes=10, seed=0, **meta):
    torch.manual_seed(seed)
    m = patchcert.create_model("bagcert_cifar", num_classes=num_classes, width=width)
    save_checkpoint(d / f"{name}.safetensors", m, classes=[f"c{i}" for i in range(num_classes)],
                    data={"dataset": "cifar10", "split": "train"}, **meta)
    return m


def test_default_name():
    assert DEFAULT_MODEL == "bagcert_cifar10_s2_rf6_w192"


def test_empty_registry_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert weights_dir() == tmp_path
    assert list_pretrained() == []
    with pytest.raises(PatchcertError, match=rf"no shipped model '{DEFAULT_MODEL}'.*ships none.*pass --model"):
        pretrained_path()
    with pytest.raises(PatchcertError, match="no shipped model"):
        load_pretrained()
    assert list_pretrained(tmp_path / "absent") == []


def test_registry_in_a_weights_dir(tmp_path):
    ref = _ship(tmp_path, DEFAULT_MODEL)
    _ship(tmp_path, "other_model", width=2, num_classes=3, seed=1)
    items = list_pretrained(tmp_path)
    assert [m["name"] for m in items] == [DEFAULT_MODEL, "other_model"]
    assert items[0]["default"] is True and items[1]["default"] is False
    assert items[0]["arch"] == "bagcert_cifar" and items[0]["config"]["width"] == 4  # from <name>.json
    assert pretrained_path(directory=tmp_path) == tmp_path / f"{DEFAULT_MODEL}.safetensors"
    m = load_pretrained(directory=tmp_path)
    assert not m.training and m.pretrained_name == DEFAULT_MODEL
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    o = load_pretrained("other_model", directory=tmp_path)
    assert o.num_classes == 3 and o.config["width"] == 2
    with pytest.raises(PatchcertError, match=f"no shipped model 'nope'.*shipped: {DEFAULT_MODEL}, other_model"):
        pretrained_path("nope", directory=tmp_path)
    for bad in ["../x", "a/b", "", "x.safetensors"]:
        with pytest.raises(PatchcertError, match="malformed pretrained model name"):
            pretrained_path(bad, directory=tmp_path)


def test_sha256_in_sidecar_is_verified(tmp_path):
    _ship(tmp_path, "m")
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    meta["sha256"] = file_sha256(tmp_path / "m.safetensors")
    side.write_text(json.dumps(meta))
    load_pretrained("m", directory=tmp_path)
    meta["sha256"] = "0" * 64
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the shipped"):
        load_pretrained("m", directory=tmp_path)
    side.write_text("{not json")
    assert list_pretrained(tmp_path)[0]["name"] == "m"  # unreadable sidecar: listed, metadata empty


def test_corrupt_shipped_file(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x13\x37" * 50)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_pretrained("broken", directory=tmp_path)


def test_shipped_default_model_loads():
    """The real shipped weights (skipped until the file is added to src/patchcert/weights/)."""
    import os

    if os.environ.get(WEIGHTS_ENV):
        pytest.skip(f"{WEIGHTS_ENV} overrides the package folder")
    try:
        p = pretrained_path()
    except PatchcertError:
        pytest.skip("no shipped model yet")
    m = load_pretrained()
    assert p.is_file() and m.num_classes == 10 and m.geometry.input_size == (32, 32)
    with torch.no_grad():
        side = 32 // m.geometry.stride[0]  # "same"-padded CIFAR nets: 32x32 at stride 1, 16x16 at stride 2
        assert m.score_map(torch.zeros(1, 3, 32, 32)).shape == (1, 10, side, side)
