"""Run directories: the one mechanism behind ``certify``, ``attack`` and ``train`` output folders.

A run directory is held by one process (or one torchrun job) at a time: :func:`hold` takes an
advisory ``fcntl.flock`` on ``DIR/.lock`` for as long as the run lasts, and a second process
on the same folder gets a one-line :class:`~patchcert.errors.PatchcertError` instead of
interleaving its records with the first one's. The lock belongs to the open file, so it is
released when the holder exits, however it exits (a killed process leaves no stale lock).

Modes: ``"exclusive"`` (a whole run, a merge, a training run) and ``"shared"`` (the top folder
of a sharded run, held by every shard process while each holds its own shard folder
exclusively: shards run side by side, while a merge or an unsharded run on the same folder is
refused). Within one process the same folder may be held again (nested holds are counted).
Under torchrun, rank 0 takes the lock for the whole job and tells the other ranks whether it
succeeded (:func:`hold_for_job`), so either every rank runs or every rank stops with the same
message.

Taking the exclusive lock also removes the ``.NAME.*.tmp`` files an interrupted atomic write
of a run file left behind (nobody else can be writing them while it is held); no other file is
ever removed (:func:`clean_stale_tmp`). A new run refuses a folder holding files it would
overwrite (:func:`check_new_run`, :func:`check_training_folder`), and a ``.lock`` that is not
patchcert's.

Besides the lock: :func:`prepare` checks and creates the folder (an ``--out`` naming a file,
a path below a file or an unwritable place is a one-line error); :func:`check_resume`
compares a saved ``config.json`` with the new run's; :func:`read_jsonl` / :func:`append_jsonl`
are the record files (one JSON object per line, appended with fsync; an unfinished last line
from an interruption is dropped and truncated away).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .checkpoint import atomic_write_text
from .errors import PatchcertError

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "hold",
    "hold_for_job",
    "prepare",
    "clean_stale_tmp",
    "check_new_run",
    "check_training_folder",
    "RUN_FILES",
    "check_resume",
    "config_diff",
    "read_jsonl",
    "append_jsonl",
    "write_json",
    "read_json",
    "os_error_message",
]

LOCK_FILE = ".lock"


def os_error_message(e: OSError, what: str | None = None) -> str:
    """One line for an ``OSError``: what failed, on which file, and what to do."""
    name = e.filename if e.filename is not None else what
    where = f" {str(name)!r}" if name is not None else ""
    why = e.strerror or str(e) or type(e).__name__
    hint = {
        errno.ENOSPC: "; free some space and rerun (add --resume to continue)",
        errno.EDQUOT: "; free some space and rerun (add --resume to continue)",
        errno.EFBIG: "; the file system's file size limit was reached: choose another place or raise the "
                     "limit, and rerun (add --resume to continue)",
        errno.EROFS: "; choose a writable --out",
        errno.EACCES: "; check the permissions or choose another path",
        errno.EEXIST: "; it is a file, not a directory",
        errno.ENOTDIR: "; a part of the path is a file, not a directory",
    }.get(e.errno or 0, "")
    verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) else "cannot access"
    return f"{verb}{where}: {why}{hint}"


def prepare(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the run folder ``path`` (and its parents); one-line errors when ``path`` is a
    file, lies below a file, or cannot be created (read-only file system, permissions)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PatchcertError(f"{option} {str(p)!r} is a file, not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PatchcertError(f"{option} {str(p)!r}: {str(parent)!r} is a file, not a directory")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PatchcertError(f"{option} {str(p)!r}: {os_error_message(e)}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise PatchcertError(f"{option} {str(p)!r} is not writable")
    return p


# Every file a run folder may hold (certify, attack, train): a stale temporary file is removed only
# when it belongs to one of these, and a new run refuses a folder where it would overwrite them.
RUN_FILES = ("config.json", "records.jsonl", "progress.json", "summary.json", "summary.csv",
             "scores.safetensors", "state.safetensors", "model.safetensors", "model.json", "log.csv")
_RUN_SUBDIRS = ("shard-*-of-*", "scores.parts")
_TMP = re.compile(r"\.(?P<name>[^/]+)\.[A-Za-z0-9_]+\.tmp")
_PART = re.compile(r"\d{9}\.safetensors")


def _ours(f: Path, in_parts: bool) -> bool:
    """Whether ``f`` is a temporary file of patchcert's atomic writes (``.NAME.XXXX.tmp`` of a run file)."""
    m = _TMP.fullmatch(f.name)
    if m is None:
        return False
    return bool(_PART.fullmatch(m["name"])) if in_parts else m["name"] in RUN_FILES


def clean_stale_tmp(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files an interrupted atomic write of a run file (``NAME`` in
    :data:`RUN_FILES`) left in ``path`` (and, with ``recursive``, in its shard and
    ``scores.parts`` folders, never elsewhere). Any other file, however named, is left alone: a
    run may be pointed at a folder of the user's. Only call this while holding the folder
    exclusively."""
    p = Path(path)
    dirs = [(p, False)]
    if recursive:
        for pat in _RUN_SUBDIRS:
            for d in sorted(p.glob(pat)):
                dirs.append((d, d.name == "scores.parts"))
                if d.name != "scores.parts":
                    dirs.append((d / "scores.parts", True))
    gone = []
    for d, in_parts in dirs:
        if not d.is_dir() or d.is_symlink():
            continue
        for f in d.glob(".*.tmp"):
            if _ours(f, in_parts) and f.is_file() and not f.is_symlink():
                try:
                    f.unlink()
                    gone.append(f)
                except OSError as e:  # pragma: no cover - a race with an external cleaner
                    log.debug("could not remove %s: %s", f, e)
    if gone:
        log.info("removed %d unfinished temporary file(s) in %s", len(gone), p)
    return gone


def check_new_run(path: str | os.PathLike, names: Sequence[str], markers: Sequence[str] = ("config.json", "records.jsonl"),
                  option: str = "--out") -> None:
    """Before a new run (``path`` holds none of ``markers``) writes ``names`` into ``path``:
    refuse (one line, before anything is touched) when any of them already exists there: they
    are not this run's to overwrite or delete. Call it before :func:`hold`."""
    p = Path(path)
    if not p.is_dir() or any(os.path.lexists(p / m) for m in markers):
        return
    there = [n for n in names if os.path.lexists(p / n)]
    if there:
        raise PatchcertError(f"{option} {str(p)!r} already holds {', '.join(repr(n) for n in there)} but no run "
                             "to continue; choose an empty or new folder")


def check_training_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """A training run's folder holds only a training run's files: refuse (one line, before
    anything is written) a folder with anything else in it -- a certify or attack run, or a
    folder of the user's -- since training overwrites ``config.json``, ``log.csv`` and the models."""
    p = Path(path)
    if not p.is_dir() or (p / "state.safetensors").is_file():  # absent, or a training run's (resumed)
        return
    allowed = {"config.json", "log.csv", "state.safetensors", "model.safetensors", "model.json", LOCK_FILE}
    foreign = sorted(e.name for e in p.iterdir()
                     if e.name not in allowed and not (e.is_file() and _ours(e, False)))
    if not foreign:
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                old = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if not (isinstance(old, dict) and "objective" in old and "epochs" in old):
                foreign = ["config.json (not a training config)"]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PatchcertError(f"{option} {str(p)!r} is not a training run folder (it holds {shown}); "
                             "choose an empty or new folder")


@dataclass
class _Held:
    fd: int
    mode: str
    count: int


_HELD: dict[str, _Held] = {}


def _holder_pid(path: Path) -> str:
    try:
        txt = (path / LOCK_FILE).read_text().strip()
    except OSError:
        return ""
    return f" (pid {txt})" if txt.isdigit() else ""


def _acquire(p: Path, mode: str, option: str) -> None:
    import fcntl

    key = str(p.resolve())
    held = _HELD.get(key)
    if held is not None:
        if mode == "exclusive" and held.mode != "exclusive":
            raise PatchcertError(f"{option} {str(p)!r} is already in use by this process (shared)")
        held.count += 1
        return
    try:
        fd = os.open(p / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PatchcertError(f"{option} {str(p)!r}: {os_error_message(e)}") from None
    try:
        head = os.pread(fd, 64, 0)
    except OSError:
        head = b""
    if not re.fullmatch(rb"\d*\n?", head):  # a user's own .lock file: not ours to overwrite
        os.close(fd)
        raise PatchcertError(f"{option} {str(p)!r} holds a {LOCK_FILE!r} file that is not patchcert's; "
                             "choose another folder")
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PatchcertError(f"{option} {str(p)!r} is in use by another patchcert process{_holder_pid(p)}; "
                                 "wait for it to finish, or choose another folder") from None
        raise PatchcertError(f"{option} {str(p)!r}: cannot lock ({os_error_message(e)})") from None
    if mode == "exclusive":
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # the pid is a courtesy for the message; the lock is what counts
            pass
    _HELD[key] = _Held(fd, mode, 1)


def _release(p: Path) -> None:
    key = str(p.resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count == 0:
        del _HELD[key]
        os.close(held.fd)  # closing the file releases the flock


@contextlib.contextmanager
def hold(path: str | os.PathLike, mode: str = "exclusive", option: str = "--out",
         clean: bool = True) -> Iterator[Path]:
    """Create ``path`` (see :func:`prepare`) and hold it for the ``with`` block; a folder held by
    another process raises a one-line PatchcertError. ``clean``: with an exclusive hold, remove
    stale ``*.tmp`` files (in sub-folders too)."""
    if mode not in ("exclusive", "shared"):
        raise ValueError(f"mode must be 'exclusive' or 'shared', got {mode!r}")
    p = prepare(path, option)
    _acquire(p, mode, option)
    try:
        if clean and mode == "exclusive":
            clean_stale_tmp(p, recursive=True)
        yield p
    finally:
        _release(p)


@contextlib.contextmanager
def hold_for_job(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold ``path`` exclusively for a whole torchrun job: rank 0 takes the lock, and every
    rank learns whether it did (one all-reduce), so all ranks stop together with the same
    message when the folder is busy. Without a process group: :func:`hold`."""
    import torch

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist or torch.distributed.get_world_size() == 1:
        with hold(path, "exclusive", option) as p:
            yield p
        return
    rank = torch.distributed.get_rank()
    err = ""
    stack = contextlib.ExitStack()
    if rank == 0:
        try:
            stack.enter_context(hold(path, "exclusive", option))
        except PatchcertError as e:
            err = str(e)
    flag = torch.tensor([1.0 if err else 0.0])
    torch.distributed.all_reduce(flag)
    if float(flag[0]) > 0:
        stack.close()
        torch.distributed.barrier()  # leave together: a rank torn down alone can abort its peer
        raise PatchcertError(err or f"{option} {str(path)!r} is in use by another patchcert process (see rank 0)")
    with stack:
        yield Path(path)


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PatchcertError(f"{str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PatchcertError(f"{p}: corrupt JSON ({e})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


_DATA_LOCATION = ("root", "note")  # where a dataset was read from, not what it is


def same_data(old: Any, new: Any) -> bool:
    """Whether two runs' ``data`` descriptions name the same images. Where both carry a
    ``content_sha256`` (a hash of the pixels and labels), equal hashes decide it and the data
    root may differ (a run committed on one machine resumes on another); otherwise (older runs,
    folder datasets) every field must agree, the root included."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return old == new
    a, b = dict(old), dict(new)
    ha, hb = a.pop("content_sha256", None), b.pop("content_sha256", None)
    if ha is not None and hb is not None:
        if ha != hb:
            return False
        for k in _DATA_LOCATION:
            a.pop(k, None)
            b.pop(k, None)
    return a == b


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Top-level keys whose values differ (sorted); ``data`` compares by :func:`same_data`."""
    return sorted(k for k in set(old) | set(new) if k not in ignore
                  and not (same_data(old.get(k), new.get(k)) if k == "data" else old.get(k) == new.get(k)))


def check_resume(path: str | os.PathLike, config: Mapping[str, Any], resume: bool,
                 config_file: str = "config.json", markers: Sequence[str] = ("config.json",)) -> bool:
    """Whether ``path`` already holds a run (any of ``markers`` exists). A run there needs
    ``resume`` and the same configuration; else a one-line PatchcertError."""
    p = Path(path)
    has_run = any((p / m).exists() for m in markers)
    if not has_run:
        return False
    if not resume:
        raise PatchcertError(f"{p} already holds a run; pass --resume to continue it or choose another --out")
    cfg_p = p / config_file
    if cfg_p.exists():
        try:
            old = read_json(cfg_p)
        except PatchcertError:
            raise PatchcertError(f"cannot resume {p}: {config_file} is corrupt") from None
        diff = config_diff(old, config)
        if diff:
            raise PatchcertError(f"cannot resume {p}: it was made with different {', '.join(diff)}")
    return True


def read_jsonl(path: str | os.PathLike, tail: str = "error") -> list[dict[str, Any]]:
    """The JSON objects of a record file, one per line.

    ``tail`` says what to do with an unfinished last line (an interrupted append): ``"error"``
    (a one-line PatchcertError), ``"drop"`` (ignore it) or ``"repair"`` (drop it and truncate
    the file, so that appending continues cleanly; a missing file then reads as empty). A
    corrupt complete line is always an error."""
    if tail not in ("error", "drop", "repair"):
        raise ValueError(f"tail must be 'error', 'drop' or 'repair', got {tail!r}")
    p = Path(path)
    if not p.is_file():
        if tail == "repair" and not p.exists():
            return []
        raise PatchcertError(f"records file {str(p)!r} does not exist")
    raw = p.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep != len(raw):
        if tail == "error":
            raise PatchcertError(f"{p}: last line is unfinished (an interrupted run? use --resume)")
        log.warning("%s: dropping an unfinished last line (%d bytes)", p, len(raw) - keep)
    out = [_json_line(p, i, line) for i, line in enumerate(raw[:keep].split(b"\n")) if line.strip()]
    if keep != len(raw) and tail == "repair":
        with open(p, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return out


def _json_line(p: Path, i: int, line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PatchcertError(f"{p}: line {i + 1} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise PatchcertError(f"{p}: line {i + 1} is not a JSON object")
    return obj


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The JSON objects of a finished record file, one line at a time (memory independent of the
    file's length). An unfinished last line or a corrupt line is a one-line PatchcertError, as
    in :func:`read_jsonl` with ``tail="error"``."""
    p = Path(path)
    if not p.is_file():
        raise PatchcertError(f"records file {str(p)!r} does not exist")
    with open(p, "rb") as f:
        for i, line in enumerate(f):
            if not line.endswith(b"\n"):
                raise PatchcertError(f"{p}: last line is unfinished (an interrupted run? use --resume)")
            if line.strip():
                yield _json_line(p, i, line)


def append_jsonl(path: str | os.PathLike, lines: Sequence[str]) -> None:
    """Append already-serialised JSON lines (no newlines inside) and fsync."""
    if not lines:
        return
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk, a file size limit ...: name the file
        raise OSError(e.errno, e.strerror or str(e), str(e.filename or path)) from None
