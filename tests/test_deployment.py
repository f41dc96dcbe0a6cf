"""A checkpoint's measured deployment (``checkpoint_meta["deployment"]``): the defense options a
spec that leaves them out takes (e.g. double masking in bf16 + channels_last where a measured
sample showed it changes no certificate); explicit options win; malformed metadata is a
one-line error; a model without the entry keeps the defenses' own defaults."""

from __future__ import annotations

import json

import pytest
import torch

from patchcert.certify import certify_dataset
from patchcert.checkpoint import save_checkpoint
from patchcert.cli import main
from patchcert.data import synthetic_dataset
from patchcert.errors import PatchcertError
from patchcert.models import create_model, load_model
from patchcert.runs.source import deployment_options

DEPLOY = {"double-masking": {"options": {"bf16": True, "channels_last": True},
                             "evidence": "hand-made for the test"}}


def _model(deploy=None):
    torch.manual_seed(0)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3).eval()
    if deploy is not None:
        m.checkpoint_meta = {"deployment": deploy}
    return m


def _keys(model, specs, n=3):
    data = synthetic_dataset(n=n, num_classes=3, size=32)
    run = certify_dataset(model, data, defenses=specs, patches=["5x5"], batch_size=n, square_cap=0)
    return [r.defense for r in run.summary.results], run


def test_unspecified_options_take_the_measured_deployment():
    keys, run = _keys(_model(DEPLOY), ["double-masking:k=2"])
    assert keys == ["double-masking(k=2,bf16,channels_last)"]
    cfg = run.summary.results[0].defense_config
    assert cfg["bf16"] is True and cfg["channels_last"] is True
    # the same certificates as the explicit spec on a model without the entry
    _, plain = _keys(_model(), ["double-masking:k=2,bf16=true,channels_last=true"])
    assert [r.to_json() for r in run.records] == [r.to_json() for r in plain.records]


def test_explicit_options_override_and_other_models_keep_defaults():
    keys, _ = _keys(_model(DEPLOY), ["double-masking:k=2,bf16=false", "voting"])
    assert keys == ["double-masking(k=2,channels_last)", "voting(sign,3.2)"]
    keys, _ = _keys(_model(), ["double-masking:k=2"])
    assert keys == ["double-masking(k=2)"]
    keys, _ = _keys(_model({}), ["double-masking:k=2"])
    assert keys == ["double-masking(k=2)"]


@pytest.mark.parametrize("bad", [
    ["double-masking"],
    {"double-masking": {"bf16": True}},  # no "options"
    {"double-masking": {"options": {"bf16": [1]}}},
    {"double-masking": {"options": {"bf16": "yes"}}},  # well-formed, but the defense refuses the value
    {"double-masking": {"options": {"no_such_option": True}}},
])
def test_malformed_deployment_is_a_one_line_error(bad):
    with pytest.raises(PatchcertError) as e:
        _keys(_model(bad), ["double-masking:k=2"])
    assert "\n" not in str(e.value)


def test_deployment_options_reads_only_the_options():
    assert deployment_options(_model(DEPLOY)) == {"double-masking": {"bf16": True, "channels_last": True}}
    assert deployment_options(_model()) == {} and deployment_options(object()) == {}


def test_cli_certify_uses_the_checkpoint_deployment(tmp_path, capsys):
    """Through a saved checkpoint: the metadata survives save/load and the CLI's default defense
    (double masking for a global classifier) and an explicit ``--defense double-masking`` use it."""
    m = _model()
    ck = tmp_path / "m.safetensors"
    save_checkpoint(ck, m, classes=["a", "b", "c"], deployment=DEPLOY)
    assert load_model(ck).checkpoint_meta["deployment"] == DEPLOY
    for extra in ([], ["--defense", "double-masking:k=2"]):
        out = tmp_path / f"run{len(extra)}"
        rc = main(["certify", "--model", str(ck), "--dataset", "synthetic", "--dataset-cfg", "{\"num_classes\": 3}", "-n", "2", "--patch", "5x5",
                   "--square-cap", "0", "--out", str(out), "--no-progress", *extra])
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert [r["defense"] for r in summary["results"]] == [
            "double-masking(k=6,bf16,channels_last)" if not extra else "double-masking(k=2,bf16,channels_last)"]
    capsys.readouterr()


def test_shipped_doublemask_records_its_measured_deployment(shared_data):
    """The shipped model (v5, a weight average of v4 and two fine-tunes of it) carries the
    measurement behind its bf16 + channels_last + flip default and the files it averages, and on
    a few test images that deployment gives float32's predictions and certificates (the
    session-11 measurement: 0 of 128 differ); v4, v3 and v2 keep their own measurements, v1 none."""
    from patchcert.checkpoint import file_sha256
    from patchcert.data import load_dataset
    from patchcert.pretrained import load_pretrained, pretrained_path

    model = load_pretrained("doublemask_cifar10")
    dep = model.checkpoint_meta["deployment"]["double-masking"]
    assert dep["options"] == {"bf16": True, "channels_last": True, "flip": True} and "0 of 128" in dep["evidence"]
    assert "session 11" in dep["evidence"] and "v5_agree128" in dep["evidence"]
    soup = model.checkpoint_meta["soup"]["inputs"]
    assert [s["file"] for s in soup] == ["doublemask_cifar10_v4.safetensors", "model.safetensors", "model.safetensors"]
    assert soup[0]["sha256"] == file_sha256(pretrained_path("doublemask_cifar10_v4"))
    assert "deployment" not in load_pretrained("doublemask_cifar10_v1").checkpoint_meta
    v4 = load_pretrained("doublemask_cifar10_v4").checkpoint_meta["deployment"]["double-masking"]
    assert v4["options"] == {"bf16": True, "channels_last": True}
    assert "session 9" in v4["evidence"] and "greedy_ft2_agree128" in v4["evidence"]
    v3 = load_pretrained("doublemask_cifar10_v3").checkpoint_meta["deployment"]["double-masking"]
    assert v3["options"] == v4["options"] and "session 8" in v3["evidence"] and "session 9" not in v3["evidence"]
    v2 = load_pretrained("doublemask_cifar10_v2").checkpoint_meta["deployment"]["double-masking"]
    assert v2["options"] == v4["options"] and "session 8" not in v2["evidence"] and "session 9" not in v2["evidence"]
    data = load_dataset("cifar10", shared_data, train=False)
    run = certify_dataset(model, data, defenses=["double-masking", "double-masking:bf16=false,channels_last=false"],
                          patches=["5x5"], num_examples=4, batch_size=4, square_cap=0)
    fast, exact = "double-masking(k=6,bf16,channels_last,flip)", "double-masking(k=6,flip)"
    for r in run.records:
        assert r.defenses[fast].pred == r.defenses[exact].pred
        assert r.defenses[fast].certified == r.defenses[exact].certified
