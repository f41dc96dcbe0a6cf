"""Certification results: typed records, summaries, and the run-directory format.

A certify run directory (``patchcert certify --out RUN``) holds::

    config.json        what determines the records (model hash, data selection, defenses,
                       patches, dtype, batch size, square cap, shard); checked on --resume
    records.jsonl      one ExampleRecord per line, appended (flush + fsync) after every batch
    progress.json      {"done", "total", "complete", "timing"}: rewritten after every batch
    summary.json       written atomically, and only when every example is done
    summary.csv        one row per (defense, patch), written with summary.json
    scores.safetensors optional (--save-scores): the score maps, see ScoreFile

A run is complete iff ``summary.json`` exists and ``progress.json`` says ``complete``;
:func:`load_run` refuses anything else. Sharded runs (``--shard i/n`` or torchrun) write the
same files to ``RUN/shard-i-of-n/``; :func:`merge_shards` joins them into ``RUN/`` with records
byte-identical to a single run's.

One record (``records.jsonl`` line; PATCH is the patch spec as written, KEY the defense key)::

    {"index": 17, "label": 3, "clean_pred": 3,
     "defenses": {"voting(sign,3.2)": {
         "pred": 3, "correct": true,
         "certified": {"5x5": true},
         "worst": {"5x5": {"margin": 12.0, "window": [11, 11], "row": 4, "col": 0, "class": 5}},
         "largest_square": 7,
         "shapes": {"area=24": {"1x24": false, "2x12": true, ...}}}}}

``worst[PATCH]`` is the defense's ``certify_details`` worst case: the smallest margin over the
patch's windows, placements and competing classes (``> 0`` certified; ``== 0`` certified iff
``class > label``); ``window`` the feature window ``[wh, ww]``, ``row``/``col`` the top-left cell
of the placement on the score map (``-1`` when the worst case is not a placement: a window
larger than the map, or an image already misclassified), ``class`` the competing class (-1 if
none). A non-finite margin (``-inf``: not certifiable at all) is written as null. ``shapes`` is
present only for patch specs that allow several pixel rectangles (``area=A``) and says, per
rectangle, whether the image is certified against that rectangle alone. ``largest_square`` is
null when the run was made with ``square_cap=0``.

The package's modules: :mod:`.files` (file names), :mod:`.records` (per-example records),
:mod:`.summary` (summaries and the streaming counter), :mod:`.scores` (the score file),
:mod:`.shards` (run status, loading and shard merging), :mod:`.attacks` (attack records and
their streaming counter). Every public name is importable from
``patchcert.results``.
"""

from __future__ import annotations

from ..rundir import append_jsonl, read_json, write_json  # noqa: F401  (append_jsonl: the records' writer)
from .attacks import AttackCounter, AttackDefenseOutcome, AttackOutcome, AttackRecord, attack_record
from .files import (
    CONFIG_FILE,
    FORMAT_VERSION,
    PROGRESS_FILE,
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_CSV,
    SUMMARY_FILE,
    TIMING_FIELDS,
)
from .records import (
    TABLE_FIELDS,
    DefenseOutcome,
    ExampleRecord,
    MaskPairCase,
    WorstCase,
    append_records,
    iter_records,
    read_records,
    records_table,
    records_to_jsonl,
    repair_records,
)
from .scores import ScoreFile, load_scores, save_scores
from .shards import find_shards, load_run, merge_shards, run_status, shard_dirname
from .summary import (
    ResultRow,
    RunMetadata,
    Summary,
    SummaryCounter,
    read_summary,
    square_curves,
    summarize,
    write_summary,
)

__all__ = [
    "FORMAT_VERSION",
    "RECORDS_FILE",
    "SUMMARY_FILE",
    "SUMMARY_CSV",
    "PROGRESS_FILE",
    "CONFIG_FILE",
    "SCORES_FILE",
    "TIMING_FIELDS",
    "WorstCase",
    "MaskPairCase",
    "DefenseOutcome",
    "ExampleRecord",
    "ResultRow",
    "SummaryCounter",
    "RunMetadata",
    "Summary",
    "ScoreFile",
    "load_scores",
    "save_scores",
    "records_to_jsonl",
    "records_table",
    "TABLE_FIELDS",
    "append_records",
    "read_records",
    "iter_records",
    "repair_records",
    "summarize",
    "square_curves",
    "write_summary",
    "read_summary",
    "read_json",
    "write_json",
    "run_status",
    "load_run",
    "shard_dirname",
    "find_shards",
    "merge_shards",
    "AttackRecord",
    "AttackDefenseOutcome",
    "AttackOutcome",
    "AttackCounter",
    "attack_record",
]
