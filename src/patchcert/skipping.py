"""Unreadable images a certify run skips (``skip_bad_images``): ``RUN/skipped.jsonl``.

One JSON object per line, ``{"index": dataset index, "reason": one line}``, in the order of the
run. A batch's skipped images are written before its records, so a resumed run keeps only the
entries its records reach (the batch after them is read again) and rewrites the rest of the run
byte for byte as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from . import rundir
from .checkpoint import atomic_write_bytes
from .errors import PatchcertError
from .selection import dataset_indices

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.jsonl"  # unreadable images skipped by skip_bad_images, one JSON object per line


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"))


def resume_skipped(data: Any, run_dir: Path, first: int, total: int, done: Sequence[int]) -> list[dict[str, Any]]:
    """The unreadable images an interrupted run in ``run_dir`` skipped, as far as its records
    (``done``, dataset indices) reach; entries past them are dropped from the file. The run covers
    positions ``first, first + 1, ...`` of ``data`` (of a selection, if any), ``total`` of them."""
    p = run_dir / SKIPPED_FILE
    if not p.exists():
        return []
    entries = rundir.read_jsonl(p, tail="repair")
    if not all(isinstance(e.get("index"), int) and isinstance(e.get("reason"), str) for e in entries):
        raise PatchcertError(f"cannot resume {run_dir}: {SKIPPED_FILE} is corrupt")
    have = set(done) | {int(e["index"]) for e in entries}
    window = dataset_indices(data, torch.arange(first, first + min(len(done) + len(entries), total))).tolist()
    end = 0
    while end < len(window) and window[end] in have:
        end += 1
    reach = set(window[:end])
    keep = [e for e in entries if int(e["index"]) in reach]
    if len(keep) != len(entries):
        atomic_write_bytes(p, "".join(_line(e) + "\n" for e in keep).encode())
    return keep


def not_recorded(data: Any, nxt: int, pos: torch.Tensor, batch_records: list, bad: list[dict[str, Any]]
                 ) -> tuple[list, list[dict[str, Any]]]:
    """The records and skipped images (``{index, reason}``, dataset indices) of the batch at
    positions ``pos`` from position ``nxt`` on (a resumed run reads its last batch again). ``bad``
    holds the batch's unreadable images by position; ``batch_records`` are the rest, in order."""
    bad_pos = {int(e["index"]) for e in bad}
    rec_pos = [p for p in pos.tolist() if p not in bad_pos]
    new = [r for r, p in zip(batch_records, rec_pos) if p >= nxt]
    late = [e for e in bad if int(e["index"]) >= nxt]
    didx = dataset_indices(data, torch.tensor([int(e["index"]) for e in late], dtype=torch.int64)).tolist()
    return new, [{"index": int(i), "reason": e["reason"]} for i, e in zip(didx, late)]


def record_skipped(run_dir: Path | None, entries: list[dict[str, Any]]) -> None:
    """Append ``entries`` to ``run_dir/skipped.jsonl`` (before the batch's records) and log them."""
    if run_dir is not None and entries:
        rundir.append_jsonl(run_dir / SKIPPED_FILE, [_line(e) for e in entries])
    for e in entries:
        log.warning("skipped example %d: %s", e["index"], e["reason"])
