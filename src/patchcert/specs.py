"""The defense-spec language: ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` (``--defense`` on the CLI).

Values: int, float, ``true``/``false``, ``none``, ``AxB`` (a pair), ``lo:hi`` (a numeric
range), anything else is a string. Which options a defense takes is the defense's business
(:func:`patchcert.defenses.create_defense` checks them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import PatchcertError

__all__ = ["DefenseSpec", "parse_defense_spec", "jsonable"]


@dataclass(frozen=True)
class DefenseSpec:
    """A defense as the user wrote it: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``."""

    name: str
    params: dict[str, Any]
    text: str


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_PAIR_X = re.compile(r"^(\d+)[xX](\d+)$")
_NUM = r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUM}):({_NUM})$")


def _parse_value(v: str) -> Any:
    """``3`` -> int, ``0.2`` -> float, ``true``/``false`` -> bool, ``none`` -> None,
    ``11x11`` -> (11, 11), ``-1:1`` -> (-1.0, 1.0), anything else -> str."""
    s = v.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if _INT.match(s):
        return int(s)
    if _FLOAT.match(s):
        return float(s)
    m = _PAIR_X.match(s)
    if m:
        return (int(m.group(1)), int(m.group(2)))
    m = _RANGE.match(s)
    if m:
        return (float(m.group(1)), float(m.group(2)))
    return s


def parse_defense_spec(text: str | DefenseSpec) -> DefenseSpec:
    """Parse ``voting``, ``voting:condition=3.3``, ``masking:threshold=0.0,features=logits``,
    ``clipping:clip=-1:1`` ... (values: int, float, true/false, none, ``AxB`` pair, ``lo:hi``
    range, else a string). Raises a one-line PatchcertError when malformed."""
    if isinstance(text, DefenseSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise PatchcertError(f"defense spec must be a non-empty string like 'voting' or 'masking:threshold=0', got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", name):
        raise PatchcertError(f"malformed defense spec {text!r}: expected NAME[:KEY=VALUE,...]")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k) or not v.strip():
                raise PatchcertError(f"malformed defense spec {text!r}: {item.strip()!r} is not KEY=VALUE")
            if k in params:
                raise PatchcertError(f"malformed defense spec {text!r}: {k!r} given twice")
            params[k] = _parse_value(v)
    elif _:
        raise PatchcertError(f"malformed defense spec {text!r}: nothing after ':'")
    return DefenseSpec(name, params, text.strip())


def jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
