"""scripts/average_checkpoints.py: the uniform weight average behind the shipped v5."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from patchcert.checkpoint import file_sha256, load_tensors, save_checkpoint
from patchcert.errors import PatchcertError
from patchcert.models import create_model, load_model

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("average_checkpoints", ROOT / "scripts" / "average_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ckpt(path: Path, seed: int, widths=(4, 8, 8), classes=3, **meta) -> Path:
    torch.manual_seed(seed)
    m = create_model("fastnet_cifar", widths=list(widths), stem=4, num_classes=classes)
    m.train()
    with torch.no_grad():  # BatchNorm statistics that differ between the inputs
        m(torch.rand(8, 3, 32, 32))
    save_checkpoint(path, m, write_json=False, classes=[f"c{i}" for i in range(classes)], epoch=seed,
                    metrics={"loss": float(seed)}, **meta)
    return path


def test_average_is_the_mean_of_every_float_tensor(tmp_path):
    avg = _script().average
    a, b, c = (_ckpt(tmp_path / f"{n}.safetensors", s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    out, meta = avg([a, b, c])
    ins = [load_tensors(p)[0] for p in (a, b, c)]
    for k, v in out.items():
        if v.is_floating_point():
            want = (ins[0][k].double() + ins[1][k].double() + ins[2][k].double()) / 3
            assert torch.equal(v, want.to(v.dtype)), k
        else:
            assert torch.equal(v, ins[0][k]), k  # num_batches_tracked: the first input's
    assert any(not torch.equal(out[k], ins[0][k]) for k in out if out[k].is_floating_point())
    assert [i["sha256"] for i in meta["soup"]["inputs"]] == [file_sha256(p) for p in (a, b, c)]
    assert "epoch" not in meta and "metrics" not in meta  # one run's training record does not describe the average
    assert meta["arch"] == "fastnet_cifar" and meta["classes"] == ["c0", "c1", "c2"]


def test_average_of_copies_is_the_model_and_loads(tmp_path):
    mod = _script()
    a = _ckpt(tmp_path / "a.safetensors", 5)
    out_path = tmp_path / "soup" / "model.safetensors"
    assert mod.main([str(out_path), str(a), str(a)]) == 0
    t, _ = load_tensors(out_path)
    t0, _ = load_tensors(a)
    assert all(torch.equal(t[k], t0[k]) for k in t0)
    m, m0 = load_model(out_path).eval(), load_model(a).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m0(x))


@pytest.mark.parametrize("other, match", [
    (dict(widths=(4, 8, 16)), "'config'"),
    (dict(classes=4), "'classes'"),
])
def test_mismatched_inputs_are_one_line_errors(tmp_path, other, match):
    avg = _script().average
    a = _ckpt(tmp_path / "a.safetensors", 1)
    b = _ckpt(tmp_path / "b.safetensors", 2, **other)
    with pytest.raises(PatchcertError, match=match) as e:
        avg([a, b])
    assert "\n" not in str(e.value)
    with pytest.raises(PatchcertError, match="at least two"):
        avg([a])


def test_cli_error_exits_non_zero_with_one_line(tmp_path, capsys):
    mod = _script()
    a = _ckpt(tmp_path / "a.safetensors", 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert mod.main([str(tmp_path / "o.safetensors"), str(a), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "o.safetensors").exists()
    # an existing output is never overwritten (it may be someone's run)
    before = a.read_bytes()
    assert mod.main([str(a), str(a), str(a)]) == 2
    assert "exists" in capsys.readouterr().err and a.read_bytes() == before
