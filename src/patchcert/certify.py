"""Certification over a dataset: batched, resumable, sharded, with per-example records.

The data path is::

    images --model.score_map (once per batch)--> scores [B, K, H, W]
           --every defense x every patch--> ExampleRecord (one JSONL line per example)

:func:`certify_dataset` is the loop; :func:`certify_batch` certifies one batch of score maps
(pure: same maps in, same records out); :func:`largest_certified_square` finds, per image, the
largest certified square patch by a vectorised bisection over the square's window.

Batches are fixed slices of the selected examples (batch ``k`` = positions ``[k*B, (k+1)*B)``);
shard ``i`` of ``n`` is the contiguous run of batches ``[floor(i*nb/n), floor((i+1)*nb/n))``.
A shard, a resumed run and an uninterrupted run therefore push the very same batches through
the model, and their records are byte-identical (the merged shards included).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from . import rundir
from .checkpoint import load_tensors, save_tensors, versions
from .data import ImageSource, as_image_dataset, to_float
from .batch import Timer as _Timer
from .batch import batch_evidence, certify_batch
from .errors import PatchcertError
from .geometry import PatchSpec
from .planning import (
    DefensePlan,
    PatchPlan,
    build_defenses,
    check_sources,
    default_mask_shapes,
    plan_patches,
    plan_threat,
)
from .runs import BatchResult, RecordSink, hold_run, run_batches
from .runs.source import DTYPES, provenance as _provenance, resolve_dtype as _resolve_dtype  # noqa: F401
from .runs.source import Source as _Source, check_selection as _check_selection
from .runs.source import model_source as _model_source, score_source as _score_source
from .runtime import precise_math
from .selection import dataset_indices
from .skipping import SKIPPED_FILE, not_recorded, record_skipped, resume_skipped  # noqa: F401  (re-exported)
from .specs import DefenseSpec, parse_defense_spec
from .specs import jsonable as _jsonable
from .squares import largest_certified_square, square_summary, square_windows
from .results import (
    CONFIG_FILE,
    PROGRESS_FILE,
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_CSV,
    SUMMARY_FILE,
    ExampleRecord,
    ResultRow,
    RunMetadata,
    ScoreFile,
    Summary,
    load_scores,
    read_json,
    read_summary,
    repair_records,
    save_scores,
    SummaryCounter,
    write_json,
    write_summary,
)

log = logging.getLogger(__name__)


__all__ = [
    "DefenseSpec",
    "PatchPlan",
    "DefensePlan",
    "CertifyRun",
    "parse_defense_spec",
    "parse_shard",
    "build_defenses",
    "plan_patches",
    "plan_threat",
    "square_windows",
    "largest_certified_square",
    "square_summary",
    "certify_batch",
    "certify_dataset",
    "shard_batches",
    "DTYPES",
    "default_mask_shapes",
]



# -- the dataset loop --------------------------------------------------------------------

@dataclass
class CertifyRun:
    """What :func:`certify_dataset` returns: the summary, the records (in index order) and
    the directory written (None for an in-memory run)."""

    summary: Summary
    records: list[ExampleRecord]
    out_dir: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per example x defense x patch (:func:`patchcert.results.records_table`)."""
        from .results import records_table

        return records_table(self.records)


def parse_shard(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) or ``(i, n)`` -> ``(i, n)``; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", spec)
        if not m:
            raise PatchcertError(f"malformed shard {spec!r}: use i/n with 0 <= i < n, e.g. 0/4")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(spec[0]), int(spec[1]))
        except (TypeError, ValueError, IndexError):
            raise PatchcertError(f"malformed shard {spec!r}: use (i, n) with 0 <= i < n") from None
        if len(spec) != 2:
            raise PatchcertError(f"malformed shard {spec!r}: use (i, n) with 0 <= i < n")
    if n < 1 or not 0 <= i < n:
        raise PatchcertError(f"bad shard {i}/{n}: need n >= 1 and 0 <= i < n (shards count from 0)")
    return (i, n)


def shard_batches(num_batches: int, shard: tuple[int, int] | None) -> range:
    """Batch numbers of shard ``(i, n)``: a contiguous block, sizes differing by at most one."""
    if shard is None:
        return range(num_batches)
    i, n = shard
    return range(i * num_batches // n, (i + 1) * num_batches // n)


def _first_bad(mask_ok: torch.Tensor) -> int:
    return int(torch.nonzero(~mask_ok)[0])


@dataclass(frozen=True)
class _Job:
    """Everything one certify call decided before any work (frozen: nothing changes it later)."""

    model: Any
    data: Any
    scores: ScoreFile | None
    src: _Source
    prov: dict[str, Any]
    defense_plans: list[DefensePlan]
    patch_plans: list[PatchPlan]
    squares: list[tuple[int, int]] | None
    start: int
    num_examples: int
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    shard: tuple[int, int] | None
    batches: range
    lo: int  # first selected position of this shard (relative to start)
    total: int  # examples of this shard
    map_size: tuple[int, int]
    config: dict[str, Any]
    square_cap: int
    square_method: str
    save_scores: bool
    seed: int | None
    command: str
    num_workers: int | None = None
    skip_bad_images: bool = False  # record unreadable images in skipped.jsonl instead of stopping

    @property
    def dtype_name(self) -> str:
        return "float32" if self.dtype == torch.float32 else "float64"


def _plan_job(*, model, data, scores, defenses, patches, batch_size, device, dtype, num_examples, start, shard,
              out_dir, save_scores, square_cap, square_method, seed, command, num_workers, skip_bad_images) -> _Job:
    if scores is None:
        if model is not None and data is not None:
            data = as_image_dataset(data, num_classes=int(getattr(model, "num_classes", 0) or 0) or None)
        src = _model_source(model, data)
    else:
        if model is not None or data is not None:
            raise PatchcertError("give either a model and dataset or cached scores, not both")
        src = _score_source(scores)
    num_examples = _check_selection(start, num_examples, batch_size, src)
    shard_t = parse_shard(shard)
    dtype = _resolve_dtype(dtype)
    from .runtime import resolve_device

    dev = resolve_device(device)
    if square_cap is None:
        square_cap = min(src.image_size)
    if isinstance(square_cap, bool) or not isinstance(square_cap, int) or square_cap < 0:
        raise PatchcertError(f"square cap must be a non-negative integer, got {square_cap!r}")
    square_cap = min(square_cap, min(src.image_size))
    if save_scores and out_dir is None:
        raise PatchcertError("save_scores needs an output directory")
    defense_plans, patch_plans = plan_threat(defenses, patches, src.geometry, src.image_size, src.deployment)
    squares = square_windows(src.geometry, square_cap) if square_cap > 0 else None
    prov = _provenance(model, data, scores)
    nb = math.ceil(num_examples / batch_size)
    batches = shard_batches(nb, shard_t)
    lo = min(batches.start * batch_size, num_examples)
    hi = min(batches.stop * batch_size, num_examples)
    if hi == lo:
        log.warning("shard %s/%s holds no examples (%d batches for %d shards)", *shard_t, nb, shard_t[1])  # type: ignore[misc]
    if scores is not None:
        map_size = (int(scores.scores.shape[-2]), int(scores.scores.shape[-1]))
    else:
        map_size = tuple(model.map_size(src.image_size)) if hasattr(model, "map_size") else (0, 0)
    check_sources(defense_plans, patch_plans, scores is None, map_size)  # type: ignore[arg-type]
    dtype_name = "float32" if dtype == torch.float32 else "float64"
    config = _jsonable({
        "format": 1,
        "model": prov["model"], "model_sha256": prov["model_sha256"], "model_config": prov["model_config"],
        "scores_sha256": prov["scores_sha256"], "data": prov["data"], "start": start, "num_examples": num_examples,
        "total": num_examples, "defenses": [{"key": p.key, "config": p.config} for p in defense_plans],
        "patches": [{"patch": p.text, "resolved": p.resolved, "windows": [list(w) for w in p.windows]}
                    for p in patch_plans],
        "dtype": dtype_name, "batch_size": batch_size, "save_scores": bool(save_scores),
        "square_cap": square_cap, "square_method": square_method,
        "geometry": src.geometry.to_dict(), "image_size": list(src.image_size),
        "shard": list(shard_t) if shard_t else None,
    })
    return _Job(model=model, data=data, scores=scores, src=src, prov=prov, defense_plans=defense_plans,
                patch_plans=patch_plans, squares=squares, start=start, num_examples=num_examples,
                batch_size=batch_size, dtype=dtype, device=dev, shard=shard_t, batches=batches, lo=lo, total=hi - lo,
                map_size=map_size, config=config, square_cap=square_cap,  # type: ignore[arg-type]
                square_method=square_method, save_scores=bool(save_scores), seed=seed, command=command,
                num_workers=num_workers, skip_bad_images=bool(skip_bad_images))


def _resume_records(job: _Job, run_dir: Path, resume: bool
                    ) -> tuple[list[ExampleRecord], dict[str, float], list[dict[str, Any]]]:
    """The records, timing and skipped images (``{index, reason}``) an interrupted run in
    ``run_dir`` already holds; none for a new run."""
    if not rundir.check_resume(run_dir, job.config, resume, CONFIG_FILE, markers=(CONFIG_FILE, RECORDS_FILE)):
        return [], {}, []
    done = repair_records(run_dir / RECORDS_FILE)
    first = job.start + job.lo
    bad = resume_skipped(job.data, run_dir, first, job.total, [r.index for r in done])
    skipped = {int(s["index"]) for s in bad}
    window = dataset_indices(job.data, torch.arange(first, first + min(len(done) + len(skipped), job.total)))
    expect = [i for i in window.tolist() if i not in skipped]
    if job.scores is not None:
        expect = job.scores.indices[first:first + len(done)].tolist()
    if [r.index for r in done] != expect:
        raise PatchcertError(f"cannot resume {run_dir}: records.jsonl does not hold the first examples "
                             "of this run in order")
    if len(done) > job.total:
        raise PatchcertError(f"cannot resume {run_dir}: it holds more records than the run selects")
    timing: dict[str, float] = {}
    prog_p = run_dir / PROGRESS_FILE
    if prog_p.exists():
        timing = {k: float(v) for k, v in (read_json(prog_p).get("timing") or {}).items()}
    log.info("resuming %s: %d/%d examples done", run_dir, len(done), job.total)
    return done, timing, bad


def _finished_run(job: _Job, run_dir: Path, ndone: int, nskipped: int) -> Summary | None:
    """The summary of the finished run in ``run_dir`` (every record, the summary and, with
    ``save_scores``, the score file are there), or None if it still has work to do."""
    if ndone + nskipped != job.total or not (run_dir / SUMMARY_FILE).is_file():
        return None
    if job.save_scores and not (run_dir / SCORES_FILE).is_file():
        return None
    summary = read_summary(run_dir)
    if summary.n != ndone:
        return None
    log.info("%s is finished (%d/%d examples): nothing to do", run_dir, ndone, job.total)
    return summary


def _start_run_dir(job: _Job, run_dir: Path, settled: int, timing: dict[str, float]) -> None:
    for f in (SUMMARY_FILE, SUMMARY_CSV):  # a finished run is only finished once rewritten
        (run_dir / f).unlink(missing_ok=True)
    write_json(run_dir / CONFIG_FILE, job.config)
    RecordSink(run_dir, job.total, lambda: timing).start(settled)


def _batch_maps(job: _Job, pos: torch.Tensor, images: Any, timer: _Timer
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score maps, labels, dataset indices and (with a model) the images of the selected
    positions ``pos`` (checked); images come from the loader ``images``."""
    x = None
    if images is not None:
        xb, y, idx = next(images)
        if len(idx) == 0:  # every image of the batch was unreadable (and skipped)
            return None, y, idx, None  # type: ignore[return-value]
        idx = dataset_indices(job.data, idx)  # a selection's positions -> dataset indices
        x = to_float(xb.to(job.device, non_blocking=job.device.type == "cuda"))
        timer.sync()
        t0 = time.perf_counter()
        smap = job.model.score_map(x)
        timer.sync()
        timer.add("forward", time.perf_counter() - t0)
        timer.add("forward_images", float(len(pos)))
        what = "model produced"
    else:
        smap = job.scores.scores[pos].to(job.device)
        y, idx = job.scores.labels[pos], job.scores.indices[pos]
        what = "score file holds"
    K = job.src.num_classes
    if smap.dim() != 4 or smap.shape[1] != K or not smap.is_floating_point():
        raise PatchcertError(f"score maps of shape {tuple(smap.shape)} ({smap.dtype}); expected float [N, {K}, H, W]")
    fin = torch.isfinite(smap).flatten(1).all(1)
    if not bool(fin.all()):
        raise PatchcertError(f"{what} NaN/Inf scores for example {int(idx[_first_bad(fin)])}")
    return smap, y, idx, x


def _certify_loop(job: _Job, run_dir: Path | None, records: list[ExampleRecord], ndone: int, timer: _Timer,
                  progress: Callable[[int, int], None] | None, counter: SummaryCounter,
                  skipped: list[dict[str, Any]], keep: bool = True) -> list[ExampleRecord]:
    """Certify the job's remaining batches (``ndone`` examples are settled already) through the
    one run loop (:func:`patchcert.runs.run_batches`): records are appended to ``run_dir`` and
    counted in ``counter`` as it goes; ``records`` (the resumed ones, if kept) is extended with
    the new ones if ``keep`` (else memory stays flat); unreadable images skipped on the way are
    appended to ``skipped``."""
    parts_dir = run_dir / "scores.parts" if run_dir is not None else None
    if job.save_scores and parts_dir is not None:
        parts_dir.mkdir(exist_ok=True)
    model = job.model
    was_training = model.training if model is not None else None
    if model is not None:
        model.to(job.device).eval()
    B, n = job.batch_size, job.num_examples
    todo = [b for b in job.batches if min((b + 1) * B, n) - job.lo > ndone]  # not fully recorded
    bad: list[dict[str, Any]] = []  # the unreadable images of the current batch
    images = None
    if job.scores is None:
        from .loader import load_batches

        images = load_batches(job.data, [range(job.start + b * B, job.start + min((b + 1) * B, n)) for b in todo],
                              job.num_workers, pin_memory=job.device.type == "cuda",
                              on_bad=(lambda i, why: bad.append({"index": i, "reason": why}))
                              if job.skip_bad_images else None)
    settled = [ndone]  # examples settled before the batch the step is on

    def step(b: int) -> BatchResult[ExampleRecord]:
        bad.clear()
        new, new_bad = _certify_one_batch(job, b, images, bad, parts_dir, settled[0], timer)
        record_skipped(run_dir, new_bad)  # before the records: a resume trims what they do not reach
        skipped.extend(new_bad)
        settled[0] += len(new) + len(new_bad)
        return BatchResult(new, len(new) + len(new_bad))

    sink = RecordSink(run_dir, job.total, lambda: timer.totals) if run_dir is not None else None
    try:
        with torch.no_grad(), precise_math():
            run_batches(todo, step, tally=counter, total=job.total, done=ndone, sink=sink,
                        keep=records if keep else None, progress=progress)
    finally:
        if images is not None:
            images.close()  # stops DataLoader workers early if the loop raised
        if model is not None and was_training:
            model.train(True)
    return records


def _certify_one_batch(job: _Job, b: int, images: Any, bad: list[dict[str, Any]], parts_dir: Path | None,
                       ndone: int, timer: _Timer) -> tuple[list[ExampleRecord], list[dict[str, Any]]]:
    """Batch ``b``'s new records and its newly skipped images (``ndone``: examples settled before)."""
    B, n = job.batch_size, job.num_examples
    lo, hi = b * B, min((b + 1) * B, n)
    pos = torch.arange(job.start + lo, job.start + hi)
    smap, y, idx, x = _batch_maps(job, pos, images, timer)
    batch_records: list[ExampleRecord] = []
    if smap is not None and job.save_scores and parts_dir is not None:
        save_tensors(parts_dir / f"{lo:09d}.safetensors",
                     {"scores": smap.float(), "labels": y, "indices": idx}, {"lo": lo, "hi": hi})
    if smap is not None:  # never round the map down: a float64 model is certified on its float64 scores
        sdef = smap.to(torch.promote_types(smap.dtype, job.dtype))
        yd = y.to(job.device)
        ev = batch_evidence(job.defense_plans, job.model, x, sdef, yd, timer)
        batch_records = certify_batch(sdef, yd, idx.tolist(), job.defense_plans, job.patch_plans,
                                      job.squares, timer, job.square_method, evidence=ev)
    timer.add("images", float(len(pos)))
    if job.scores is None:  # by position (of a selection); unreadable images are left out
        return not_recorded(job.data, job.start + job.lo + ndone, pos, batch_records, bad)
    return (batch_records[ndone - (lo - job.lo):] if lo - job.lo < ndone else batch_records), []


def _per_image(timer: _Timer, key: str, count_key: str = "images") -> float | None:
    """Seconds per image of the timer entry ``key`` (None if never timed)."""
    tot = timer.totals
    n = tot.get(count_key, 0.0)
    return tot[key] / n if key in tot and n else None


def _certify_cost(timer: _Timer, dp: Any, patch: str) -> float | None:
    """Seconds per image a row's certificates cost beyond the one shared model pass: the
    certify step for ``patch`` plus, for a defense with its own passes over the images (double
    masking's masked passes, shared by its patch rows), those passes. Without them the column
    would show double masking at microseconds per image."""
    sec = _per_image(timer, f"{dp.key}|patch|{patch}")
    ev = _per_image(timer, f"{dp.key}|evidence") if dp.needs_images else None
    return sec if ev is None else (sec or 0.0) + ev


def _template(job: _Job, timer: _Timer) -> list[ResultRow]:
    """The summary's rows (accuracies still 0), with the run's per-image timing."""
    return [
        ResultRow(defense=dp.key, defense_config=dp.config, patch=pp.text, resolved=pp.resolved,
                  windows=[list(w) for w in pp.windows], clean_accuracy=0.0, certified_accuracy=0.0,
                  certify_seconds_per_image=_certify_cost(timer, dp, pp.text))
        for dp in job.defense_plans for pp in job.patch_plans
    ]


def _summary(job: _Job, counter: SummaryCounter, timer: _Timer, skipped: list[dict[str, Any]]) -> Summary:
    prov = job.prov
    md = RunMetadata(
        model=prov["model"], model_sha256=prov["model_sha256"], checkpoint=prov["checkpoint"], data=prov["data"],
        num_examples=counter.n, seed=job.seed, device=str(job.device), dtype=job.dtype_name, versions=versions(),
        forward_seconds_per_image=_per_image(timer, "forward", "forward_images"),
        geometry=job.src.geometry.to_dict(), image_size=list(job.src.image_size), command=job.command,
        model_hash_of=str(prov["hash_of"]), model_config=prov["model_config"], num_classes=job.src.num_classes,
        classes=job.src.classes, map_size=list(job.map_size),
        scores_file=prov["scores_path"], scores_sha256=prov["scores_sha256"], start=job.start,
        indices=[counter.first_index, counter.last_index] if counter.n else [],
        batch_size=job.batch_size, square_cap=job.square_cap, shard=list(job.shard) if job.shard else None,
        skipped=list(skipped),
        defense_seconds_per_image={dp.key: {"predict": _per_image(timer, f"{dp.key}|predict"),
                                            "largest_square": _per_image(timer, f"{dp.key}|largest_square"),
                                            **({"evidence": _per_image(timer, f"{dp.key}|evidence")}
                                               if dp.needs_images else {})}
                                   for dp in job.defense_plans},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return counter.summary(md, template=_template(job, timer))  # the timing is known now


def _finish_run_dir(job: _Job, run_dir: Path, summary: Summary, ndone: int, timer: _Timer, nskipped: int) -> None:
    prov = job.prov
    if job.save_scores:
        _join_score_parts(run_dir / "scores.parts", run_dir / SCORES_FILE, {
            "format": 1, "geometry": job.src.geometry.to_dict(), "image_size": list(job.src.image_size),
            "model": prov["model"], "model_sha256": prov["model_sha256"], "model_hash_of": prov["hash_of"],
            "model_config": prov["model_config"], "checkpoint": prov["checkpoint"], "classes": job.src.classes,
            "data": prov["data"], "shard": list(job.shard) if job.shard else None,
        }, job.total - nskipped)
    write_summary(run_dir, summary)
    RecordSink(run_dir, job.total, lambda: timer.totals).finish(ndone)


def certify_dataset(
    model: nn.Module | None = None,
    data: ImageSource | None = None,
    *,
    scores: ScoreFile | None = None,
    defenses: Sequence[str | DefenseSpec | Any] = ("voting",),
    patches: Sequence[str | PatchSpec] = ("5x5",),
    batch_size: int = 128,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float64,
    num_examples: int | None = None,
    start: int = 0,
    shard: str | tuple[int, int] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_scores: bool = False,
    square_cap: int | None = None,
    square_method: str = "bisect",
    seed: int | None = None,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
    num_workers: int | None = None,
    lock: bool = True,
    keep_records: bool = True,
    skip_bad_images: bool = False,
    indices: str | Sequence[int] | None = None,
    subset: str | None = None,
) -> CertifyRun:
    """Certify examples ``start .. start+num_examples-1`` of ``data`` (or of a cached score file).

    Either ``model`` (a ScoreMapModel: images in [0, 1] -> ``[N, K, H, W]``) and ``data`` (an
    ``ImageDataset``, ``(images, labels)`` tensors with float images in [0, 1] or uint8, or any
    map-style dataset of ``(image, label)``: :func:`patchcert.data.as_image_dataset`), or
    ``scores`` (a :class:`ScoreFile`). ``device="auto"``: CUDA if available, else the CPU. The model runs once per batch in eval mode, under
    ``no_grad``, with TF32 off, on images in float32 [0, 1]; its scores go to the defenses in
    ``dtype`` (or the model's own dtype if wider: a map is never rounded down before it is
    certified). Saved score files hold float32, as the contract says.
    Every defense (spec string, :class:`DefenseSpec` or defense object) is certified against
    every patch spec (``"5x5"``, ``"2%"``, ``"area=24"``) on the same maps.

    ``out_dir``: write the run directory (see :mod:`patchcert.results`); with ``shard=(i, n)``
    into ``out_dir/shard-i-of-n``. The folder is held for the whole call (:mod:`patchcert.rundir`):
    another process on it is refused; ``lock=False`` when the caller already holds it (a
    torchrun job). ``resume``: continue a run there (its records must come from the same
    configuration). ``square_cap``: largest square side searched for ``largest_square``
    (default ``min(H, W)``; 0 disables). ``progress(done, total)`` is called after every
    batch. Everything is validated before any work, with one-line PatchcertErrors.
    ``data`` is any :class:`~patchcert.data.ImageSource`; images are read batch by batch through
    :func:`patchcert.loader.load_batches` (``num_workers`` processes decode ahead; default: none
    for in-memory data, a few for image folders), so memory does not grow with the dataset.
    TF32 is off inside the loop and the caller's setting is restored afterwards.
    ``keep_records=False``: the returned run holds no records (``records == []``; they are in
    ``out_dir/records.jsonl``) and the summary is counted as the run goes, so memory does not grow
    with the number of examples either (the ``patchcert certify`` command runs this way).
    An image that cannot be decoded stops the run with a one-line DataError naming its file;
    ``skip_bad_images=True`` records it as skipped instead (:mod:`patchcert.skipping`; the
    summary's ``metadata.skipped`` lists ``{index, reason}``): it has no record, in no count.
    ``model`` may also be any ``nn.Module`` mapping float images in [0, 1] to logits ``[N, K]``
    (wrapped by :func:`patchcert.wrap_classifier`; pixel defenses only), and ``indices``
    (``[3, 17]`` or ``"3,17,40-49"``) or ``subset="random:N"`` (drawn with ``seed``, default 0)
    select the examples (:mod:`patchcert.selection`); ``start``/``num_examples`` then count
    positions in the selection, and the records keep the dataset indices.
    """
    from .inputs import prepare_inputs

    model, data = prepare_inputs(model, data, defenses, indices=indices, subset=subset, seed=seed, start=start,
                                 num_examples=num_examples)
    job = _plan_job(model=model, data=data, scores=scores, defenses=defenses, patches=patches, batch_size=batch_size,
                    device=device, dtype=dtype, num_examples=num_examples, start=start, shard=shard, out_dir=out_dir,
                    save_scores=save_scores, square_cap=square_cap, square_method=square_method, seed=seed,
                    command=command, num_workers=num_workers, skip_bad_images=skip_bad_images)
    with contextlib.ExitStack() as stack:
        run_dir: Path | None = None
        done: list[ExampleRecord] = []
        timing: dict[str, float] = {}
        skipped: list[dict[str, Any]] = []  # {index, reason}: unreadable images, filled as the run goes
        if out_dir is not None:
            run_dir = hold_run(stack, out_dir, (SUMMARY_FILE, SUMMARY_CSV, PROGRESS_FILE, SCORES_FILE, "scores.parts",
                                                SKIPPED_FILE), shard=job.shard, lock=lock)
            done, timing, skipped = _resume_records(job, run_dir, resume)
            finished = _finished_run(job, run_dir, len(done), len(skipped))
            if finished is not None:  # resuming a finished run: nothing to do, nothing rewritten
                return CertifyRun(finished, done if keep_records else [], run_dir, job.config)
            _start_run_dir(job, run_dir, len(done) + len(skipped), timing)
        timer = _Timer(job.device, timing)
        counter = SummaryCounter(_template(job, timer)).add(done)
        ndone, records = len(done) + len(skipped), (done if keep_records else [])
        del done  # without keep_records, the resumed records are counted and dropped
        records = _certify_loop(job, run_dir, records, ndone, timer, progress, counter, skipped, keep=keep_records)
        summary = _summary(job, counter, timer, skipped)
        if run_dir is not None:
            _finish_run_dir(job, run_dir, summary, counter.n, timer, len(skipped))
            if job.shard:
                log.info("shard %d/%d finished; merge all shards with: patchcert certify --merge %s",
                         job.shard[0], job.shard[1], out_dir)
    return CertifyRun(summary, records, run_dir, job.config)


def _join_score_parts(parts_dir: Path, dest: Path, meta: dict[str, Any], expect: int) -> None:
    parts = sorted(parts_dir.glob("*.safetensors"))
    if not parts and dest.is_file() and len(load_scores(dest).indices) == expect:
        shutil.rmtree(parts_dir, ignore_errors=True)  # joined already: interrupted before the summary
        return
    chunks = [load_tensors(p)[0] for p in parts]
    if chunks:
        s = torch.cat([c["scores"] for c in chunks])
        y = torch.cat([c["labels"] for c in chunks])
        i = torch.cat([c["indices"] for c in chunks])
    else:
        s, y, i = torch.zeros(0, 0, 0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if len(i) != expect or len(set(i.tolist())) != expect:
        raise PatchcertError(f"{parts_dir}: saved score maps do not cover the run ({len(i)} of {expect}); "
                             "rerun without --save-scores or start afresh")
    save_scores(dest, s, y, i, meta)
    shutil.rmtree(parts_dir)
