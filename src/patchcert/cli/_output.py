"""The one shape of every verb's ``--json``: a single JSON object on the last line of stdout,
``{"verb": VERB, "results": [one object per row], ...}`` plus the verb's own keys:

* ``certify``: ``"n"``, ``"out_dir"``; a row: defense, patch, clean_accuracy, certified_accuracy;
* ``attack``: ``"n"``, ``"soundness_failures"``, ``"out_dir"``; a row adds robust_accuracy,
  attack_success_rate, soundness_failures;
* ``report``: ``"files"``; a row per run x defense x patch;
* ``models``: ``"pretrained"`` (the shipped models); a row per registered model;
* ``train``: ``"out_dir"``; one row, the final metrics;
* ``convert``: ``"out"``; one row, the converted checkpoint.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["print_json"]


def print_json(verb: str, results: list[Any], **extra: Any) -> None:
    sys.stdout.flush()
    print(json.dumps({"verb": verb, "results": results, **extra}, sort_keys=False, default=str), flush=True)
