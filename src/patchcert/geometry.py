"""Receptive-field geometry and patch threat models.

The one place where pixel patches become feature-space windows.

Conventions
-----------
* A score map is ``[N, K, H, W]``. Cell ``(i, j)`` of a map made by a model with
  receptive field ``r``, stride ``s`` and offset ``o`` (per axis) depends only on
  input rows ``[i*s - o, i*s - o + r - 1]`` (clipped to the image), and likewise
  for columns.
* An axis whose receptive field is ``None`` is *global*: every cell sees the whole
  axis and the map has size 1 there (De-randomized smoothing's column bands see
  every row). A patch touches exactly one cell along a global axis.
* A pixel patch of ``p`` rows touches at most ``ceil((p + r - 1) / s)`` feature rows.
  That rectangle is the patch's *window* (see ``docs/certification.md``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = [
    "Geometry",
    "PatchSpec",
    "parse_patch",
    "feature_window",
    "patch_windows",
    "rectangles_of_area",
    "pixel_start",
]


def _pair(v: Any, name: str, allow_none: bool = False) -> tuple:
    if v is None and allow_none:
        return (None, None)
    if isinstance(v, int):
        return (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return (a, b)


@dataclass(frozen=True)
class Geometry:
    """Receptive field, stride and offset of a score map, per axis (rows, cols).

    ``rf[a] is None`` marks a global axis (map size 1 along it). ``wrap`` is True for
    maps whose windows wrap around the right/bottom edge (De-randomized smoothing).
    ``input_size`` is the image size the model expects, if fixed.
    """

    rf: tuple[int | None, int | None]
    stride: tuple[int, int] = (1, 1)
    offset: tuple[int, int] = (0, 0)
    wrap: bool = False
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        rf = _pair(self.rf, "rf", allow_none=True)
        stride = _pair(self.stride, "stride")
        offset = _pair(self.offset, "offset")
        object.__setattr__(self, "rf", rf)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "offset", offset)
        for r in rf:
            if r is not None and (not isinstance(r, int) or r < 1):
                raise ValueError(f"receptive field must be a positive int or None, got {r!r}")
        for s in stride:
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"stride must be a positive int, got {s!r}")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", _pair(self.input_size, "input_size"))

    def window(self, patch: tuple[int, int]) -> tuple[int, int]:
        """Feature window ``(wh, ww)`` touched by a ``(ph, pw)`` pixel patch."""
        ph, pw = patch
        if ph < 1 or pw < 1:
            raise ValueError(f"patch size must be positive, got {ph}x{pw}")
        out = []
        for p, r, s in zip((ph, pw), self.rf, self.stride):
            out.append(1 if r is None else -(-(p + r - 1) // s))
        return (out[0], out[1])

    def cell_extent(self, axis: int, index: int, size: int) -> tuple[int, int]:
        """Inclusive pixel range ``[lo, hi]`` seen by cell ``index`` on ``axis``
        for an image of ``size`` pixels along that axis (clipped to the image)."""
        r = self.rf[axis]
        if r is None:
            return (0, size - 1)
        lo = index * self.stride[axis] - self.offset[axis]
        return (max(lo, 0), min(lo + r - 1, size - 1))

    def to_dict(self) -> dict:
        return {
            "rf": list(self.rf),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "wrap": self.wrap,
            "input_size": None if self.input_size is None else list(self.input_size),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            rf=tuple(d["rf"]),
            stride=tuple(d.get("stride", (1, 1))),
            offset=tuple(d.get("offset", (0, 0))),
            wrap=bool(d.get("wrap", False)),
            input_size=None if d.get("input_size") is None else tuple(d["input_size"]),
        )


def rectangles_of_area(area: int, max_size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """All ``(h, w)`` with ``h * w == area`` (that fit in ``max_size`` if given)."""
    if area < 1:
        raise ValueError(f"patch area must be positive, got {area}")
    out = []
    for h in range(1, area + 1):
        if area % h == 0:
            w = area // h
            if max_size is None or (h <= max_size[0] and w <= max_size[1]):
                out.append((h, w))
    return out


_PIX = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_SQ = re.compile(r"^\s*(\d+)\s*$")
_PCT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_AREA = re.compile(r"^\s*area\s*=\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class PatchSpec:
    """A patch threat as the user wrote it.

    kind ``"pixels"``: one rectangle ``size``; ``"fraction"``: a square covering at least
    ``fraction`` of the image area (PatchGuard's 1%/2%/3%: 23/32/39 px on 224x224);
    ``"area"``: every rectangle of exactly ``area`` pixels (BagCert Fig. 4).
    """

    text: str
    kind: str
    size: tuple[int, int] | None = None
    fraction: float | None = None
    area: int | None = None

    def shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The pixel rectangles ``(ph, pw)`` this threat allows on an image of ``image_size``.

        Raises ``ValueError`` when the patch does not fit in the image.
        """
        H, W = image_size
        if self.kind == "pixels":
            ph, pw = self.size  # type: ignore[misc]
            if ph > H or pw > W:
                raise ValueError(f"patch {self.text!r} ({ph}x{pw}) is larger than the image ({H}x{W})")
            return [(ph, pw)]
        if self.kind == "fraction":
            side = math.ceil(math.sqrt(self.fraction * H * W) - 1e-9)  # type: ignore[operator]
            side = max(side, 1)
            if side > min(H, W):
                raise ValueError(f"patch {self.text!r} ({side}x{side} px) is larger than the image ({H}x{W})")
            return [(side, side)]
        rects = rectangles_of_area(self.area, (H, W))  # type: ignore[arg-type]
        if not rects:
            raise ValueError(f"no rectangle of area {self.area} fits in a {H}x{W} image")
        return rects

    def resolved(self, image_size: tuple[int, int]) -> str:
        """Human-readable resolved pixel size(s), e.g. ``'32x32'``."""
        return ",".join(f"{h}x{w}" for h, w in self.shapes(image_size))


def parse_patch(text: str | PatchSpec) -> PatchSpec:
    """Parse ``'5x5'``, ``'5'`` (square), ``'2%'`` or ``'area=24'``."""
    if isinstance(text, PatchSpec):
        return text
    if not isinstance(text, str):
        raise ValueError(f"patch spec must be a string like '5x5', '2%' or 'area=24', got {text!r}")
    m = _PIX.match(text)
    if m:
        h, w = int(m.group(1)), int(m.group(2))
        if h < 1 or w < 1:
            raise ValueError(f"patch {text!r}: sides must be positive")
        return PatchSpec(text=text, kind="pixels", size=(h, w))
    m = _SQ.match(text)
    if m:
        s = int(m.group(1))
        if s < 1:
            raise ValueError(f"patch {text!r}: side must be positive")
        return PatchSpec(text=text, kind="pixels", size=(s, s))
    m = _PCT.match(text)
    if m:
        f = float(m.group(1)) / 100.0
        if not 0.0 < f <= 1.0:
            raise ValueError(f"patch {text!r}: share of the image must be in (0%, 100%]")
        return PatchSpec(text=text, kind="fraction", fraction=f)
    m = _AREA.match(text)
    if m:
        a = int(m.group(1))
        if a < 1:
            raise ValueError(f"patch {text!r}: area must be positive")
        return PatchSpec(text=text, kind="area", area=a)
    raise ValueError(f"malformed patch spec {text!r}: use e.g. '5x5', '24x1', '2%' or 'area=24'")


def _geometry_of(obj: Any) -> Geometry:
    if isinstance(obj, Geometry):
        return obj
    g = getattr(obj, "geometry", None)
    if isinstance(g, Geometry):
        return g
    raise ValueError(f"{type(obj).__name__} declares no receptive-field geometry (.geometry)")


def feature_window(model_or_geometry: Any, patch: Sequence[int] | int) -> tuple[int, int]:
    """Window ``(wh, ww)`` on the model's score map touched by a pixel patch ``(ph, pw)``."""
    if isinstance(patch, int):
        patch = (patch, patch)
    ph, pw = (int(patch[0]), int(patch[1]))
    return _geometry_of(model_or_geometry).window((ph, pw))


def patch_windows(
    model_or_geometry: Any, spec: str | PatchSpec, image_size: tuple[int, int]
) -> list[tuple[int, int]]:
    """Distinct feature windows for every pixel shape a threat allows (order kept)."""
    geom = _geometry_of(model_or_geometry)
    seen: dict[tuple[int, int], None] = {}
    for shape in parse_patch(spec).shapes(image_size):
        seen.setdefault(geom.window(shape), None)
    return list(seen)


def pixel_start(
    geometry: Geometry, axis: int, cell: torch.Tensor, window: int | torch.Tensor, patch: int | torch.Tensor,
    image: int,
) -> torch.Tensor:
    """Pixel start of the patch (side ``patch``) whose feature window is cells
    ``[cell, cell + window - 1]`` along ``axis``; clipped to the image. ``cell``, ``window``
    and ``patch`` are long tensors of one shape (or ints).

    Patch rows ``[p, p + patch - 1]`` touch cells ``ceil((p + o - r + 1) / s)`` to
    ``floor((p + patch - 1 + o) / s)``; the patch lies inside the window iff
    ``(cell - 1) s - o + r <= p <= (cell + window) s - patch - o``; we take the middle of that
    range (unique for stride 1). On a global axis the patch is centred.
    """
    r = geometry.rf[axis]
    patch = torch.as_tensor(patch, device=cell.device)
    window = torch.as_tensor(window, device=cell.device)
    if r is None:
        return torch.div(image - patch, 2, rounding_mode="floor").expand_as(cell).clone()
    s, o = geometry.stride[axis], geometry.offset[axis]
    lo = (cell - 1) * s - o + r
    hi = (cell + window) * s - patch - o
    p = torch.div(lo + hi, 2, rounding_mode="floor")
    if geometry.wrap:
        p = torch.remainder(p, image)
    return torch.minimum(p.clamp(min=0), image - patch)
