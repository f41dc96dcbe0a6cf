"""Run-directory file names and the JSON helpers shared by records and summaries."""

from __future__ import annotations

import json
import math
from typing import Any

FORMAT_VERSION = 1
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.json"
SCORES_FILE = "scores.safetensors"

#: Fields that legitimately differ between two runs with identical records (wall-clock,
#: provenance of the invocation). Everything else in a summary is a function of the records.
TIMING_FIELDS = frozenset({
    "forward_seconds_per_image", "certify_seconds_per_image", "defense_seconds_per_image",
    "created", "command", "device", "shard", "merged_from", "versions",
})


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
