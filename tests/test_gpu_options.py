"""GPU-ready options (issue 10 part 2), checked on the CPU: which path each option takes.

TF32 (allowed while training if ``tf32 = true``, always off while evaluating and certifying,
the caller's flags restored), ``cudnn_benchmark``, ``torch.compile``, ``nn.SyncBatchNorm`` on
CUDA vs the gloo-compatible BatchNorm on CPU, bf16 autocast on either device. The CUDA kernels
themselves cannot run here; what is tested is the plumbing that selects them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from patchcert.certify import certify_dataset
from patchcert.data import synthetic_dataset
from patchcert.errors import PatchcertError
from patchcert.models import create_model
from patchcert.runtime import math_mode, precise_math
from patchcert.train import TrainConfig, train
from patchcert.train.loop import _SyncBatchNorm, autocast, sync_batchnorm

TINY = dict(model="bagcert_cifar", model_cfg={"rf": 5, "width": 4}, dataset="synthetic", epochs=1, batch_size=16,
            warmup_epochs=0.5, eval_examples=16, max_train_examples=32, seed=1, num_threads=1)


def _flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


@pytest.fixture
def restore_flags():
    saved = _flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


class _FlagSpy(nn.Module):
    """Wraps a model; records the TF32/benchmark flags and the grad mode at every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, bool, bool, bool]] = []
        for k in ("geometry", "num_classes", "arch", "config"):
            if hasattr(inner, k):
                setattr(self, k, getattr(inner, k))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((*_flags(), torch.is_grad_enabled()))
        return self.inner.score_map(x)

    def map_size(self, image_size):
        return self.inner.map_size(image_size)


def test_math_mode_sets_and_restores_flags_even_after_an_error(restore_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    with precise_math():
        assert _flags() == (False, False, False)
    assert _flags() == (True, True, True)
    with pytest.raises(RuntimeError):
        with math_mode(tf32=False, cudnn_benchmark=None):
            assert _flags() == (False, False, True)  # None leaves the benchmark flag alone
            raise RuntimeError("boom")
    assert _flags() == (True, True, True)


def test_certification_turns_tf32_off_and_restores_the_callers_setting(restore_flags):
    torch.manual_seed(0)
    model = _FlagSpy(create_model("bagcert_cifar", num_classes=4, rf=5, width=4))
    data = synthetic_dataset(8, 4, 32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # e.g. left on by training
    run = certify_dataset(model, data, defenses=["voting"], patches=["3x3"], batch_size=4, square_cap=0)
    assert run.summary.n == 8 and len(model.seen) == 2
    assert all(s[:3] == (False, False, False) and not s[3] for s in model.seen)  # TF32 off, no autotuning, no_grad
    assert _flags()[:2] == (True, True)  # and the caller's flags are back


def test_training_with_tf32_allows_it_for_the_steps_only(restore_flags, tmp_path, monkeypatch):
    from patchcert.defenses.voting import Voting as VotingDefense
    from patchcert.train.objectives import BagCertObjective

    steps: list[tuple[bool, bool, bool]] = []
    evals: list[tuple[bool, bool, bool]] = []
    real_loss, real_predict = BagCertObjective.loss, VotingDefense.predict

    def loss_spy(self, out, labels):
        steps.append(_flags())
        return real_loss(self, out, labels)

    def predict_spy(self, scores):
        evals.append(_flags())
        return real_predict(self, scores)

    monkeypatch.setattr(BagCertObjective, "loss", loss_spy)
    monkeypatch.setattr(VotingDefense, "predict", predict_spy)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    train(TrainConfig(**TINY, tf32=True, cudnn_benchmark=True, out_dir=str(tmp_path / "a")))
    assert steps and all(f == (True, True, True) for f in steps)  # every training step: TF32 + autotuning
    assert evals and all(f == (False, False, False) for f in evals)  # evaluation: TF32 off
    assert _flags() == (False, False, False)  # restored when train() returns
    steps.clear()
    train(TrainConfig(**TINY, out_dir=str(tmp_path / "b")))  # default: TF32 off while training too
    assert steps and all(f[:2] == (False, False) for f in steps)


def test_compile_option_compiles_the_trained_module(tmp_path, monkeypatch):
    calls: list[nn.Module] = []

    def fake_compile(m, *a, **kw):
        calls.append(m)
        return m

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(TrainConfig(**TINY, out_dir=str(tmp_path / "plain")))
    assert calls == []
    train(TrainConfig(**TINY, compile=True, out_dir=str(tmp_path / "compiled")))
    assert len(calls) == 1 and calls[0].__class__.__name__ == "BagCertNet"
    # performance options do not block a resume
    cfg = TrainConfig(**{**TINY, "epochs": 2}, out_dir=str(tmp_path / "r"))
    train(cfg, stop_after_epoch=1)
    train(TrainConfig(**{**TINY, "epochs": 2}, compile=True, cudnn_benchmark=True, data_workers=2,
                      out_dir=str(tmp_path / "r")), resume=True)
    with pytest.raises(PatchcertError, match="tf32"):
        train(TrainConfig(**{**TINY, "epochs": 2}, tf32=True, out_dir=str(tmp_path / "r")), resume=True)


def test_sync_batchnorm_uses_torch_syncbn_on_cuda_and_the_gloo_one_on_cpu(monkeypatch):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    keys = list(net.state_dict())
    out = sync_batchnorm(net, torch.device("cpu"))
    assert out is net and [type(m) for m in net if isinstance(m, nn.BatchNorm2d)] == [_SyncBatchNorm] * 2
    assert list(net.state_dict()) == keys

    net2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    keys2 = list(net2.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm  # runs on CPU (only its forward needs CUDA)
    calls = []

    def spy(module, process_group=None):
        calls.append(module)
        return converted(module, process_group)

    monkeypatch.setattr(nn.SyncBatchNorm, "convert_sync_batchnorm", staticmethod(spy))
    out2 = sync_batchnorm(net2, torch.device("cuda", 0))
    assert calls[0] is net2 and isinstance(out2[1], nn.SyncBatchNorm) and list(out2.state_dict()) == keys2


def test_bf16_autocast_is_the_same_call_on_cuda_and_cpu(tmp_path, monkeypatch):
    made = []
    real = torch.autocast

    class Spy:
        def __init__(self, device_type, dtype=None, enabled=True, **kw):
            made.append((device_type, dtype, enabled))
            self._ctx = real(device_type="cpu", dtype=dtype, enabled=enabled and device_type == "cpu")

        def __enter__(self):
            return self._ctx.__enter__()

        def __exit__(self, *exc):
            return self._ctx.__exit__(*exc)

    monkeypatch.setattr(torch, "autocast", Spy)
    with autocast(torch.device("cuda", 0), True):
        pass
    assert made == [("cuda", torch.bfloat16, True)]
    made.clear()
    train(TrainConfig(**TINY, bf16=True, out_dir=str(tmp_path / "bf16")))
    assert made and all(m == ("cpu", torch.bfloat16, True) for m in made)  # training steps and evaluation


def test_cuda_requests_are_one_line_errors_without_cuda_or_bf16(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(PatchcertError, match="CUDA is not available"):
            train(TrainConfig(**TINY, device="cuda", out_dir=str(tmp_path / "x")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(PatchcertError, match="bf16 autocast is not supported on Old GPU"):
        train(TrainConfig(**TINY, device="cuda", bf16=True, out_dir=str(tmp_path / "y")))
    assert not Path(tmp_path / "y").exists()
