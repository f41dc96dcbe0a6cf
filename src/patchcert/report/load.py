"""Loading finished certify runs (shards merged in memory) and attack runs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import PatchcertError, not_found
from ..results import (
    AttackRecord,
    attack_record,
    RECORDS_FILE,
    SUMMARY_FILE,
    ExampleRecord,
    Summary,
    find_shards,
    merge_shards,
    read_json,
    read_records,
    read_summary,
    summarize,
)
from ..rundir import read_jsonl

log = logging.getLogger(__name__)


# -- loading -----------------------------------------------------------------------------

@dataclass
class CertifyRunData:
    """A finished certify run (shards merged): ``summary``, ``records`` in index order."""

    path: Path
    summary: Summary
    records: list[ExampleRecord]
    shards: int = 0  # number of shards merged (0: a single directory)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name or str(self.path)


@dataclass
class AttackRunData:
    """A finished ``patchcert attack`` run: its summary (dict) and typed records."""

    path: Path
    summary: dict[str, Any]
    records: list[AttackRecord]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name or str(self.path)


def _is_attack_summary(d: Path) -> bool:
    try:
        s = json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and isinstance(s.get("metadata"), dict) and s["metadata"].get("kind") == "attack"


def _load_single(d: Path) -> CertifyRunData:
    if _is_attack_summary(d):
        raise PatchcertError(f"{d} is a patchcert attack run; pass it with --attack DIR")
    summary = read_summary(d)
    if not (d / RECORDS_FILE).is_file():
        raise PatchcertError(f"{d}: summary.json but no records.jsonl (a damaged run?)")
    records = read_records(d / RECORDS_FILE)
    if len(records) != summary.n:
        raise PatchcertError(f"{d} is incomplete: summary.json says {summary.n} examples but records.jsonl "
                             f"holds {len(records)}")
    idx = [r.index for r in records]
    if len(set(idx)) != len(idx):
        raise PatchcertError(f"{d}: records.jsonl holds duplicate example indices")
    keys = {(r.defense, r.patch) for r in summary.results}
    for r in records:
        for key, patch in keys:
            o = r.defenses.get(key)
            if o is None or patch not in o.certified:
                raise PatchcertError(f"{d}: record {r.index} has no result for {key} / {patch!r}")
    records = sorted(records, key=lambda r: r.index)
    # the records are the truth; a summary that disagrees with them is a damaged run
    again = summarize(records, summary.results, summary.metadata)
    for a, b in zip(summary.results, again.results):
        if abs(a.clean_accuracy - b.clean_accuracy) > 1e-9 or abs(a.certified_accuracy - b.certified_accuracy) > 1e-9:
            raise PatchcertError(f"{d}: summary.json disagrees with records.jsonl for {a.defense} / {a.patch!r} "
                                 f"(certified {a.certified_accuracy:.6g} vs {b.certified_accuracy:.6g})")
        if b.shapes and not a.shapes:
            a.shapes = b.shapes
    return CertifyRunData(d, summary, records)


def load_certify_run(path: str | os.PathLike) -> CertifyRunData:
    """Load a finished certify run; shard directories ``RUN/shard-i-of-n/`` are merged in memory.

    Refuses (one-line :class:`PatchcertError`) a missing directory, a run without
    ``summary.json`` (unfinished), a record count that does not match the summary, missing
    or unfinished shards, and shards made with different models, defenses or patches.
    """
    d = Path(path)
    if not d.is_dir():
        raise PatchcertError(not_found("run directory", d, folder=True))
    if (d / SUMMARY_FILE).is_file():
        return _load_single(d)
    shards = find_shards(d)
    if not shards:
        if (d / RECORDS_FILE).exists():
            try:
                done = len(read_records(d / RECORDS_FILE, allow_partial_tail=True))
            except PatchcertError:
                done = "?"
            raise PatchcertError(f"{d} is incomplete: no summary.json ({done} records so far); finish it with "
                                 f"patchcert certify --resume --out {d} (same options)")
        raise PatchcertError(f"{d} is not a patchcert certify run (no summary.json or records.jsonl)")
    for i, p in shards.items():
        if not (p / SUMMARY_FILE).is_file():
            raise PatchcertError(f"{d} is incomplete: shard {i} of {len(shards)} has no summary.json (unfinished)")
    summary, records = merge_shards(d, write=False)  # the one shard-merging implementation (results.py)
    return CertifyRunData(d, summary, sorted(records, key=lambda r: r.index), shards=len(shards))


def load_attack_run(path: str | os.PathLike) -> AttackRunData:
    """Load a finished ``patchcert attack`` run (one-line error if unfinished or not one)."""
    d = Path(path)
    if not d.is_dir():
        raise PatchcertError(not_found("attack run directory", d, folder=True))
    if not (d / SUMMARY_FILE).is_file():
        if (d / RECORDS_FILE).exists():
            raise PatchcertError(f"{d} is incomplete: no summary.json; finish it with patchcert attack --resume --out {d}")
        raise PatchcertError(f"{d} is not a patchcert attack run (no summary.json)")
    s = read_json(d / SUMMARY_FILE)
    if not (isinstance(s, dict) and isinstance(s.get("metadata"), dict) and s["metadata"].get("kind") == "attack"):
        raise PatchcertError(f"{d} is not a patchcert attack run (its summary.json is not an attack summary)")
    try:
        n = int(s["n"])
        for r in s["results"]:
            _ = (r["defense"], r["patch"], float(r["robust_accuracy"]), float(r["clean_accuracy"]))
    except (KeyError, TypeError, ValueError) as e:
        raise PatchcertError(f"{d / SUMMARY_FILE}: not an attack summary ({type(e).__name__}: {e})") from None
    raw = read_jsonl(d / RECORDS_FILE) if (d / RECORDS_FILE).is_file() else []
    records = [attack_record(d / RECORDS_FILE, i, r) for i, r in enumerate(raw)]
    if len(records) != n:
        raise PatchcertError(f"{d} is incomplete: summary.json says {n} examples but records.jsonl holds {len(records)}")
    return AttackRunData(d, s, records)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]
