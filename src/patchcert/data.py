"""Datasets: map-style ``torch.utils.data`` datasets of uint8 images, and augmentation on tensors.

Every dataset is a :class:`ImageSource`: ``ds[i] -> (uint8 [3, H, W], int label)``, with
``classes``, ``labels`` (int64 ``[N]``, known without decoding), ``image_size``, ``name`` and
``info`` (provenance), ``subset`` (a cheap view) and ``batch(idx) -> (uint8 [B, 3, H, W], labels)``.

* :class:`ImageDataset` holds its images in memory (``images`` uint8 ``[N, 3, H, W]``): CIFAR-10
  (the ``cifar-10-batches-py`` pickles are whole-file objects; the 50,000 training images are
  150 MB, read through a restricted unpickler that only rebuilds plain containers and numpy
  arrays, so a hostile pickle cannot run code) and the synthetic data. DataLoader workers
  (forked) share the tensor's pages; nothing is copied per worker.
* :class:`ImageFolderDataset` (ImageNette / ImageNet) lists the files and decodes an image when
  it is accessed (resize the short side, centre crop), so memory does not grow with the folder.
  :func:`load_image_folder` is the eager version (every image decoded into one tensor).

``to_float`` maps uint8 to [0, 1]. The data folder comes from an argument or ``$PATCHCERT_DATA``.
Batched loading with worker processes, the per-epoch sharded sampler and per-example
augmentation for training live in :mod:`patchcert.loader`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .augment import augment_crop_flip, center_crop, random_crop_flip, train_batch  # noqa: F401  (re-exported)
from .errors import DataError, not_found

log = logging.getLogger(__name__)

__all__ = [
    "ImageSource",
    "ImageDataset",
    "ImageFolderDataset",
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
    "as_image_dataset",
    "iterate_batches",
    "dataset_options",
    "recorded_dataset",
    "CIFAR10_CLASSES",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ImageSource(torch.utils.data.Dataset):
    """A map-style dataset of uint8 images: ``ds[i] -> (uint8 [C, H, W], int)``.

    Subclasses provide ``classes``, ``name``, ``info``, ``labels`` (int64 ``[N]``),
    ``image_size``, ``__getitem__`` and ``subset``; ``batch`` stacks items (subclasses may
    read a batch faster).
    """

    classes: tuple[str, ...]
    name: str
    info: dict
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def in_memory(self) -> bool:
        """True if every image is already decoded in RAM (no worker processes needed)."""
        return False

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def subset(self, n: int | None = None, start: int = 0) -> "ImageSource":  # pragma: no cover - abstract
        """Examples ``start .. start+n-1`` (a view; nothing is decoded)."""
        raise NotImplementedError

    def select(self, indices: torch.Tensor | list[int]) -> "ImageSource":  # pragma: no cover - abstract
        """Examples ``indices`` in that order (a view; nothing is decoded)."""
        raise NotImplementedError

    def spread(self, n: int) -> "ImageSource":
        """``min(n, len)`` examples evenly spaced over the dataset (``(j * N) // n``): a class-sorted
        image folder's evaluation subset covers every class, not only the first ones."""
        k = min(int(n), len(self))
        return self.select(torch.arange(k) * len(self) // max(k, 1))

    def batch(self, idx: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` as uint8 ``[B, C, H, W]`` and their labels int64 ``[B]``."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if len(idx) == 0:
            return torch.zeros(0, 3, *self.image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
        return torch.stack([self[int(i)][0] for i in idx]), self.labels[idx]


@dataclass
class ImageDataset(ImageSource):
    """In-memory images: ``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ok_dtype = self.images.dtype == torch.uint8 or self.images.dtype in (torch.float32, torch.float64)
        if self.images.dim() != 4 or not ok_dtype:
            raise DataError(f"{self.name}: images must be uint8 (or float in [0, 1]) [N, C, H, W], got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.images.is_floating_point() and self.images.numel():
            lo, hi = float(self.images.min()), float(self.images.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise DataError(f"{self.name}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[-2]), int(self.images.shape[-1]))

    @property
    def in_memory(self) -> bool:
        return True

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, idx: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        return self.images[idx], self.labels[idx]

    def subset(self, n: int | None = None, start: int = 0) -> "ImageDataset":
        stop = len(self) if n is None else min(len(self), start + n)
        return ImageDataset(self.images[start:stop], self.labels[start:stop], self.classes, self.name, dict(self.info))

    def select(self, indices: torch.Tensor | list[int]) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.name, dict(self.info))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data folder: the argument, else ``$PATCHCERT_DATA``; must exist."""
    if data_dir is None:
        data_dir = os.environ.get("PATCHCERT_DATA")
        if not data_dir:
            raise DataError("no data folder: pass --data-dir or set PATCHCERT_DATA")
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise DataError(not_found("data folder", p, folder=True))
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
        # protocol 5 (re-pickled batches): arrays come back through numpy's _frombuffer,
        # i.e. np.frombuffer(bytes, dtype).reshape(shape) -- rebuilds an array, runs nothing else
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
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
    images, labels = torch.cat(xs), torch.cat(ys)
    return ImageDataset(
        images, labels, classes, f"cifar10-{split}",
        {"dataset": "cifar10", "split": split, "root": str(root),
         "note": "CIFAR-10 (re-encoded copy) if read from ../shared/data",
         "content_sha256": content_sha256(images, labels)},
    )


def content_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of a dataset's pixels (uint8, [N, C, H, W]) and labels (int64): its identity
    regardless of where it is stored, so that a run made under one data root resumes under
    another (``rundir.same_data``)."""
    h = hashlib.sha256()
    h.update(repr((tuple(images.shape), str(images.dtype), tuple(labels.shape))).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# -- ImageFolder -------------------------------------------------------------------------

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}


def _check_folder_sizes(size: int, resize: int) -> None:
    for name, v in (("size", size), ("resize", resize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"image folder: {name} must be a positive int, got {v!r}")
    if resize < size:
        raise DataError(f"image folder: resize ({resize}) must be >= size ({size})")


def _list_image_folder(root: Path, limit: int | None) -> tuple[list[str], list[Path], list[int]]:
    """Classes (sorted sub-folder names) and the image files with their labels, in a fixed order."""
    if not root.is_dir():
        raise DataError(not_found("image folder", root, folder=True))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"image folder: limit must be a positive int, got {limit!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                files.append(f)
                labels.append(ci)
                if limit is not None and len(files) >= limit:
                    break
        if limit is not None and len(files) >= limit:
            break
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no images")
    return classes, files, labels


def decode_image(path: str | os.PathLike, resize: int, out_size: int) -> torch.Tensor:
    """Decode one image: RGB, short side to ``resize`` (bilinear), centre crop ``out_size`` -> uint8 ``[3, s, s]``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - out_size) // 2, (h - out_size) // 2
            im = im.crop((left, top, left + out_size, top + out_size))
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused to decode ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


class ImageFolderDataset(ImageSource):
    """ImageFolder layout ``root/<class>/<img>``, decoded on access (nothing is held but the file list).

    Evaluation view (``train_view=False``): short side to ``resize``, centre crop ``size`` ->
    ``[3, size, size]``. Training view (``train_view=True``): short side to ``resize``, centre crop
    ``resize x resize``; the training pipeline then takes a random ``size x size`` crop (+ flip)
    (BagCert A.1.2: random 224 crops of the 256-rescaled image); ``info["crop"] = size`` says so.
    Pixels are identical to :func:`load_image_folder`'s.
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, resize: int = 256, limit: int | None = None,
                 train_view: bool = False) -> None:
        _check_folder_sizes(size, resize)
        self.root = Path(root)
        classes, files, labels = _list_image_folder(self.root, limit)
        self.classes = tuple(classes)
        self.files = [str(f) for f in files]
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.size, self.resize, self.train_view = size, resize, bool(train_view)
        self.name = f"imagefolder:{self.root.name}"
        self.info = {"dataset": "imagefolder", "root": str(self.root), "size": size, "resize": resize,
                     "split": "train" if train_view else "eval"}
        if train_view:
            self.info["crop"] = size

    @property
    def out_size(self) -> int:
        return self.resize if self.train_view else self.size

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.out_size, self.out_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return decode_image(self.files[i], self.resize, self.out_size), int(self.labels[i])

    def subset(self, n: int | None = None, start: int = 0) -> "ImageFolderDataset":
        stop = len(self) if n is None else min(len(self), start + n)
        return self.select(torch.arange(start, max(start, stop)))

    def select(self, indices: torch.Tensor | list[int]) -> "ImageFolderDataset":
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        sub = object.__new__(ImageFolderDataset)
        sub.__dict__.update(self.__dict__)
        sub.info = dict(self.info)
        sub.files = [self.files[int(i)] for i in idx]
        sub.labels = self.labels[idx]
        return sub

    def load(self) -> ImageDataset:
        """Decode every image into one in-memory :class:`ImageDataset` (needs N x 3 x s x s bytes)."""
        out = torch.empty(len(self), 3, self.out_size, self.out_size, dtype=torch.uint8)
        for i in range(len(self)):
            out[i] = self[i][0]
        return ImageDataset(out, self.labels.clone(), self.classes, self.name, dict(self.info))


def load_image_folder(
    root: str | os.PathLike, size: int = 224, resize: int = 256, limit: int | None = None, train: bool = False
) -> ImageDataset:
    """ImageFolder layout ``root/<class>/<img>`` decoded eagerly into RAM (see :class:`ImageFolderDataset`,
    which decodes on access and is what :func:`load_dataset` returns).

    Evaluation (``train=False``): short side to ``resize``, centre crop ``size`` -> ``[N, 3, size, size]``.
    Training (``train=True``): short side to ``resize``, centre crop ``resize x resize``; the
    training loop then takes a random ``size x size`` crop (+ flip) per step (:func:`train_batch`;
    BagCert A.1.2: random 224 crops of the 256-rescaled image). ``info["crop"] = size`` says so.
    """
    return ImageFolderDataset(root, size=size, resize=resize, limit=limit, train_view=train).load()


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


def _imagenet_root(base: Path, split: str) -> Path:
    for cand in (base / "imagenet" / split, base / split):
        if cand.is_dir() and any(d.is_dir() for d in cand.iterdir()):
            return cand
    raise DataError(f"no ImageNet {split} folder under {str(base)!r} (expected imagenet/{split}/<class>/<image> "
                    f"or {split}/<class>/<image>)")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, train: bool = False, **kw) -> ImageSource:
    """``cifar10`` | ``imagenette`` (the ImageFolder under the data dir) | ``imagenet`` | ``imagefolder:PATH`` | ``synthetic``.

    ``imagenet``: ImageFolder splits ``train`` / ``val`` under ``DATA/imagenet/`` or ``DATA/``
    (one sub-folder per class, e.g. the synset ids ``n01440764 ..``).

    CIFAR-10 and synthetic data come back in memory (:class:`ImageDataset`); image folders as an
    :class:`ImageFolderDataset` that decodes on access (``in_memory=True``: decoded eagerly).

    ``imagenette``: ``train=True`` reads a ``train`` folder (imagenette2 layout) if there is one,
    else the ``val`` folder with a warning (``../shared/data`` holds only 1,000 val images).
    ``synthetic``: the training split is a different draw (seed + 10,000) of the same
    distribution as the test split (which is ``synthetic_dataset(seed=seed)`` itself).
    ``train_view=True`` (image folders; ignored elsewhere) returns the training view -- images
    resized but not yet cropped to ``size`` (``info["crop"]``), for :func:`train_batch`'s random
    crops; by default every split is centre-cropped to ``size``. Extra options go to the loader (``size``, ``resize``, ``limit`` for image folders; ``n``,
    ``num_classes``, ``size``, ``seed`` for synthetic data); CIFAR-10 takes none.
    ``in_memory`` (image folders) decodes every image now and returns an :class:`ImageDataset`.
    """
    train_view = bool(kw.pop("train_view", False))
    in_memory = bool(kw.pop("in_memory", False))
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
            ds = ImageFolderDataset(root, train_view=train_view, **kw)
            return ds.load() if in_memory else ds
        if name == "imagenet":
            split = "train" if train else "val"
            ds = ImageFolderDataset(_imagenet_root(resolve_data_dir(data_dir), split), train_view=train_view, **kw)
            ds.name, ds.info["dataset"], ds.info["split"] = f"imagenet-{split}", "imagenet", split
            ds.info["view"] = "train" if train_view else "eval"
            return ds.load() if in_memory else ds
        if name.startswith("imagefolder:"):
            ds = ImageFolderDataset(name.split(":", 1)[1], train_view=train_view, **kw)
            return ds.load() if in_memory else ds
    except TypeError as e:
        raise DataError(f"dataset {name!r}: bad option ({e})") from None
    raise DataError(f"unknown dataset {name!r}; use cifar10, imagenette, imagenet, imagefolder:PATH or synthetic")


# -- what each dataset kind takes -------------------------------------------------------

FOLDER_OPTIONS = ("size", "resize")  # recorded options an image folder is reloaded with
SYNTHETIC_OPTIONS = ("seed", "pattern")  # ... and synthetic data


def dataset_options(name: str, *, count: int | None = None, num_classes: int | None = None,
                    image_size: Sequence[int] | None = None, seed: int = 0,
                    recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The :func:`load_dataset` options for dataset ``name`` that give its first ``count``
    examples at ``image_size`` -- the one place that knows which options each kind takes.

    * ``synthetic``: ``n = count`` (default 64), ``num_classes`` (default: ``recorded``'s, else
      10), ``size = image_size[0]`` (default 32), ``seed``; ``recorded`` ``seed`` / ``pattern``
      override;
    * image folders (``imagenette``, ``imagenet``, ``imagefolder:PATH``): for a square
      ``image_size`` s, ``size = s`` and ``resize = max(s, round(s * 256 / 224))`` (BagCert's
      rescale), then ``recorded`` ``size`` / ``resize``; ``limit = count``;
    * ``cifar10`` (and anything else): no options.

    ``recorded``: options recorded with the data (a checkpoint's training ``dataset_cfg``, a
    run's data provenance); only those the kind takes are used.
    """
    rec = dict(recorded or {})
    kw: dict[str, Any] = {}
    if name == "synthetic":
        kw = {"n": count or 64, "num_classes": num_classes or 10,
              "size": int(image_size[0]) if image_size else 32, "seed": seed}
        kw.update({k: v for k, v in rec.items() if k in SYNTHETIC_OPTIONS})
        if num_classes is None and "num_classes" in rec:
            kw["num_classes"] = rec["num_classes"]
    elif name in ("imagenette", "imagenet") or name.startswith("imagefolder:"):
        if image_size and image_size[0] == image_size[1]:
            kw["size"] = int(image_size[0])
            kw["resize"] = max(kw["size"], round(kw["size"] * 256 / 224))
        kw.update({k: v for k, v in rec.items() if k in FOLDER_OPTIONS})
        if count is not None:
            kw["limit"] = count
    return kw


def recorded_dataset(info: Mapping[str, Any], need: int, num_classes: int | None = None,
                     image_size: Sequence[int] | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` for :func:`load_dataset` (``train`` included) that reload the data a
    run recorded (its ``data`` provenance: an ``ImageSource.info`` plus ``name`` and
    ``num_examples_total``) with at least its first ``need`` examples at the same indices; None
    for data that cannot be reloaded (e.g. in-memory tensors). ``num_classes`` /
    ``image_size``: the run's, for synthetic data that recorded none."""
    kind = str(info.get("dataset") or "")
    train = str(info.get("split") or "test") == "train"
    folder = {k: int(info[k]) for k in FOLDER_OPTIONS if info.get(k)}
    if kind == "cifar10":
        return "cifar10", {"train": train}
    if kind == "synthetic":
        size = int(info.get("size") or (image_size[0] if image_size else 32))
        rec = {"pattern": str(info["pattern"])} if info.get("pattern") else {}
        n = int(info.get("n") or info.get("num_examples_total") or need)
        opts = dataset_options("synthetic", count=n, num_classes=num_classes or 10, image_size=(size, size),
                               seed=int(info.get("seed") or 0), recorded=rec)
        return "synthetic", {"train": False, **opts}  # the recorded seed already names the split's draw
    if kind == "imagenet":
        return "imagenet", {"train": train, **dataset_options("imagenet", recorded=folder)}
    if kind in ("imagefolder", "imagenette"):
        own = kind == "imagefolder" and info.get("root") and "imagenette" not in str(info.get("name") or "")
        name = f"imagefolder:{info['root']}" if own else "imagenette"
        return name, {"train": train, **dataset_options(name, count=need, recorded=folder)}
    return None


# -- tensors -----------------------------------------------------------------------------

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (float images, already in [0, 1], keep their values)."""
    if x.is_floating_point():
        return x.to(torch.float32)
    return x.to(torch.float32).div_(255.0)


def _image_tensor(img, i: int) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        t = img
    elif isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
        if t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)  # HWC -> CHW
    elif hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
        t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    else:
        raise DataError(f"example {i}: the image must be a tensor, numpy array or PIL image, got {type(img).__name__}")
    if t.dim() != 3:
        raise DataError(f"example {i}: expected an image [C, H, W], got shape {tuple(t.shape)}")
    return t


def as_image_dataset(data, num_classes: int | None = None, name: str = "in-memory") -> ImageSource:
    """Whatever a notebook holds, as an :class:`ImageSource`:

    * an ``ImageSource`` (``ImageDataset``, ``ImageFolderDataset``; returned as is);
    * ``(images, labels)``: images uint8 ``[N, 3, H, W]`` or float in [0, 1], labels ints ``[N]``;
    * any map-style dataset (``len`` and ``ds[i] -> (image, label)``, e.g. a torchvision dataset
      with ``transforms.ToTensor()``): images as tensors (float in [0, 1] or uint8), numpy
      arrays or PIL images; class names from ``ds.classes`` if it has them.

    ``num_classes``: the number of classes when the data does not name them (default: the
    largest label + 1)."""
    if isinstance(data, ImageSource):
        return data
    classes = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data[0], torch.as_tensor(data[1])
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data)
        if n == 0:
            raise DataError(f"{name}: the dataset is empty")
        items = [data[i] for i in range(n)]
        for i, it in enumerate(items):
            if not (isinstance(it, (tuple, list)) and len(it) >= 2):
                raise DataError(f"{name}: example {i} is not an (image, label) pair")
        imgs = [_image_tensor(it[0], i) for i, it in enumerate(items)]
        if len({(t.dtype, tuple(t.shape)) for t in imgs}) != 1:
            raise DataError(f"{name}: images differ in shape or dtype; resize/crop them to one size first")
        images = torch.stack(imgs)
        labels = torch.tensor([int(it[1]) for it in items])
        names = getattr(data, "classes", None)
        classes = tuple(str(c) for c in names) if isinstance(names, (list, tuple)) and names else None
    else:
        raise DataError(f"data must be an ImageDataset, (images, labels) tensors or a dataset of (image, label) "
                        f"pairs, got {type(data).__name__}")
    if images.dim() != 4:
        raise DataError(f"{name}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.is_floating_point():
        images = images.to(torch.float32)
    elif images.dtype != torch.uint8:
        raise DataError(f"{name}: integer images must be uint8, got {images.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.shape != images.shape[:1]:
        raise DataError(f"{name}: labels must be {images.shape[0]} integers, got {labels.dtype} {tuple(labels.shape)}")
    if classes is None:
        k = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 1)
        classes = tuple(str(i) for i in range(k))
    return ImageDataset(images.contiguous(), labels.to(torch.int64), classes, name, {"dataset": "in-memory"})


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
