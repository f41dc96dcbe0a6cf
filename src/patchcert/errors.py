"""Exception types. Every user-facing error is a ``PatchcertError`` (a ``ValueError``)
whose message is one line saying what was wrong; the CLI prints it and exits non-zero."""

from __future__ import annotations


class PatchcertError(ValueError):
    """Bad input or state that the user can fix (one-line message)."""


class CheckpointError(PatchcertError):
    """A checkpoint is missing, corrupt, hostile or does not match the model."""


class DataError(PatchcertError):
    """A dataset is missing or malformed."""


def not_found(what: str, path: object, folder: bool) -> str:
    """The one line for a ``path`` that is not the ``folder`` (or file) ``what`` names: it is a
    file where a folder was expected, a folder where a file was, or absent."""
    import os

    p = os.fspath(path)  # type: ignore[call-overload]
    if folder and os.path.isfile(p):
        return f"{what} {p!r} is a file, not a folder"
    if not folder and os.path.isdir(p):
        return f"{what} {p!r} is a folder, not a file"
    return f"{what} {p!r} does not exist"
