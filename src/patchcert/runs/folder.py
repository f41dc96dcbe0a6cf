"""Holding a run folder for the whole run (:func:`hold_run`), sharded or not."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

from .. import rundir
from ..errors import PatchcertError
from ..results.files import CONFIG_FILE, RECORDS_FILE
from ..results.shards import shard_dirname

__all__ = ["hold_run"]


def hold_run(stack: contextlib.ExitStack, out_dir: str | os.PathLike, writes: Sequence[str],
             shard: tuple[int, int] | None = None, lock: bool = True) -> Path:
    """Check the run folder's layout and hold it until ``stack`` closes; returns the folder the
    run writes to.

    ``writes``: the files (besides ``config.json`` and ``records.jsonl``) the run creates or
    rewrites: a folder of the user's that holds one of them and no run is refused, so nothing
    of theirs is overwritten. An unsharded run holds ``RUN`` exclusively; shard ``(i, n)``
    holds ``RUN`` shared and ``RUN/shard-i-of-n`` exclusively. ``lock=False``: the caller holds
    it already (a torchrun job)."""
    top = Path(out_dir)
    if shard is None and top.is_dir() and any(top.glob("shard-*-of-*")):
        raise PatchcertError(f"{top} holds a sharded run: continue it with --shard i/n, or merge it with "
                             f"patchcert certify --merge {top}")
    if shard is not None and (top / CONFIG_FILE).is_file() and not any(top.glob("shard-*-of-*")):
        raise PatchcertError(f"{top} holds an unsharded run; choose another --out for a sharded one")
    run_dir = top / shard_dirname(*shard) if shard else top
    if shard is not None and not any(top.glob("shard-*-of-*")):  # the merge will write these into RUN
        rundir.check_new_run(top, (CONFIG_FILE, RECORDS_FILE) + tuple(writes), markers=())
    rundir.check_new_run(run_dir, tuple(writes))  # a folder of the user's: nothing of theirs is overwritten
    if not lock:
        return rundir.prepare(run_dir)
    if shard is None:
        return stack.enter_context(rundir.hold(top))
    stack.enter_context(rundir.hold(top, "shared", clean=False))
    return stack.enter_context(rundir.hold(run_dir))
