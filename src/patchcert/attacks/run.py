"""Attack a dataset: :func:`attack_dataset`, the library behind ``patchcert attack``.

Per batch the model runs once; every defense x patch is certified (the very defenses
``certify_dataset`` builds for the model: :func:`~patchcert.certify.plan_threat`) and then
attacked on every correctly classified example (:func:`~patchcert.attacks.attack_and_check`).
A certified example the attack breaks is a *soundness failure* (``AttackRun.failures``).

Run directory (``out_dir``; held by this process for the whole run, see
:mod:`patchcert.rundir`): ``config.json`` (checked on ``resume``), ``records.jsonl`` (one
:class:`~patchcert.results.AttackRecord` per example, appended per batch), ``progress.json``,
``summary.json`` (at the end); ``patchcert attack --save-png`` adds ``png/``. The run is the
one run loop (:func:`patchcert.runs.run_batches`) with the attack's per-batch function and
:class:`~patchcert.results.AttackCounter`: records are streamed and counted as they come, and
kept in memory only with ``keep_records=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import rundir
from ..loader import load_batches
from ..errors import PatchcertError
from ..results import AttackCounter, AttackDefenseOutcome, AttackOutcome, AttackRecord, attack_record
from ..runs import BatchResult, RecordSink, hold_run, run_batches
from ..selection import dataset_indices
from .patch import PatchAttackConfig, attack_and_check
from .selection import affected_mask

log = logging.getLogger(__name__)

__all__ = ["AttackRun", "AttackExample", "attack_dataset"]

RECORDS = "records.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
PROGRESS = "progress.json"


@dataclass
class AttackRun:
    """What :func:`attack_dataset` returns: the summary (as written to ``summary.json``), the
    records (in index order; empty with ``keep_records=False``: they are in
    ``out_dir/records.jsonl``), the run directory (None in memory) and its config."""

    summary: dict[str, Any]
    records: list[AttackRecord]
    out_dir: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per example x defense x patch (:func:`patchcert.results.records_table`)."""
        from ..results import records_table

        return records_table(self.records)

    @property
    def failures(self) -> list[tuple[str, str, int]]:
        """``(defense key, patch, example index)`` of the certified examples the attack broke
        (the first 100 per defense x patch; ``summary["soundness_failures"]`` counts them all)."""
        return [(r["defense"], r["patch"], int(i)) for r in self.summary["results"]
                for i in r["soundness_failure_indices"]]


@dataclass
class AttackExample:
    """One attacked example under one defense and patch, handed to ``attack_dataset``'s
    ``on_example`` (e.g. to draw it: ``patchcert attack --save-png`` passes each to
    :func:`patchcert.report.plot_attack_example`).

    ``image`` / ``adv``: the clean and attacked images ``[3, H, W]`` in [0, 1]; ``ev_clean`` /
    ``ev_adv``: the attack target's (else the predicted class's) per-cell evidence ``[H', W']``
    before and after; ``record``: the example's :class:`~patchcert.results.AttackOutcome` for
    this patch; ``reach``: the cells the patch can touch (bool ``[H', W']``, None if the patch was not placed);
    ``evidence_name``: what the evidence is called (e.g. ``votes``)."""

    index: int
    defense: str
    patch: str
    image: torch.Tensor
    adv: torch.Tensor
    ev_clean: torch.Tensor
    ev_adv: torch.Tensor
    record: AttackOutcome
    label: int
    pred: int
    classes: list[str]
    certified: bool
    reach: torch.Tensor | None
    evidence_name: str


@dataclass
class _AttackJob:
    model: Any
    data: Any
    defenses: list
    patches: list
    cfg: PatchAttackConfig
    dtype: torch.dtype
    device: torch.device
    start: int
    n: int
    batch_size: int
    save_png: int
    config: dict[str, Any]


def _plan(model, data, defenses, patches, config, strong, batch_size, device, dtype, num_examples, start,
          save_png, seed) -> _AttackJob:
    from ..planning import plan_threat
    from ..runs.source import check_selection, model_source, provenance, resolve_dtype
    from ..runtime import resolve_device
    from ..data import as_image_dataset

    data = as_image_dataset(data, num_classes=int(getattr(model, "num_classes", 0) or 0) or None)
    src = model_source(model, data)
    n = check_selection(start, num_examples, batch_size, src)
    if isinstance(save_png, bool) or not isinstance(save_png, int) or save_png < 0:
        raise PatchcertError(f"save_png must be a non-negative integer, got {save_png!r}")
    cfg = config if config is not None else (PatchAttackConfig.strong(seed=seed) if strong else PatchAttackConfig(seed=seed))
    if not isinstance(cfg, PatchAttackConfig):
        raise PatchcertError(f"config must be a PatchAttackConfig, got {type(cfg).__name__}")
    dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    # exactly the defenses `certify` builds for this model (wrap-around windows on DS maps)
    defense_plans, patch_plans = plan_threat(defenses, patches, src.geometry, src.image_size, src.deployment)
    prov = provenance(model, data, None)
    job_config = json.loads(json.dumps({
        "format": 1, "kind": "attack", "model": prov["model"], "model_sha256": prov["model_sha256"],
        "model_hash_of": prov["hash_of"], "checkpoint": prov["checkpoint"], "model_config": prov["model_config"],
        "data": prov["data"], "start": start, "num_examples": n, "split": str(data.info.get("split", "test")),
        "defenses": [{"key": d.key, "config": d.config} for d in defense_plans],
        "patches": [{"patch": p.text, "resolved": p.resolved, "windows": [list(w) for w in p.windows]}
                    for p in patch_plans],
        "attack": {**cfg.to_dict(), "strong": bool(strong)},
        "dtype": "float32" if dtype == torch.float32 else "float64", "batch_size": batch_size, "seed": seed,
        "geometry": src.geometry.to_dict(), "image_size": list(src.image_size),
    }, default=str))
    return _AttackJob(model, data, defense_plans, patch_plans, cfg, dtype, dev, start, n, batch_size, save_png,
                      job_config)


def _report_examples(job: _AttackJob, on_example: Callable[[AttackExample], None], d, dp_key: str, pp, x, s, pred,
                     y, idx, res, chk, rows, batch: list[AttackRecord]) -> None:
    with torch.no_grad():
        adv_s = job.model.score_map(res.adv_images[rows]).to(job.dtype)
    ev_c, ev_a = d.evidence(s[rows]), d.evidence(adv_s)
    geom = job.model.geometry
    for j, k in enumerate(rows):
        e = batch[k].defenses[dp_key].attack[pp.text]
        tgt = e.target if e.target is not None else int(pred[k])
        reach = None
        if e.pixel is not None and e.patch is not None:
            reach = affected_mask(geom, torch.tensor([e.pixel[0]]), torch.tensor([e.pixel[1]]),
                                  e.patch[0], e.patch[1], tuple(s.shape[-2:]))[0]
        on_example(AttackExample(int(idx[k]), dp_key, pp.text, x[k].cpu(), res.adv_images[k].cpu(),
                                 ev_c[j, tgt].cpu(), ev_a[j, tgt].cpu(), e, int(y[k]), int(pred[k]),
                                 list(job.data.classes), bool(chk.certified[k]), reach, d.evidence_name))


def _attack_batch(job: _AttackJob, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, seconds: dict[str, float],
                  on_example: Callable[[AttackExample], None] | None) -> list[AttackRecord]:
    """Records of one batch: images ``xb``, labels ``yb`` of the dataset examples ``idx``."""
    from ..data import to_float

    x = to_float(xb.to(job.device))
    y = yb.to(job.device)
    with torch.no_grad():
        s32 = job.model.score_map(x).float()
    s = s32.to(job.dtype)
    und = s.mean((2, 3)).argmax(1)
    png_rows = [k for k, i in enumerate(idx.tolist()) if i - job.start < job.save_png] if on_example else []
    batch = [AttackRecord(int(i), int(y[k]), int(und[k]), {}) for k, i in enumerate(idx.tolist())]
    for dp in job.defenses:
        d = dp.defense
        if dp.needs_images:
            _attack_pixel_defense(job, dp, x, y, batch, seconds)
            continue
        pred = d.predict(s)
        for k, r in enumerate(batch):
            r.defenses[dp.key] = AttackDefenseOutcome(int(pred[k]), bool(pred[k] == y[k]), {}, {})
        for pp in job.patches:
            t0 = time.perf_counter()
            cert = d.certify(s, y, pp.windows)
            chk = attack_and_check(job.model, d, x, y, pp.text, job.cfg, clean_scores=s32, indices=idx,
                                   keep_images=bool(png_rows), certified=cert, score_dtype=job.dtype)
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)
            key = f"{dp.key}|{pp.text}"
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
            for k, r in enumerate(batch):
                e = {**chk.result.example(k), "soundness_failure": bool(chk.soundness_failure[k])}
                r.defenses[dp.key].certified[pp.text] = bool(chk.certified[k])
                r.defenses[dp.key].attack[pp.text] = AttackOutcome.from_json(e)
            if png_rows and on_example is not None:
                _report_examples(job, on_example, d, dp.key, pp, x, s, pred, y, idx, chk.result, chk, png_rows, batch)
    return batch


def _attack_pixel_defense(job: _AttackJob, dp: Any, x: torch.Tensor, y: torch.Tensor, batch: list[AttackRecord],
                          seconds: dict[str, float]) -> None:
    """A pixel defense (double masking): PGD patches evaluated through the defense
    (:func:`patchcert.attacks.pixels.attack_pixels`) with the run's attack settings (steps,
    step size, restarts, locations), for every shape of every threat until one breaks the example."""
    from .pixels import attack_pixels

    d, cfg = dp.defense, job.cfg
    t0 = time.perf_counter()
    with torch.no_grad():
        ev = d.compute_evidence(job.model, x, None, y)
    pred = d.predict_evidence(ev).to(y.device)
    seconds[f"{dp.key}|evidence"] = seconds.get(f"{dp.key}|evidence", 0.0) + time.perf_counter() - t0
    for k, r in enumerate(batch):
        r.defenses[dp.key] = AttackDefenseOutcome(int(pred[k]), bool(pred[k] == y[k]), {}, {})
    for pp in job.patches:
        t0 = time.perf_counter()
        cert = d.certify_threat(ev, y, pp).certified.to(y.device)
        entries = [{"attacked": bool(pred[k] == y[k]), "success": False, "adv_pred": int(pred[k]), "patch": None,
                    "pixel": None, "target": None, "attempts": 0, "steps": 0} for k in range(len(batch))]
        for shape in pp.shapes:
            todo = [k for k, e in enumerate(entries) if e["attacked"] and not e["success"]]
            if not todo:
                break
            idx = torch.tensor(todo, device=x.device)
            res = attack_pixels(job.model, x[idx], y[idx], d, shape, steps=cfg.steps, step_size=cfg.step_size,
                                locations=cfg.locations, restarts=cfg.restarts, seed=cfg.seed,
                                evidence=ev[idx], certified=cert[idx])
            for j, k in enumerate(todo):
                e = entries[k]
                e["attempts"] += res.attempts[j]
                e["steps"] += res.steps[j]
                if not bool(res.robust[j]):
                    e.update(success=True, adv_pred=int(res.adv_pred[j]), patch=list(shape),
                             pixel=list(res.placement[j]) if res.placement[j] else None)
        key = f"{dp.key}|{pp.text}"
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        for k, (r, e) in enumerate(zip(batch, entries)):
            e["soundness_failure"] = bool(cert[k]) and e["success"]
            r.defenses[dp.key].certified[pp.text] = bool(cert[k])
            r.defenses[dp.key].attack[pp.text] = AttackOutcome.from_json(e)


def _counter(job: _AttackJob) -> AttackCounter:
    return AttackCounter([(dp.key, pp.text) for dp in job.defenses for pp in job.patches])


def _summary(job: _AttackJob, counter: AttackCounter, new: int, seconds: dict[str, float], command: str) -> dict:
    from ..checkpoint import versions

    extra = [{"resolved": pp.resolved, "defense_config": dp.config,
              "attack_seconds_per_image": seconds[f"{dp.key}|{pp.text}"] / new
              if new and f"{dp.key}|{pp.text}" in seconds else None}
             for dp in job.defenses for pp in job.patches]
    results = counter.results(extra)
    c = job.config
    md = {k: c[k] for k in ("model", "model_sha256", "model_hash_of", "checkpoint", "model_config", "data",
                            "start", "geometry", "image_size", "dtype", "seed")}
    md.update({"num_examples": counter.n, "attack": c["attack"], "device": str(job.device), "versions": versions(),
               "command": command, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "kind": "attack"})
    return {"n": counter.n, "results": results, "soundness_failures": sum(r["soundness_failures"] for r in results),
            "metadata": md}


def _resume(job: _AttackJob, out: Path, resume: bool) -> list[AttackRecord]:
    done: list[AttackRecord] = []
    if rundir.check_resume(out, job.config, resume, CONFIG, markers=(CONFIG, RECORDS)):
        done = [attack_record(out / RECORDS, i, d) for i, d in enumerate(rundir.read_jsonl(out / RECORDS, tail="repair"))]
        expect = dataset_indices(job.data, torch.arange(job.start, job.start + len(done))).tolist()
        if [r.index for r in done] != expect:
            raise PatchcertError(f"cannot resume {out}: records.jsonl does not hold the first examples in order")
        if len(done) > job.n:
            raise PatchcertError(f"cannot resume {out}: it holds more records than the run selects")
    (out / SUMMARY).unlink(missing_ok=True)
    rundir.write_json(out / CONFIG, job.config)
    return done


def _attack_loop(job: _AttackJob, out: Path | None, done: list[AttackRecord], counter: AttackCounter,
                 keep: list[AttackRecord] | None, seconds: dict[str, float],
                 progress: Callable[[int, int], None] | None, on_example: Callable[[AttackExample], None] | None,
                 num_workers: int | None) -> None:
    """The remaining examples through the one run loop: per batch, :func:`_attack_batch`."""
    end = job.start + job.n
    batches = [range(lo, min(lo + job.batch_size, end)) for lo in range(job.start + len(done), end, job.batch_size)]
    images = load_batches(job.data, batches, num_workers, pin_memory=job.device.type == "cuda")

    def step(item: Any) -> BatchResult[AttackRecord]:
        xb, yb, idx = item
        recs = _attack_batch(job, xb, yb, dataset_indices(job.data, idx), seconds, on_example)
        return BatchResult(recs, len(recs))

    sink = None
    if out is not None:
        sink = RecordSink(out, job.n, lambda: {k: float(v) for k, v in seconds.items()})
        sink.start(len(done))
    try:
        run_batches(images, step, tally=counter, total=job.n, done=len(done), sink=sink, keep=keep, progress=progress)
    finally:
        images.close()  # stops DataLoader workers early if the loop raised
    if sink is not None:
        sink.finish(counter.n)


def attack_dataset(
    model: Any,
    data: Any,
    *,
    defenses: Sequence[Any] = ("voting",),
    patches: Sequence[Any] = ("5x5",),
    config: PatchAttackConfig | None = None,
    strong: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float64,
    num_examples: int | None = None,
    start: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_png: int = 0,
    seed: int = 0,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
    num_workers: int | None = None,
    on_example: Callable[[AttackExample], None] | None = None,
    indices: str | Sequence[int] | None = None,
    subset: str | None = None,
    keep_records: bool = True,
) -> AttackRun:
    """Attack examples ``start .. start+num_examples-1`` of ``data`` under every defense x patch.

    ``model``: a score-map model (images in [0, 1]); ``data``: an ``ImageDataset``, a float
    tensor ``[N, 3, H, W]`` in [0, 1] with ``labels`` given as ``(images, labels)``, or any
    map-style dataset of ``(image, label)`` (see :func:`patchcert.data.as_image_dataset`).
    ``config``: the attack (default BagCert A.2; ``strong=True``: :meth:`PatchAttackConfig.strong`).
    ``out_dir``: the run directory (held for the whole call; ``resume`` continues it; the
    configuration must match). ``save_png``: hand the first N examples, under every defense x
    patch, to ``on_example`` as an :class:`AttackExample` (``patchcert attack --save-png`` draws
    them; the attack itself draws nothing). ``num_workers``:
    data loader processes (:func:`patchcert.loader.load_batches`). Returns an
    :class:`AttackRun`; ``run.failures`` lists soundness failures (certified yet broken).
    ``model`` may be any ``nn.Module`` (images in [0, 1] -> logits ``[N, K]``; pixel defenses
    only); ``indices`` / ``subset="random:N"`` select the examples as in ``certify_dataset``.
    ``keep_records=False``: the returned run holds no records (they are in
    ``out_dir/records.jsonl``); the summary is counted as the run goes, so memory does not grow
    with the number of examples (``patchcert attack`` runs this way).
    """
    if save_png and on_example is None:
        raise PatchcertError("save_png needs on_example (e.g. one that calls patchcert.report.plot_attack_example)")
    from ..inputs import prepare_inputs

    model, data = prepare_inputs(model, data, defenses, indices=indices, subset=subset, seed=seed, start=start,
                                 num_examples=num_examples)
    job = _plan(model, data, defenses, patches, config, strong, batch_size, device, dtype, num_examples, start,
                save_png, seed)
    job.model.to(job.device)
    was_training = job.model.training
    job.model.eval()
    seconds: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            out = None
            if out_dir is not None:  # a folder of the user's: nothing of theirs is overwritten
                out = hold_run(stack, out_dir, (SUMMARY, PROGRESS, "png") if job.save_png else (SUMMARY, PROGRESS))
            done = _resume(job, out, resume) if out is not None else []
            counter = _counter(job).add(done)
            records = done if keep_records else None
            _attack_loop(job, out, done, counter, records, seconds, progress, on_example, num_workers)
            summary = _summary(job, counter, counter.n - len(done), seconds, command)
            if out is not None:
                rundir.write_json(out / SUMMARY, summary)
    finally:
        job.model.train(was_training)
    run = AttackRun(summary, records if records is not None else [], out, job.config)
    if summary["soundness_failures"]:
        log.error("SOUNDNESS FAILURE: the attack broke %d certified example(s)", summary["soundness_failures"])
    return run
