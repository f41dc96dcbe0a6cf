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
left behind (nobody else can be writing them while it is held).

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
        errno.EROFS: "; choose a writable --out",
        errno.EACCES: "; check the permissions or choose another path",
        errno.EEXIST: "; it is a file, not a directory",
        errno.ENOTDIR: "; a part of the path is a file, not a directory",
    }.get(e.errno or 0, "")
    return f"cannot access{where}: {why}{hint}"


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


def clean_stale_tmp(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files (left by an interrupted atomic write) in ``path`` (and, with
    ``recursive``, its sub-folders). Only call this while holding the folder exclusively."""
    p = Path(path)
    pattern = "**/.*.tmp" if recursive else ".*.tmp"
    gone = []
    for f in p.glob(pattern):
        if f.is_file():
            try:
                f.unlink()
                gone.append(f)
            except OSError as e:  # pragma: no cover - a race with an external cleaner
                log.debug("could not remove %s: %s", f, e)
    if gone:
        log.info("removed %d unfinished temporary file(s) in %s", len(gone), p)
    return gone


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


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Top-level keys whose values differ (sorted)."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


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
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
