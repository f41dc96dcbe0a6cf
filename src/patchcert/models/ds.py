"""De-randomized smoothing (Levine & Feizi, NeurIPS 2020) as a score-map model.

A base classifier sees the image with everything ablated except one band: a column band
of ``b`` columns (``mode="column"``) or a ``b x b`` block (``mode="block"``), wrapping
around the right / bottom edge. Ablation encoding: a kept pixel with channels ``x`` is
fed as ``(x, 1 - x)``, an ablated pixel as ``(0, 0)`` -- so ``2C`` input channels, and the
base classifier can tell an ablated pixel from a black or white one.

The score map holds the base classifier's **logits for every band position**:
``[N, K, 1, W/stride]`` (columns) or ``[N, K, H/stride, W/stride]`` (blocks). Cell ``j``
depends only on the pixels of band ``j`` -- columns ``j*stride .. j*stride + b - 1``
modulo ``W`` (all rows) -- so its geometry is ``rf=(None, b)`` (``(b, b)`` for blocks),
``stride``, ``wrap=True``: a ``p``-wide patch touches ``p + b - 1`` consecutive bands
(with wrap-around), which is exactly ``feature_window(model, (p, p))``. Voting on this
map with a softmax threshold θ is DS; masking with ``confidence``/``prediction`` features
is PatchGuard's Mask-DS.

Training: train ``model.base`` on :func:`random_ablate` outputs (one random band per
image) with cross-entropy on ``model.base.score_map(enc).flatten(1)``.

``stride > 1`` (ablation positions every ``stride`` pixels, as in later DS work) needs
``stride`` to divide the image size, so that the band positions are evenly spaced on the
circle and the window bound above still holds.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import PatchcertError
from ..geometry import Geometry
from .base import ScoreMapModel
from .registry import create_model, model_entrypoint, register_model

__all__ = [
    "ABLATION_MODES",
    "band_positions",
    "keep_masks",
    "encode",
    "ablate",
    "random_ablate",
    "DerandomizedSmoothing",
    "ds_column",
    "ds_block",
]

ABLATION_MODES = ("column", "block")


def _check_mode(mode: str) -> None:
    if mode not in ABLATION_MODES:
        raise PatchcertError(f"ablation mode must be 'column' or 'block', got {mode!r}")


def _check_band(mode: str, b: int, size: tuple[int, int]) -> None:
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise PatchcertError(f"band width b must be a positive int, got {b!r}")
    H, W = size
    if b > W or (mode == "block" and b > H):
        raise PatchcertError(f"band width b={b} is larger than the {H}x{W} image")


def band_positions(mode: str, size: tuple[int, int], stride: int = 1, device: Any = None) -> torch.Tensor:
    """Band start positions in score-map order.

    ``column``: long ``[P]`` (start columns ``0, stride, ..``); ``block``: long ``[P, 2]``
    (``(row, col)`` starts, row-major over the ``H/stride x W/stride`` grid).
    """
    _check_mode(mode)
    H, W = size
    cols = torch.arange(0, W, stride, device=device)
    if mode == "column":
        return cols
    rows = torch.arange(0, H, stride, device=device)
    return torch.cartesian_prod(rows, cols).view(-1, 2)


def keep_masks(mode: str, b: int, size: tuple[int, int], pos: torch.Tensor) -> torch.Tensor:
    """Boolean keep-masks ``[P, H, W]`` for band starts ``pos`` (``[P]`` columns or ``[P, 2]`` blocks).

    Column ``j`` keeps columns ``(j + t) mod W`` for ``t < b``; block ``(r, c)`` keeps rows
    ``(r + t) mod H`` and columns ``(c + t) mod W`` for ``t < b``.
    """
    _check_mode(mode)
    H, W = size
    dev = pos.device
    if mode == "column":
        cols = (torch.arange(W, device=dev)[None, :] - pos.view(-1, 1)) % W < b  # [P, W]
        return cols[:, None, :].expand(-1, H, -1)
    rows = (torch.arange(H, device=dev)[None, :] - pos[:, 0:1]) % H < b  # [P, H]
    cols = (torch.arange(W, device=dev)[None, :] - pos[:, 1:2]) % W < b  # [P, W]
    return rows[:, :, None] & cols[:, None, :]


def encode(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DS input encoding: ``x [N, C, H, W]`` in [0, 1] and ``keep`` bool ``[N, H, W]`` ->
    ``[N, 2C, H, W]``: ``(x, 1 - x)`` at kept pixels, ``(0, 0)`` at ablated ones."""
    m = keep[:, None].to(x.dtype)
    return torch.cat([x * m, (1 - x) * m], dim=1)


def _pos_tensor(mode: str, pos: Any, n: int, device: torch.device) -> torch.Tensor:
    p = torch.as_tensor(pos, dtype=torch.long, device=device)
    if mode == "column":
        if p.dim() == 0:
            p = p.expand(n)
        if p.shape != (n,):
            raise PatchcertError(f"column positions must be an int or a tensor [N={n}], got shape {tuple(p.shape)}")
    else:
        if p.dim() == 1 and p.shape == (2,):
            p = p.expand(n, 2)
        if p.shape != (n, 2):
            raise PatchcertError(f"block positions must be (row, col) or a tensor [N={n}, 2], got shape {tuple(p.shape)}")
    return p


def ablate(x: torch.Tensor, mode: str, b: int, pos: Any) -> torch.Tensor:
    """Keep one band per image and encode: ``x [N, C, H, W]`` in [0, 1] -> ``[N, 2C, H, W]``.

    ``pos``: column mode -- an int or long ``[N]`` (first kept column, wrapping around);
    block mode -- ``(row, col)`` or long ``[N, 2]`` (top-left of the kept ``b x b`` block,
    wrapping around both edges). Positions are taken modulo the image size.
    """
    _check_mode(mode)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise PatchcertError("ablate expects images [N, C, H, W]")
    size = (x.shape[-2], x.shape[-1])
    _check_band(mode, b, size)
    p = _pos_tensor(mode, pos, x.shape[0], x.device)
    return encode(x, keep_masks(mode, b, size, p))


def random_ablate(x: torch.Tensor, mode: str, b: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training input: one uniformly random band position per image (all ``W`` columns or
    all ``H x W`` blocks), ablated and encoded -> ``[N, 2C, H, W]``.

    Positions are drawn on ``generator``'s device (a CPU generator works for CUDA images),
    else on ``x``'s device with the global RNG.
    """
    _check_mode(mode)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise PatchcertError("random_ablate expects images [N, C, H, W]")
    n, (H, W) = x.shape[0], x.shape[-2:]
    dev = generator.device if generator is not None else x.device
    if mode == "column":
        pos = torch.randint(0, W, (n,), generator=generator, device=dev)
    else:
        pos = torch.stack([torch.randint(0, H, (n,), generator=generator, device=dev),
                           torch.randint(0, W, (n,), generator=generator, device=dev)], dim=1)
    return ablate(x, mode, b, pos.to(x.device))


class DerandomizedSmoothing(ScoreMapModel):
    """Base classifier over all band ablations; score map = per-band logits.

    Images ``[N, C, H, W]`` in [0, 1] -> ``[N, K, 1, W/stride]`` (column) or
    ``[N, K, H/stride, W/stride]`` (block). The base classifier (``self.base``, a
    registered model built with ``in_chans = 2C``) is run on ``N * P`` encoded images in
    chunks of ``chunk_size``; a base whose own score map is larger than 1x1 contributes
    its spatial mean (its logits).
    """

    def __init__(self, mode: str, b: int, base: ScoreMapModel, *, stride: int, chunk_size: int,
                 in_chans: int, arch: str, config: dict) -> None:
        super().__init__((0.0,) * in_chans, (1.0,) * in_chans)  # the encoding needs raw [0, 1] pixels
        _check_mode(mode)
        self.mode, self.b, self.stride, self.chunk_size = mode, b, stride, chunk_size
        self.base = base
        self.arch, self.config, self.num_classes = arch, dict(config), base.num_classes
        rf = (None, b) if mode == "column" else (b, b)
        st = (1, stride) if mode == "column" else (stride, stride)
        self.geometry = Geometry(rf=rf, stride=st, offset=(0, 0), wrap=True, input_size=None)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        H, W = x.shape[-2:]
        _check_band(self.mode, self.b, (H, W))
        dims = (W,) if self.mode == "column" else (H, W)
        if any(d % self.stride for d in dims):
            raise PatchcertError(f"{self.arch}: ablation stride {self.stride} must divide the image size {H}x{W}")

    def positions(self, size: tuple[int, int], device: Any = None) -> torch.Tensor:
        """Band starts in map order (see :func:`band_positions`)."""
        return band_positions(self.mode, size, self.stride, device)

    def map_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        H, W = size
        return (1, W // self.stride) if self.mode == "column" else (H // self.stride, W // self.stride)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [0, 1] -> per-band base logits ``[N, K, h, w]``."""
        self.check_input(x)
        n, size = x.shape[0], (x.shape[-2], x.shape[-1])
        pos = self.positions(size, x.device)
        masks = keep_masks(self.mode, self.b, size, pos)  # [P, H, W]
        P = masks.shape[0]
        total = n * P
        outs = []
        for start in range(0, total, self.chunk_size):
            idx = torch.arange(start, min(start + self.chunk_size, total), device=x.device)
            enc = encode(x[idx // P], masks[idx % P])
            outs.append(self.base.score_map(enc).mean(dim=(2, 3)))
        logits = torch.cat(outs, dim=0) if outs else x.new_zeros(0, self.num_classes)
        h, w = self.map_shape(size)
        return logits.view(n, h, w, -1).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not a feature model
        raise NotImplementedError("DerandomizedSmoothing runs its base per band; use score_map")

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("DerandomizedSmoothing runs its base per band; use score_map")


def _build(arch: str, mode: str, num_classes: int, b: int, base: str, base_cfg: dict | None, stride: int,
           chunk_size: int, in_chans: int) -> DerandomizedSmoothing:
    for key, v in (("b", b), ("stride", stride), ("chunk_size", chunk_size), ("in_chans", in_chans)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PatchcertError(f"{arch}: {key} must be a positive int, got {v!r}")
    if not isinstance(base, str) or base.startswith("ds_"):
        raise PatchcertError(f"{arch}: base must be the name of a registered backbone, got {base!r}")
    if base_cfg is not None and not isinstance(base_cfg, dict):
        raise PatchcertError(f"{arch}: base_cfg must be an object of the base model's options, got {base_cfg!r:.60}")
    base_cfg = dict(base_cfg or {})
    for reserved in ("num_classes", "in_chans"):
        if reserved in base_cfg:
            raise PatchcertError(f"{arch}: base_cfg must not set {reserved} (DS sets it)")
    fn = model_entrypoint(base)
    if "in_chans" not in inspect.signature(fn).parameters:
        raise PatchcertError(f"{arch}: base {base!r} takes no in_chans option; DS needs {2 * in_chans} input "
                             "channels (use resnet18_cifar, resnet_small or resnet18)")
    net = create_model(base, num_classes=num_classes, in_chans=2 * in_chans, **base_cfg)
    cfg = {"b": b, "base": base, "base_cfg": base_cfg, "stride": stride, "chunk_size": chunk_size,
           "in_chans": in_chans}
    return DerandomizedSmoothing(mode, b, net, stride=stride, chunk_size=chunk_size, in_chans=in_chans,
                                 arch=arch, config=cfg)


@register_model
def ds_column(num_classes: int = 10, b: int = 4, base: str = "resnet18_cifar", base_cfg: dict | None = None,
              stride: int = 1, chunk_size: int = 256, in_chans: int = 3) -> DerandomizedSmoothing:
    """De-randomized smoothing, column bands of width b: map = base logits per band [N,K,1,W]."""
    return _build("ds_column", "column", num_classes, b, base, base_cfg, stride, chunk_size, in_chans)


@register_model
def ds_block(num_classes: int = 10, b: int = 12, base: str = "resnet18_cifar", base_cfg: dict | None = None,
             stride: int = 1, chunk_size: int = 256, in_chans: int = 3) -> DerandomizedSmoothing:
    """De-randomized smoothing, b x b blocks: map = base logits per block position [N,K,H,W]."""
    return _build("ds_block", "block", num_classes, b, base, base_cfg, stride, chunk_size, in_chans)
