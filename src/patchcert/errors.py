"""Exception types. Every user-facing error is a ``PatchcertError`` (a ``ValueError``)
whose message is one line saying what was wrong; the CLI prints it and exits non-zero."""

from __future__ import annotations


class PatchcertError(ValueError):
    """Bad input or state that the user can fix (one-line message)."""


class CheckpointError(PatchcertError):
    """A checkpoint is missing, corrupt, hostile or does not match the model."""


class DataError(PatchcertError):
    """A dataset is missing or malformed."""
