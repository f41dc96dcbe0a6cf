"""Shared test setup: one torch thread (CI has 2 cores), deterministic hypothesis, data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path | None:
    """``$PATCHCERT_DATA``, else ``../shared/data`` next to the repository, else /work/shared/data."""
    cands = [os.environ.get("PATCHCERT_DATA"), str(REPO.parent / "shared" / "data"), "/work/shared/data"]
    for c in cands:
        if c and (Path(c) / "cifar-10-batches-py" / "test_batch").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = find_shared_data()
    if p is None:
        pytest.skip("shared data (../shared/data) not available")
    return p
