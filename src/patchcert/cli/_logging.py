"""Logging for the command line: only the ``patchcert`` logger is configured (the root logger
and other libraries' loggers, e.g. matplotlib's, are left alone), and its lines are written
through ``tqdm.write`` so they never glue onto a progress bar.

``-v`` (debug) and ``-q`` (warnings and errors only) are accepted before or after the verb.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging", "TqdmHandler", "LOGGER"]

LOGGER = "patchcert"


class TqdmHandler(logging.Handler):
    """Writes records to the current ``sys.stderr`` around any active tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure_logging(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """Set up the ``patchcert`` logger once per call of the CLI (idempotent)."""
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        if isinstance(h, TqdmHandler):
            log.removeHandler(h)
    h = TqdmHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # records also propagate (to the root logger, unconfigured in the CLI: nothing is printed twice),
    # so an embedding program or pytest's caplog still sees them
    return log
