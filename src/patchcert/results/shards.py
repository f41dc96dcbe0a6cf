"""Run directories: status, loading a finished run, and merging the shards of a sharded run
(``RUN/shard-i-of-n/``) into one run byte-identical to a single run's."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import PatchcertError, not_found
from ..rundir import hold, read_json, write_json
from .files import CONFIG_FILE, PROGRESS_FILE, RECORDS_FILE, SCORES_FILE, SUMMARY_FILE
from .records import ExampleRecord, iter_records, read_records
from .scores import load_scores, save_scores
from .summary import ResultRow, RunMetadata, Summary, SummaryCounter, read_summary, write_summary

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_dirname(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}"


def find_shards(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Shard sub-directories ``shard-i-of-n`` of a run (all of one ``n``), by ``i``."""
    d = Path(run_dir)
    found: dict[int, dict[int, Path]] = {}
    if d.is_dir():
        for c in d.iterdir():
            m = _SHARD_RE.match(c.name)
            if m and c.is_dir():
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = c
    if len(found) > 1:
        raise PatchcertError(f"{d}: shards of different splits ({', '.join(f'n={k}' for k in sorted(found))})")
    if not found:
        return {}
    n, shards = next(iter(found.items()))
    missing = [i for i in range(n) if i not in shards]
    if missing:
        raise PatchcertError(f"{d}: shard(s) {', '.join(map(str, missing))} of {n} are missing")
    return dict(sorted(shards.items()))


def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"complete": bool, "done": int, "total": int | None, "shards": {i: status} | None}``."""
    d = Path(run_dir)
    prog_p, sum_p = d / PROGRESS_FILE, d / SUMMARY_FILE
    prog = read_json(prog_p) if prog_p.is_file() else {}
    # summary.json is written last, after every record: with no progress.json (a hand-made or
    # copied run) it alone says the run is finished
    complete = sum_p.is_file() and bool(prog.get("complete", True) if not prog_p.is_file() else prog.get("complete"))
    st: dict[str, Any] = {"complete": complete, "done": int(prog.get("done", 0)), "total": prog.get("total"),
                          "shards": None}
    if not complete and not sum_p.is_file() and not prog:
        shards = find_shards(d) if d.is_dir() else {}
        if shards:
            st["shards"] = {i: run_status(p) for i, p in shards.items()}
            st["done"] = sum(s["done"] for s in st["shards"].values())
            tot = [s["total"] for s in st["shards"].values()]
            st["total"] = None if any(t is None for t in tot) else sum(tot)
    return st


def load_run(run_dir: str | os.PathLike, require_complete: bool = True) -> tuple[Summary, list[ExampleRecord]]:
    """Summary and records of a finished run; a clear error for an unfinished or unmerged one."""
    d = Path(run_dir)
    if not d.is_dir():
        raise PatchcertError(not_found("run directory", d, folder=True))
    st = run_status(d)
    if not st["complete"] and require_complete:
        if st["shards"]:
            if all(s["complete"] for s in st["shards"].values()):
                raise PatchcertError(f"{d} holds finished shards that are not merged: run patchcert certify --merge {d}")
            todo = [str(i) for i, s in st["shards"].items() if not s["complete"]]
            raise PatchcertError(f"{d} is incomplete: shard(s) {', '.join(todo)} unfinished "
                                 f"({st['done']}/{st['total']} examples)")
        if not (d / RECORDS_FILE).exists() and not (d / PROGRESS_FILE).exists():
            raise PatchcertError(f"{d} is not a patchcert certify run (no records.jsonl)")
        raise PatchcertError(f"{d} is incomplete ({st['done']}/{st['total']} examples): "
                             f"finish it with patchcert certify --resume --out {d} (same options)")
    summary = read_summary(d)
    records = read_records(d / RECORDS_FILE)
    if len(records) != summary.n:
        raise PatchcertError(f"{d}: summary says {summary.n} examples but records.jsonl holds {len(records)}")
    return summary, records


def _comparable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("shard",)}


def merge_shards(run_dir: str | os.PathLike, write: bool = True,
                 keep_records: bool = True) -> tuple[Summary, list[ExampleRecord]]:
    """Join ``RUN/shard-i-of-n/`` into ``RUN/records.jsonl`` + ``summary.json`` (+ csv, progress,
    config, and ``scores.safetensors`` when every shard saved scores).

    Every shard must be complete and made with the same configuration (apart from the shard).
    The merged records are those of a single run (same order, same bytes): shard i holds the
    i-th contiguous block of the run's batches, so the shards are joined in shard order (a
    score file's indices need not be sorted). Timing is the per-image average over all shards.
    Records are read one at a time and counted as they are written; ``keep_records=False``
    returns none (``[]``), so memory does not grow with the run (the CLI merges this way).
    ``write=False``: merge in memory only (for reports on unmerged runs).
    """
    d = Path(run_dir)
    if not write:
        return _merge(d, None, keep_records)[:2]
    with hold(d, "exclusive", option="run folder", clean=False):  # no shard may be running
        fd, tmp_name = tempfile.mkstemp(dir=d, prefix=f".{RECORDS_FILE}.", suffix=".merging")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                summary, records, shards, configs = _merge(d, out, keep_records)
                out.flush()
                os.fsync(out.fileno())
            _write_merged(d, shards, configs, summary, tmp)
        finally:
            tmp.unlink(missing_ok=True)
    return summary, records


def _merge(d: Path, out: Any, keep_records: bool):
    """Merge the shards of ``d``: ``(summary, records, shards, configs)``; each record's line is
    written to the text file ``out`` (if given) as it is read."""
    shards = find_shards(d)
    if not shards:
        raise PatchcertError(f"{d}: no shard directories (shard-i-of-n) to merge")
    n_sh = len(shards)
    configs, summaries = [], []
    for i, p in shards.items():
        st = run_status(p)
        if not st["complete"]:
            raise PatchcertError(f"cannot merge {d}: shard {i}/{n_sh} is incomplete ({st['done']}/{st['total']} "
                                 f"examples); finish it with --resume")
        # config.json says exactly what the records depend on; a run copied without it is
        # compared by its summary (model, dtype, defenses and patches) below
        configs.append(read_json(p / CONFIG_FILE) if (p / CONFIG_FILE).is_file() else {})
        summaries.append(read_summary(p))
    base = _comparable_config(configs[0])
    for i, c in enumerate(configs[1:], 1):
        if _comparable_config(c) != base:
            diff = sorted(k for k in set(base) | set(c) if base.get(k) != c.get(k) and k != "shard")
            raise PatchcertError(f"cannot merge {d}: shard {i} was made with different options ({', '.join(diff)})")
    sig = [([(r.defense, r.patch) for r in s.results], s.metadata.model_sha256, s.metadata.dtype) for s in summaries]
    for i, g in enumerate(sig[1:], 1):
        if g != sig[0]:
            raise PatchcertError(f"cannot merge {d}: shard {i} was made with a different model, dtype, defenses or "
                                 "patches")

    # timing: per-image averages weighted by shard size
    def wavg(vals: list[tuple[float | None, int]]) -> float | None:
        vs = [(v, k) for v, k in vals if v is not None]
        tot = sum(k for _, k in vs)
        return sum(v * k for v, k in vs) / tot if vs and tot else None

    s0 = summaries[0]
    template = []
    for j, r in enumerate(s0.results):
        t = ResultRow.from_json(r.to_json())
        t.certify_seconds_per_image = wavg([(s.results[j].certify_seconds_per_image, s.n) for s in summaries])
        template.append(t)

    counter = SummaryCounter(template)
    seen: set[int] = set()
    records: list[ExampleRecord] = []
    for i, p in shards.items():
        n_before = counter.n
        for rec in iter_records(p / RECORDS_FILE):
            if rec.index in seen:
                raise PatchcertError(f"cannot merge {d}: shards overlap (example {rec.index} is in more than one)")
            seen.add(rec.index)
            counter.add((rec,))
            if out is not None:
                out.write(rec.to_line() + "\n")
            if keep_records:
                records.append(rec)
        if counter.n - n_before != summaries[i].n:
            raise PatchcertError(f"cannot merge {d}: shard {i} says {summaries[i].n} examples but its "
                                 f"records.jsonl holds {counter.n - n_before}")
    total = configs[0].get("total")
    skipped = [x for s in summaries for x in s.metadata.skipped]  # shard order: the single run's order
    if total is not None and counter.n + len(skipped) != int(total):
        raise PatchcertError(f"cannot merge {d}: shards hold {counter.n} examples"
                             + (f" and {len(skipped)} skipped" if skipped else "") + f", the run selects {total}")

    md = RunMetadata.from_json(s0.metadata.to_json())
    md.shard = None
    md.merged_from = n_sh
    md.skipped = skipped
    md.num_examples = counter.n
    md.forward_seconds_per_image = wavg([(s.metadata.forward_seconds_per_image, s.n) for s in summaries])
    md.indices = [counter.first_index, counter.last_index] if counter.n else []
    dsp: dict[str, dict[str, float | None]] = {}
    for key, parts in s0.metadata.defense_seconds_per_image.items():
        dsp[key] = {part: wavg([(s.metadata.defense_seconds_per_image.get(key, {}).get(part), s.n) for s in summaries])
                    for part in parts}
    md.defense_seconds_per_image = dsp
    return counter.summary(md), records, shards, configs


def _write_merged(d: Path, shards: dict[int, Path], configs: list[dict[str, Any]], summary: Summary,
                  records_tmp: Path) -> None:
    from datetime import datetime, timezone

    n_sh = len(shards)
    summary.metadata.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for f in (SUMMARY_FILE, PROGRESS_FILE):
        (d / f).unlink(missing_ok=True)  # incomplete until the end
    os.chmod(records_tmp, 0o644)
    os.replace(records_tmp, d / RECORDS_FILE)
    cfg = dict(configs[0])
    cfg["shard"] = None
    write_json(d / CONFIG_FILE, cfg)
    parts = [p / SCORES_FILE for p in shards.values()]
    if all(p.is_file() for p in parts):
        sfs = [load_scores(p) for p in parts]  # shard order is the single run's order
        meta = dict(sfs[0].meta)
        meta.pop("shard", None)
        save_scores(d / SCORES_FILE, torch.cat([s.scores for s in sfs]), torch.cat([s.labels for s in sfs]),
                    torch.cat([s.indices for s in sfs]), meta)
    elif any(p.is_file() for p in parts):
        log.warning("only some shards saved scores; %s/%s not written", d, SCORES_FILE)
    write_summary(d, summary)
    write_json(d / PROGRESS_FILE, {"done": summary.n, "total": summary.n, "complete": True,
                                   "merged_from": n_sh})
