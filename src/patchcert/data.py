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

class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only plain types and numpy arrays; anything else is refused."""

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
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a plain CIFAR batch ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path}: corrupt CIFAR batch ({type(e).__name__}: {e})") from None
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
        if not isinstance(labels, list) or len(labels) != data.shape[0]:
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
    root: str | os.PathLike, size: int = 224, resize: int = 256, limit: int | None = None
) -> ImageDataset:
    """ImageFolder layout ``root/<class>/<img>``: short side to ``resize``, centre crop ``size``."""
    from PIL import Image

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
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = resize / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except OSError as e:
            raise DataError(f"{f}: cannot read image ({e})") from None
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    return ImageDataset(out, labels, tuple(classes), f"imagefolder:{root.name}",
                        {"dataset": "imagefolder", "root": str(root), "size": size, "resize": resize})


def synthetic_dataset(n: int = 64, num_classes: int = 4, size: int = 32, seed: int = 0) -> ImageDataset:
    """Learnable toy data: class c is a noisy image with a bright stripe at a class-specific row band."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    imgs = torch.randint(0, 96, (n, 3, size, size), generator=g).to(torch.float32)
    band = max(1, size // num_classes)
    for c in range(num_classes):
        idx = labels == c
        imgs[idx, c % 3, c * band:(c + 1) * band, :] += 150
    return ImageDataset(imgs.clamp(0, 255).to(torch.uint8), labels, tuple(f"class{i}" for i in range(num_classes)),
                        "synthetic", {"dataset": "synthetic", "seed": seed})


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, train: bool = False, **kw) -> ImageDataset:
    """``cifar10`` | ``imagenette`` (the ImageFolder under the data dir) | ``imagefolder:PATH`` | ``synthetic``."""
    if name == "cifar10":
        return load_cifar10(data_dir, train=train)
    if name == "synthetic":
        return synthetic_dataset(**kw)
    if name == "imagenette":
        base = resolve_data_dir(data_dir)
        for cand in (base / "imagenette-224-val-subset" / "val", base / "imagenette-224-val-subset", base / "val", base):
            if cand.is_dir() and any(d.name.startswith("n0") for d in cand.iterdir() if d.is_dir()):
                return load_image_folder(cand, **kw)
        raise DataError(f"no ImageNette folder under {str(base)!r}")
    if name.startswith("imagefolder:"):
        return load_image_folder(name.split(":", 1)[1], **kw)
    raise DataError(f"unknown dataset {name!r}; use cifar10, imagenette, imagefolder:PATH or synthetic")


# -- tensors -----------------------------------------------------------------------------

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def augment_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding ``pad`` + random horizontal flip, batched, on any dtype."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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
