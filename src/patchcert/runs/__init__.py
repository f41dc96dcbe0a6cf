"""The one run loop: planned source -> per-batch function -> typed records -> counter.

Every verb that walks a dataset (``certify``, ``attack``, the training loop's evaluation) is
the same loop, :func:`run_batches`: it takes the batches its caller planned (the source:
positions of a selection, read by :func:`patchcert.loader.load_batches`, or cached score
maps), calls the caller's per-batch function, which returns typed records
(:class:`~patchcert.results.ExampleRecord`, :class:`~patchcert.results.AttackRecord`), streams
them to the run folder (:class:`RecordSink`: ``records.jsonl`` appended durably, then
``progress.json``), counts them in the caller's counter (:class:`~patchcert.results.SummaryCounter`,
:class:`~patchcert.results.AttackCounter`) and keeps them in memory only if asked, so a long
run's memory does not grow with its length. The verbs differ only in their per-batch function
and their counter. A run folder is held for the whole run by :func:`hold_run` (sharded or not).
"""

from __future__ import annotations

from .folder import hold_run
from .loop import BatchResult, RecordSink, Tally, run_batches

__all__ = ["BatchResult", "RecordSink", "Tally", "hold_run", "run_batches"]
