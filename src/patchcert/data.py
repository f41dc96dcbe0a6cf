"""Datasets as uint8 tensors, and batched augmentation on tensors.

* CIFAR-10 from the standard ``cifar-10-batches-py`` layout, read through a restricted
  unpickler that only rebuilds plain containers and numpy arrays (a hostile pickle
  cannot run code), without torchvision's md5 check.
* ImageFolder (ImageNette / ImageNet): resize the short side, centre crop.
* A synthetic dataset for tests.

Images are kept as ``uint8 [N, 3, H, W]``; ``to_float`` maps them to [0, 1]. The data
folder comes from an argument or ``$PATCHCERT_DATA``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "ImageDataset",
    "resolve_data_dir",
    "load_cifar10",
    "load_image_folder",
    "synthetic_dataset",
    "load_dataset",
    "augment_crop_flip",
    "random_crop_flip",
    "center_crop",
    "train_batch",
    "to_float",
    "iterate_batches",
    "CIFAR10_CLASSES",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageDataset:
    """``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[-2]), int(self.images.shape[-1]))

    def subset(self, n: int | None = None, start: int = 0) -> "ImageDataset":
        stop = len(self) if n is None else min(len(self), start + n)
        return ImageDataset(self.images[start:stop], self.labels[start:stop], self.classes, self.name, dict(self.info))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data folder: the argument, else ``$PATCHCERT_DATA``; must exist."""
    if data_dir is None:
        data_dir = os.environ.get("PATCHCERT_DATA")
        if not data_dir:
            raise DataError("no data folder: pass --data-dir or set PATCHCERT_DATA")
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise DataError(f"data folder {str(p)!r} does not exist")
    return p


# -- CIFAR-10 ---------------------------------------------------------------------------

class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle asks for a global that is not a plain container or numpy array."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only plain types and numpy arrays; any other global (``os.system``, ``eval``,
    ``subprocess``, arbitrary classes) is refused before it is looked up, so nothing runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):  # noqa: D401
        raise _RefusedGlobal(f"persistent id {str(pid)[:40]!r}")


def _load_pickle(path: Path) -> dict:
    """Unpickle a CIFAR batch through the restricted unpickler; every failure is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _RefusedGlobal as e:
        raise DataError(f"{path}: refused to unpickle {e} (a CIFAR batch holds only plain types and numpy "
                        "arrays; this file may be hostile)") from None
    except RecursionError:
        raise DataError(f"{path}: corrupt CIFAR batch (nesting too deep)") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR batch ({type(e).__name__}: {str(e)[:100]})") from None
    except Exception as e:  # malformed opcodes/arguments surface as many types (ValueError, TypeError, struct.error...)
        raise DataError(f"{path}: corrupt CIFAR batch ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _find_cifar_root(data_dir: Path) -> Path:
    for cand in (data_dir, data_dir / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file():
            return cand
    raise DataError(f"no CIFAR-10 in {str(data_dir)!r}: expected cifar-10-batches-py/test_batch")


def load_cifar10(data_dir: str | os.PathLike | None = None, train: bool = False) -> ImageDataset:
    """CIFAR-10 train (50,000) or test (10,000) split as uint8 tensors."""
    root = _find_cifar_root(resolve_data_dir(data_dir))
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for fn in files:
        p = root / fn
        if not p.is_file():
            raise DataError(f"CIFAR-10 file {str(p)!r} is missing")
        d = _load_pickle(p)
        data, labels = d.get("data"), d.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{p}: 'data' must be a uint8 array [n, 3072]")
        if (not isinstance(labels, list) or len(labels) != data.shape[0]
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)):
            raise DataError(f"{p}: 'labels' must be a list of {data.shape[0]} ints")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.tensor(labels, dtype=torch.int64))
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        names = _load_pickle(meta).get("label_names")
        if isinstance(names, list) and len(names) == 10 and all(isinstance(n, str) for n in names):
            classes = tuple(names)
    split = "train" if train else "test"
    return ImageDataset(
        torch.cat(xs), torch.cat(ys), classes, f"cifar10-{split}",
        {"dataset": "cifar10", "split": split, "root": str(root),
         "note": "CIFAR-10 (re-encoded copy) if read from ../shared/data"},
    )


# -- ImageFolder -------------------------------------------------------------------------

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}


def load_image_folder(
    root: str | os.PathLike, size: int = 224, resize: int = 256, limit: int | None = None, train: bool = False
) -> ImageDataset:
    """ImageFolder layout ``root/<class>/<img>`` as the papers preprocess ImageNet.

    Evaluation (``train=False``): short side to ``resize``, centre crop ``size`` -> ``[N, 3, size, size]``.
    Training (``train=True``): short side to ``resize``, centre crop ``resize x resize``; the
    training loop then takes a random ``size x size`` crop (+ flip) per step (:func:`train_batch`;
    BagCert A.1.2: random 224 crops of the 256-rescaled image). ``info["crop"] = size`` says so.
    """
    from PIL import Image

    for name, v in (("size", size), ("resize", resize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"image folder: {name} must be a positive int, got {v!r}")
    if resize < size:
        raise DataError(f"image folder: resize ({resize}) must be >= size ({size})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders")
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                files.append((f, ci))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no images")
    out_size = resize if train else size
    out = torch.empty(len(files), 3, out_size, out_size, dtype=torch.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = resize / min(w, h)
                im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - out_size) // 2, (h - out_size) // 2
                im = im.crop((left, top, left + out_size, top + out_size))
                out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from None
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    info = {"dataset": "imagefolder", "root": str(root), "size": size, "resize": resize,
            "split": "train" if train else "eval"}
    if train:
        info["crop"] = size
    return ImageDataset(out, labels, tuple(classes), f"imagefolder:{root.name}", info)


# -- synthetic ---------------------------------------------------------------------------

def _palette(num_classes: int) -> torch.Tensor:
    """``[K, 3]`` class colours in [0, 1]: the 27 points of {0, .5, 1}^3 (most distinct first), then random."""
    levels = torch.tensor([0.0, 1.0, 0.5])
    grid = torch.cartesian_prod(levels, levels, levels)  # 27 colours
    grid = grid[torch.argsort((grid == 0.5).sum(1), stable=True)]  # the 8 corners first
    if num_classes <= len(grid):
        return grid[:num_classes]
    extra = torch.rand(num_classes - len(grid), 3, generator=torch.Generator().manual_seed(12345))
    return torch.cat([grid, extra])


def synthetic_dataset(n: int = 64, num_classes: int = 4, size: int = 32, seed: int = 0,
                      pattern: str = "stripe") -> ImageDataset:
    """Learnable toy data ``[n, 3, size, size]`` uint8; labels cycle ``0, 1, .., K-1``.

    ``pattern="stripe"``: noise in [0, 96) with a bright stripe (+150) in channel ``c % 3`` at
    a class-specific row band -- decidable only by cells that see the stripe.
    ``pattern="colour"``: noise of +-40 around a class colour (``48 + 160 * palette[c]``) plus a
    fainter stripe (+60) -- decidable from any small window, so small-receptive-field models
    (and their certificates) can learn it.
    """
    for name, v in (("n", n), ("num_classes", num_classes), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"synthetic data: {name} must be a positive int, got {v!r}")
    if pattern not in ("stripe", "colour"):
        raise DataError(f"synthetic data: pattern must be 'stripe' or 'colour', got {pattern!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    band = max(1, size // num_classes)
    if pattern == "stripe":
        imgs = torch.randint(0, 96, (n, 3, size, size), generator=g).to(torch.float32)
        for c in range(num_classes):
            idx = labels == c
            imgs[idx, c % 3, c * band:(c + 1) * band, :] += 150
    else:
        base = 48.0 + 160.0 * _palette(num_classes)[labels]  # [n, 3]
        imgs = base[:, :, None, None] + torch.randint(-40, 41, (n, 3, size, size), generator=g).to(torch.float32)
        for c in range(num_classes):
            idx = labels == c
            imgs[idx, c % 3, (c * band) % size:(c * band) % size + band, :] += 60
    return ImageDataset(imgs.clamp(0, 255).to(torch.uint8), labels, tuple(f"class{i}" for i in range(num_classes)),
                        "synthetic", {"dataset": "synthetic", "seed": seed, "n": n, "size": size, "pattern": pattern})


# -- by name -----------------------------------------------------------------------------

def _imagenette_root(base: Path, split: str) -> Path | None:
    def is_folder(p: Path) -> bool:
        return p.is_dir() and any(d.name.startswith("n0") for d in p.iterdir() if d.is_dir())

    cands = [base / split, base]
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if d.is_dir() and d.name.startswith("imagenette"):
            cands[1:1] = [d / split] + ([d] if split == "val" else [])
    return next((c for c in cands if is_folder(c) and (c.name == split or split == "val")), None)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, train: bool = False, **kw) -> ImageDataset:
    """``cifar10`` | ``imagenette`` (the ImageFolder under the data dir) | ``imagefolder:PATH`` | ``synthetic``.

    ``imagenette``: ``train=True`` reads a ``train`` folder (imagenette2 layout) if there is one,
    else the ``val`` folder with a warning (``../shared/data`` holds only 1,000 val images).
    ``synthetic``: the training split is a different draw (seed + 10,000) of the same
    distribution as the test split (which is ``synthetic_dataset(seed=seed)`` itself).
    ``train_view=True`` (image folders; ignored elsewhere) returns the training view -- images
    resized but not yet cropped to ``size`` (``info["crop"]``), for :func:`train_batch`'s random
    crops; by default every split is centre-cropped to ``size``. Extra options go to the loader (``size``, ``resize``, ``limit`` for image folders; ``n``,
    ``num_classes``, ``size``, ``seed`` for synthetic data); CIFAR-10 takes none.
    """
    train_view = bool(kw.pop("train_view", False))
    if name == "cifar10":
        if kw:
            raise DataError(f"dataset cifar10 takes no options, got {', '.join(sorted(kw))}")
        return load_cifar10(data_dir, train=train)
    try:
        if name == "synthetic":
            kw = dict(kw)
            if train:
                kw["seed"] = int(kw.get("seed", 0)) + 10_000
            return synthetic_dataset(**kw)
        if name == "imagenette":
            base = resolve_data_dir(data_dir)
            root = _imagenette_root(base, "train") if train else None
            if root is None:
                root = _imagenette_root(base, "val")
                if root is None:
                    raise DataError(f"no ImageNette folder under {str(base)!r}")
                if train:
                    log.warning("no ImageNette train split under %s: training on the val images in %s", base, root)
            return load_image_folder(root, train=train_view, **kw)
        if name.startswith("imagefolder:"):
            return load_image_folder(name.split(":", 1)[1], train=train_view, **kw)
    except TypeError as e:
        raise DataError(f"dataset {name!r}: bad option ({e})") from None
    raise DataError(f"unknown dataset {name!r}; use cifar10, imagenette, imagefolder:PATH or synthetic")


# -- tensors -----------------------------------------------------------------------------

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def augment_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding ``pad`` + random horizontal flip, batched, on any dtype.

    ``x`` ``[N, C, H, W]`` -> same shape and dtype; one offset pair and flip per image, drawn
    from ``generator`` (CIFAR augmentation of the papers).
    """
    n, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        x = _gather_crops(xp, dy, dx, h, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _gather_crops(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image crops ``x[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` in one gather -> ``[N, C, h, w]``."""
    n, c = x.shape[:2]
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return x[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``size x size`` crop (no padding) + random horizontal flip per image -> ``[N, C, size, size]``."""
    n, _, h, w = x.shape
    if size > h or size > w:
        raise DataError(f"crop {size} is larger than the images ({h}x{w})")
    dy = torch.randint(0, h - size + 1, (n,), generator=generator)
    dx = torch.randint(0, w - size + 1, (n,), generator=generator)
    x = _gather_crops(x, dy, dx, size, size)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop of ``[N, C, H, W]``."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def train_batch(data: ImageDataset, idx: torch.Tensor, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The training view of ``data.images[idx]`` (uint8 ``[B, C, h, w]``) as the papers augment.

    CIFAR-style data (no ``info["crop"]``): random crop with padding 4 + flip if ``augment``.
    ImageFolder training data (``info["crop"] = s``): random ``s`` crop + flip if ``augment``,
    else the centre crop.
    """
    x = data.images[idx]
    crop = data.info.get("crop")
    if crop is None:
        return augment_crop_flip(x, 4, generator=generator) if augment else x
    return random_crop_flip(x, int(crop), generator) if augment else center_crop(x, int(crop))


def iterate_batches(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield idx
