"""Which examples a run takes: ``indices=[...]`` / ``--indices I,J,...`` and
``subset="random:N"`` / ``--subset random:N``.

:func:`select_examples` returns a :class:`Selected` view of the dataset: its positions
``0..n-1`` are the chosen dataset examples, in the given order (random subsets: sorted, drawn
without replacement from a generator seeded by ``seed``, so the same seed gives the same
examples and a run resumes). The records keep the *dataset* indices
(:func:`dataset_indices`), and the view's ``info["selection"]`` lands in the run's
configuration and metadata, so ``--resume`` refuses a different selection.
``start``/``num_examples`` then count positions in the selection.

:func:`warn_single_class` warns when the examples a run takes are all of one class (the first
``N`` images of a class-sorted folder).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch

from .data import ImageSource
from .errors import PatchcertError

__all__ = ["Selected", "select_examples", "dataset_indices", "parse_indices", "parse_subset", "warn_single_class"]

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_indices(text: str | Sequence[int]) -> list[int]:
    """``"3,17,40-49"`` (or a sequence of ints) -> ``[3, 17, 40, ..., 49]``."""
    if not isinstance(text, str):
        try:
            out = [int(i) for i in text]
        except (TypeError, ValueError):
            raise PatchcertError(f"indices must be integers, got {text!r}") from None
        if any(isinstance(i, bool) for i in text):
            raise PatchcertError(f"indices must be integers, got {text!r}")
        return out
    out = []
    for part in text.split(","):
        part = part.strip()
        m = _RANGE.match(part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise PatchcertError(f"indices: range {part!r} runs backwards")
            out += range(a, b + 1)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise PatchcertError(f"malformed indices {text!r}: use e.g. '3,17,40-49'")
    return out


def parse_subset(text: str) -> int:
    """``"random:N"`` -> ``N``."""
    m = re.fullmatch(r"\s*random\s*:\s*(\d+)\s*", text) if isinstance(text, str) else None
    if m is None or int(m.group(1)) < 1:
        raise PatchcertError(f"malformed subset {text!r}: use 'random:N' (N >= 1 examples drawn with the seed)")
    return int(m.group(1))


class Selected(ImageSource):
    """Examples ``indices`` of ``base`` (a view; nothing is decoded or copied)."""

    def __init__(self, base: ImageSource, indices: torch.Tensor, selection: dict[str, Any]) -> None:
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]
        self.classes = base.classes
        self.name = base.name
        self.info = {**base.info, "selection": selection}

    @property
    def image_size(self) -> tuple[int, int]:
        return self.base.image_size

    @property
    def in_memory(self) -> bool:
        return self.base.in_memory

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[int(i)])]

    def batch(self, idx: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        return self.base.batch(self.indices[idx])

    def subset(self, n: int | None = None, start: int = 0) -> "Selected":
        stop = len(self) if n is None else min(len(self), start + n)
        return Selected(self.base, self.indices[start:stop], self.info["selection"])

    def select(self, indices: torch.Tensor | list[int]) -> "Selected":
        return Selected(self.base, self.indices[torch.as_tensor(indices, dtype=torch.int64)], self.info["selection"])

    @property
    def images(self) -> torch.Tensor:  # in-memory bases: the selected images (for channel checks)
        return self.base.images[self.indices[:1]]  # type: ignore[attr-defined]


def select_examples(data: ImageSource, indices: str | Sequence[int] | None = None, subset: str | None = None,
                    seed: int | None = 0) -> ImageSource:
    """The examples a run takes: ``data`` itself, examples ``indices`` (in that order; no
    repeats), or ``subset="random:N"`` (N distinct examples drawn with ``seed``, sorted)."""
    if indices is not None and subset is not None:
        raise PatchcertError("give indices or a random subset, not both")
    if indices is None and subset is None:
        return data
    total = len(data)
    if indices is not None:
        idx = parse_indices(indices)
        if not idx:
            raise PatchcertError("indices: the list is empty")
        bad = [i for i in idx if not 0 <= i < total]
        if bad:
            raise PatchcertError(f"index {bad[0]} is outside {data.name} (0..{total - 1})")
        if len(set(idx)) != len(idx):
            raise PatchcertError("indices: an example is listed twice")
        sel = {"kind": "indices", "indices": idx}
        t = torch.tensor(idx, dtype=torch.int64)
    else:
        n = parse_subset(subset)  # type: ignore[arg-type]
        if n > total:
            raise PatchcertError(f"subset random:{n} is larger than {data.name} ({total} examples)")
        s = 0 if seed is None else int(seed)
        g = torch.Generator().manual_seed(s)
        t = torch.randperm(total, generator=g)[:n].sort().values
        sel = {"kind": "random", "n": n, "seed": s, "of": total}
    return Selected(data, t, sel)


def dataset_indices(data: Any, positions: torch.Tensor) -> torch.Tensor:
    """The dataset indices of ``positions`` of ``data`` (the positions themselves unless ``data``
    is a :class:`Selected` view)."""
    if isinstance(data, Selected):
        return data.indices[torch.as_tensor(positions, dtype=torch.int64).cpu()]
    return torch.as_tensor(positions, dtype=torch.int64)


def warn_single_class(data: Any, start: int, num_examples: int | None) -> None:
    """Warn when the examples ``start .. start+num_examples-1`` of ``data`` are all one class
    although the data has several (e.g. ``-n 100`` on a class-sorted image folder)."""
    labels = getattr(data, "labels", None)
    if not isinstance(labels, torch.Tensor) or len(labels) == 0 or int(start) >= len(labels):
        return
    stop = len(labels) if num_examples is None else min(len(labels), int(start) + int(num_examples))
    picked = labels[int(start):stop]
    if len(picked) > 1 and bool((picked == picked[0]).all()) and bool((labels != picked[0]).any()):
        cls = int(picked[0])
        name = data.classes[cls] if cls < len(getattr(data, "classes", ())) else str(cls)
        log.warning("the %d selected examples are all of class %r (is the data sorted by class?); take a spread "
                    "with --subset random:N (subset='random:N') or --indices", len(picked), name)
