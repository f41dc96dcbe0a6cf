"""The run loop (:func:`run_batches`) and where its records go (:class:`RecordSink`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Protocol, Sequence, TypeVar

from ..results.files import PROGRESS_FILE, RECORDS_FILE
from ..rundir import write_json

__all__ = ["BatchResult", "RecordSink", "Tally", "run_batches"]

B = TypeVar("B")
R = TypeVar("R")


class _Record(Protocol):
    def to_line(self) -> str: ...


class Tally(Protocol):
    """A counter of records (``add`` is called once per batch with its new records)."""

    def add(self, records: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """What a per-batch function returns: the batch's new records, and how many planned
    examples the batch settled (``done``: the records plus any examples it skipped)."""

    records: list[R]
    done: int


@dataclass
class RecordSink:
    """A run folder's record stream: after every batch its records are appended to
    ``RUN/records.jsonl`` (one write, flush, fsync) and then ``RUN/progress.json`` is rewritten
    atomically with ``{"done", "total", "complete", "timing"}``: a run killed at any moment
    resumes from its last whole batch. ``timing``: the run's accumulated timing (read at
    every write)."""

    run_dir: Path
    total: int
    timing: Callable[[], dict[str, float]] = field(default=dict)

    def start(self, done: int) -> None:
        """Open the stream (a new run, or a resumed one with ``done`` examples settled)."""
        (self.run_dir / RECORDS_FILE).touch()
        self._progress(done, False)

    def write(self, records: Sequence[_Record], done: int) -> None:
        from .. import results  # the writer is looked up on the package: patchcert.results.append_jsonl

        if records:
            results.append_jsonl(self.run_dir / RECORDS_FILE, [r.to_line() for r in records])
        self._progress(done, False)

    def finish(self, done: int) -> None:
        self._progress(done, True)

    def _progress(self, done: int, complete: bool) -> None:
        write_json(self.run_dir / PROGRESS_FILE, {"done": done, "total": self.total, "complete": complete,
                                                  "timing": dict(self.timing())})


def run_batches(batches: Iterable[B], step: Callable[[B], BatchResult[R]], *, tally: Tally, total: int,
                done: int = 0, sink: RecordSink | None = None, keep: list[R] | None = None,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Run ``step`` on every planned batch, in order: each batch's records are written to
    ``sink`` (if any), counted in ``tally``, appended to ``keep`` (if given; else dropped once
    counted) and reported to ``progress(done, total)``. ``done``: examples settled before
    (a resumed run). Returns the examples settled at the end."""
    if progress is not None:
        progress(done, total)
    for b in batches:
        out = step(b)
        done += out.done
        if sink is not None:
            sink.write(out.records, done)
        tally.add(out.records)
        if keep is not None:
            keep.extend(out.records)
        if progress is not None:
            progress(done, total)
    return done
