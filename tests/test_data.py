"""Data pipeline: safe CIFAR unpickling, shared data, ImageFolder, synthetic data, augmentation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.data import (
    ImageDataset,
    ImageFolderDataset,
    augment_crop_flip,
    center_crop,
    iterate_batches,
    load_cifar10,
    load_dataset,
    load_image_folder,
    random_crop_flip,
    resolve_data_dir,
    synthetic_dataset,
    to_float,
    train_batch,
)
from patchcert.errors import DataError


# -- restricted unpickling ----------------------------------------------------------------------

def _cifar_dir(tmp_path: Path, payload: bytes, name: str = "test_batch") -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(payload)
    return tmp_path


def _batch(n: int = 20, seed: int = 0, **override) -> bytes:
    rng = np.random.default_rng(seed)
    d = {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in rng.integers(0, 10, n)],
         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"x{i}.png" for i in range(n)]}
    d.update(override)
    return pickle.dumps(d, protocol=2)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.code,))


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("make", [
    lambda marker: _System(f"touch {marker}"),
    lambda marker: _Eval(f"open({str(marker)!r}, 'w').close()"),
    lambda marker: _Exec(f"import pathlib; pathlib.Path({str(marker)!r}).touch()"),
])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, make):
    marker = tmp_path / "PWNED"
    evil = make(marker)
    for payload in (pickle.dumps(evil, protocol=2),  # at top level
                    pickle.dumps({"data": evil, "labels": [0]}, protocol=2),  # inside a CIFAR-like dict
                    pickle.dumps({"labels": [0], "data": [evil]}, protocol=4)):
        # sanity: the payload is live -- an unrestricted load would run it
        assert b"system" in payload or b"eval" in payload or b"exec" in payload
        root = _cifar_dir(tmp_path, payload)
        with pytest.raises(DataError) as e:
            load_cifar10(root)
        msg = str(e.value)
        assert "\n" not in msg and "refused to unpickle" in msg and "hostile" in msg
        assert any(s in msg for s in ("posix.system", "os.system", "builtins.eval", "builtins.exec", "__builtin__.eval",
                                      "__builtin__.exec"))
        assert not marker.exists()


def test_restricted_unpickler_still_reads_plain_batches(tmp_path):
    root = _cifar_dir(tmp_path, _batch(20))
    ds = load_cifar10(root)
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and len(ds.classes) == 10
    ref = pickle.loads(_batch(20))
    assert torch.equal(ds.images.flatten(1), torch.from_numpy(ref["data"]))
    assert ds.labels.tolist() == ref["labels"]


@pytest.mark.parametrize("mutate,expect", [
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:10], "corrupt or truncated"),
    (lambda b: b"", "corrupt or truncated"),
    (lambda b: b"\x80\x02garbage\xff\xfe" * 10, "corrupt"),
    (lambda b: bytes(range(256)) * 4, "corrupt"),
    (lambda b: b"not a pickle at all", "corrupt"),
])
def test_corrupt_or_truncated_batches_are_data_errors(tmp_path, mutate, expect):
    root = _cifar_dir(tmp_path, mutate(_batch(20)))
    with pytest.raises(DataError) as e:
        load_cifar10(root)
    assert expect in str(e.value) and "\n" not in str(e.value) and "test_batch" in str(e.value)


@pytest.mark.parametrize("override,expect", [
    ({"data": np.zeros((20, 100), np.uint8)}, "'data' must be a uint8 array"),
    ({"data": np.zeros((20, 3072), np.float32)}, "'data' must be a uint8 array"),
    ({"labels": [0] * 19}, "'labels' must be a list of 20 ints"),
    ({"labels": ["a"] * 20}, "'labels' must be a list of 20 ints"),
    ({"labels": [12] * 20}, "labels outside 0..9"),
])
def test_malformed_batches_are_data_errors(tmp_path, override, expect):
    root = _cifar_dir(tmp_path, _batch(20, **override))
    with pytest.raises(DataError, match=expect):
        load_cifar10(root)
    p = _cifar_dir(tmp_path / "list", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match="expected a dict"):
        load_cifar10(p)


def test_missing_files_and_folders_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PATCHCERT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        resolve_data_dir(None)
    assert str(e.value) == "no data folder: pass --data-dir or set PATCHCERT_DATA"
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("PATCHCERT_DATA", str(tmp_path / "also-nope"))
    with pytest.raises(DataError, match="also-nope.*does not exist"):
        load_dataset("cifar10")
    monkeypatch.setenv("PATCHCERT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no CIFAR-10 in"):
        load_dataset("cifar10")
    root = _cifar_dir(tmp_path, _batch(20))
    with pytest.raises(DataError, match="data_batch_1.*is missing"):
        load_cifar10(root, train=True)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="takes no options"):
        load_dataset("cifar10", tmp_path, size=3)
    with pytest.raises(DataError, match="no ImageNette folder"):
        load_dataset("imagenette", tmp_path)


# -- the shared data ------------------------------------------------------------------------------

@pytest.mark.data
def test_cifar10_from_shared_data(shared_data):
    test = load_dataset("cifar10", shared_data, train=False)
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.dtype == torch.int64
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert test.classes[:3] == ("airplane", "automobile", "bird") and test.num_classes == 10
    # the README's first test images: cat, ship, ship, airplane, frog
    assert test.labels[:5].tolist() == [3, 8, 8, 0, 6]
    mean = to_float(test.images[:2000]).mean((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([0.49, 0.48, 0.45]), atol=0.03, rtol=0)
    train = load_dataset("cifar10", shared_data, train=True)
    assert train.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


@pytest.mark.data
def test_imagenette_from_shared_data(shared_data):
    ds = load_dataset("imagenette", shared_data, limit=4)
    assert isinstance(ds, ImageFolderDataset) and not ds.in_memory  # decoded on access
    x, y = ds.batch([0, 1, 2, 3])
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.classes[0] == "n01440764" and ds.labels.tolist() == [0, 0, 0, 0] == y.tolist()
    tr = load_dataset("imagenette", shared_data, train=True, limit=2)  # only val exists here: val images
    assert torch.equal(tr.batch([0, 1])[0], x[:2]) and "crop" not in tr.info
    tr = load_dataset("imagenette", shared_data, train=True, train_view=True, limit=2, in_memory=True)
    assert tr.images.shape == (2, 3, 256, 256) and tr.info["crop"] == 224
    # the centre crop of the training view is the evaluation image
    assert torch.equal(center_crop(tr.images, 224), x[:2])


# -- ImageFolder ----------------------------------------------------------------------------------

def _folder(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    specs = {"cat": [((300, 200), "RGB"), ((64, 96), "L")], "dog": [((250, 250), "RGB")]}
    for cls, items in specs.items():
        (root / cls).mkdir(parents=True)
        for i, (size, mode) in enumerate(items):
            arr = rng.integers(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / cls / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_resize_and_crop(tmp_path):
    from PIL import Image

    root = _folder(tmp_path)
    ds = load_image_folder(root, size=32, resize=40)
    assert ds.images.shape == (3, 3, 32, 32) and ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1]
    # reference for the first image: short side 200 -> 40 (300 -> 60), centre 32 crop
    with Image.open(root / "cat" / "0.png") as im:
        ref = im.convert("RGB").resize((60, 40), Image.BILINEAR).crop((14, 4, 46, 36))
    assert torch.equal(ds.images[0], torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))
    # grayscale becomes 3 equal channels
    assert torch.equal(ds.images[1, 0], ds.images[1, 1]) and torch.equal(ds.images[1, 1], ds.images[1, 2])
    tr = load_image_folder(root, size=32, resize=40, train=True)
    assert tr.images.shape == (3, 3, 40, 40) and tr.info["crop"] == 32
    assert torch.equal(center_crop(tr.images, 32), ds.images)
    assert load_dataset(f"imagefolder:{root}", limit=1, size=32, resize=40)[0][0].shape == (3, 32, 32)
    assert load_dataset(f"imagefolder:{root}", train=True, limit=1, size=32, resize=40).image_size == (32, 32)
    assert load_dataset(f"imagefolder:{root}", train=True, train_view=True, size=32, resize=40).info["crop"] == 32
    # decoded on access: the same pixels as the eager loader, item by item and through subsets
    lazy = load_dataset(f"imagefolder:{root}", size=32, resize=40)
    assert isinstance(lazy, ImageFolderDataset) and len(lazy) == 3 and lazy.image_size == (32, 32)
    assert all(torch.equal(lazy[i][0], ds.images[i]) and lazy[i][1] == int(ds.labels[i]) for i in range(3))
    sub = lazy.subset(2, start=1)
    assert len(sub) == 2 and torch.equal(sub.batch([0, 1])[0], ds.images[1:]) and sub.labels.tolist() == [0, 1]
    assert len(lazy) == 3 and lazy.info == ds.info
    with pytest.raises(IndexError):
        lazy[3]
    view = load_dataset(f"imagefolder:{root}", train=True, train_view=True, size=32, resize=40)
    assert view.image_size == (40, 40) and torch.equal(view.load().images, tr.images)
    assert load_dataset("synthetic", train=True, train_view=True, n=4).images.shape == (4, 3, 32, 32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "noimg")
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="cannot read image"):
        load_image_folder(tmp_path / "bad")
    with pytest.raises(DataError, match="resize"):
        load_image_folder(_folder(tmp_path), size=64, resize=32)


# -- synthetic data -----------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_splits_differ():
    a, b = synthetic_dataset(40, 10, 16, seed=3), synthetic_dataset(40, 10, 16, seed=3)
    assert torch.equal(a.images, b.images) and a.images.shape == (40, 3, 16, 16) and a.images.dtype == torch.uint8
    assert a.labels.tolist() == [i % 10 for i in range(40)]
    tr, te = load_dataset("synthetic", train=True, n=8), load_dataset("synthetic", train=False, n=8)
    assert not torch.equal(tr.images, te.images) and torch.equal(tr.labels, te.labels)
    # decidable locally: the mean colour of any 5x5 window identifies the class (4 classes)
    x = to_float(synthetic_dataset(64, 4, 32, pattern="colour").images)
    win = torch.nn.functional.avg_pool2d(x, 5, stride=5)  # [64, 3, 6, 6]
    centres = torch.stack([win[i::4].mean((0, 2, 3)) for i in range(4)])
    d = ((win[:, None] - centres[None, :, :, None, None]) ** 2).sum(2)  # [64, 4, 6, 6]
    assert (d.argmin(1) == (torch.arange(64) % 4)[:, None, None]).float().mean() > 0.9
    with pytest.raises(DataError, match="n must be a positive int"):
        synthetic_dataset(0)
    with pytest.raises(DataError, match="pattern must be"):
        synthetic_dataset(4, pattern="plaid")
    # the default pattern is the original one (other tests rely on its exact content)
    g = torch.Generator().manual_seed(5)
    ref = torch.randint(0, 96, (8, 3, 16, 16), generator=g).to(torch.float32)
    for c in range(4):
        ref[torch.arange(8) % 4 == c, c % 3, c * 4:(c + 1) * 4, :] += 150
    assert torch.equal(synthetic_dataset(8, 4, 16, seed=5).images, ref.to(torch.uint8))
    assert torch.equal(load_dataset("synthetic", n=8, num_classes=4, size=16, seed=5).images, ref.to(torch.uint8))


def test_image_dataset_validation_and_subset():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.long), ("a",), "x")
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]"):
        ImageDataset(torch.full((2, 3, 4, 4), 255.0), torch.zeros(2, dtype=torch.long), ("a",), "x")
    ok = ImageDataset(torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.long), ("a",), "x")  # float in [0, 1]
    assert to_float(ok.images).dtype == torch.float32 and float(to_float(ok.images).max()) == 0.5
    with pytest.raises(DataError, match="labels of shape"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ("a",), "x")
    ds = synthetic_dataset(10, 2, 8)
    sub = ds.subset(4, start=3)
    assert len(sub) == 4 and torch.equal(sub.images, ds.images[3:7]) and sub.image_size == (8, 8)


# -- augmentation -----------------------------------------------------------------------------------

def _reference_crop_flip(x: torch.Tensor, pad: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    zeros = torch.zeros(n, dtype=torch.long)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g) if pad else zeros  # pad 0: only flips are drawn
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g) if pad else zeros
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        xp = torch.zeros(x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        xp[:, pad:pad + h, pad:pad + w] = x[i]
        crop = xp[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@settings(max_examples=25)
@given(st.integers(1, 6), st.integers(0, 4), st.integers(4, 12), st.integers(0, 1000),
       st.sampled_from([torch.uint8, torch.float32]))
def test_augment_crop_flip_matches_reference_and_is_reproducible(n, pad, size, seed, dtype):
    x = (torch.rand(n, 3, size, size + 1, generator=torch.Generator().manual_seed(seed)) * 255).to(dtype)
    out = augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, _reference_crop_flip(x, pad, seed))
    again = augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


def test_random_crop_flip_and_train_batch():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10).to(torch.uint8)
    out = random_crop_flip(x, 6, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 6, 6) and out.dtype == torch.uint8
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    for i in range(2):
        ref = x[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 6]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    with pytest.raises(DataError, match="larger than the images"):
        random_crop_flip(x, 11)
    cifar = synthetic_dataset(6, 2, 8)
    idx = torch.tensor([4, 1, 2])
    assert torch.equal(train_batch(cifar, idx, True, torch.Generator().manual_seed(5)),
                       augment_crop_flip(cifar.images[idx], 4, torch.Generator().manual_seed(5)))
    assert torch.equal(train_batch(cifar, idx, False, None), cifar.images[idx])
    folder = ImageDataset(x, torch.zeros(2, dtype=torch.long), ("a",), "f", {"crop": 6})
    assert torch.equal(train_batch(folder, torch.arange(2), False, None), x[:, :, 2:8, 2:8])
    assert train_batch(folder, torch.arange(2), True, torch.Generator().manual_seed(1)).shape == (2, 3, 6, 6)


def test_iterate_batches():
    assert [b.tolist() for b in iterate_batches(5, 2, shuffle=False)] == [[0, 1], [2, 3], [4]]
    assert [b.tolist() for b in iterate_batches(5, 2, shuffle=False, drop_last=True)] == [[0, 1], [2, 3]]
    got = torch.cat(list(iterate_batches(50, 7, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert sorted(got.tolist()) == list(range(50))
    assert torch.equal(got, torch.randperm(50, generator=torch.Generator().manual_seed(0)))


def test_select_and_spread_are_views_in_any_order(tmp_path):
    root = _folder(tmp_path)
    lazy = load_dataset(f"imagefolder:{root}", size=32, resize=40)
    eager = load_image_folder(root, size=32, resize=40)
    for ds in (lazy, eager):
        sel = ds.select([2, 0])
        assert len(sel) == 2 and sel.labels.tolist() == [1, 0] and torch.equal(sel.batch([0, 1])[0], eager.images[[2, 0]])
        assert ds.spread(2).labels.tolist() == [0, 0]  # indices (j * 3) // 2 = 0, 1
        assert ds.spread(10).labels.tolist() == [0, 0, 1] and len(ds.spread(0)) == 0
    assert lazy.spread(2).files == [lazy.files[0], lazy.files[1]]


def test_imagenet_layout_train_and_val_splits(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for c in ("n01", "n02"):
            d = tmp_path / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (10 * i, 50, 90)).save(d / f"{i}.jpg")
    tr = load_dataset("imagenet", tmp_path, train=True, train_view=True, size=24, resize=28)
    va = load_dataset("imagenet", tmp_path, size=24, resize=28)
    assert len(tr) == 6 and len(va) == 4 and tr.classes == va.classes == ("n01", "n02")
    assert tr.info["dataset"] == va.info["dataset"] == "imagenet" and tr.info["crop"] == 24 and tr.image_size == (28, 28)
    assert va.name == "imagenet-val" and va.info["split"] == "val" and va[3][0].shape == (3, 24, 24)
    assert va.subset(2).labels.tolist() == [0, 0] and va.spread(2).labels.tolist() == [0, 1]  # every class
    with pytest.raises(DataError, match="no ImageNet val folder"):
        load_dataset("imagenet", tmp_path / "imagenet" / "train")


def test_protocol_5_batches_load_and_hostile_protocol_5_pickles_are_refused(tmp_path):
    import pickle as pk

    rng = np.random.default_rng(3)
    d = {"batch_label": "b", "labels": [int(v) for v in rng.integers(0, 10, 7)],
         "data": rng.integers(0, 256, (7, 3072), dtype=np.uint8), "filenames": ["f"] * 7}
    ref = load_cifar10(_cifar_dir(tmp_path / "p2", pk.dumps(d, protocol=2)))
    got = load_cifar10(_cifar_dir(tmp_path / "p5", pk.dumps(d, protocol=5)))
    assert torch.equal(ref.images, got.images) and torch.equal(ref.labels, got.labels)
    marker = tmp_path / "pwned"
    for evil in (_System(f"touch {marker}"), np.load, np.lib.format.read_array):
        payload = pk.dumps({"data": evil, "labels": [0]}, protocol=5)
        with pytest.raises(DataError, match="refused to unpickle"):
            load_cifar10(_cifar_dir(tmp_path / f"e{id(evil)}", payload))
    assert not marker.exists()


def test_decompression_bomb_is_a_one_line_data_error(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2x the limit: PIL refuses it as a bomb
    with pytest.raises(DataError, match="big.png: refused to decode") as e:
        load_image_folder(tmp_path, size=32, resize=32)
    assert "\n" not in str(e.value)


# -- data identity: a run resumes wherever the same images are stored --------------------------

def test_cifar_content_hash_names_the_images_not_the_folder(tmp_path):
    a = load_dataset("cifar10", data_dir=_cifar_dir(tmp_path / "a", _batch(12, seed=1)))
    b = load_dataset("cifar10", data_dir=_cifar_dir(tmp_path / "b", _batch(12, seed=1)))
    c = load_dataset("cifar10", data_dir=_cifar_dir(tmp_path / "c", _batch(12, seed=2)))
    assert a.info["root"] != b.info["root"]
    assert a.info["content_sha256"] == b.info["content_sha256"] != c.info["content_sha256"]
    import hashlib
    assert len(a.info["content_sha256"]) == len(hashlib.sha256().hexdigest())


def test_same_data_rule():
    from patchcert.rundir import config_diff, same_data

    old = {"dataset": "cifar10", "split": "test", "root": "/m1/c10", "note": "n", "content_sha256": "ab"}
    moved = dict(old, root="/m2/c10")
    assert same_data(old, moved) and config_diff({"data": old, "k": 1}, {"data": moved, "k": 1}) == []
    assert not same_data(old, dict(moved, content_sha256="cd"))  # other pixels, same name
    assert not same_data(old, dict(old, split="train"))
    legacy = {k: v for k, v in old.items() if k != "content_sha256"}  # a run made before the hash
    assert same_data(legacy, old)  # same root: resumes
    assert not same_data(legacy, moved)  # without a hash the root is the identity
    assert config_diff({"data": old}, {"data": dict(moved, content_sha256="cd")}) == ["data"]


def test_certify_run_resumes_under_another_data_root(tmp_path):
    import shutil

    from patchcert.certify import certify_dataset
    from patchcert.errors import PatchcertError
    from patchcert.models import create_model

    torch.manual_seed(0)
    m = create_model("bagcert_cifar", width=8)
    first = load_dataset("cifar10", data_dir=_cifar_dir(tmp_path / "m1", _batch(12, seed=3)))
    run = tmp_path / "run"
    certify_dataset(m, first, num_examples=12, batch_size=4, out_dir=run, square_cap=0)
    # interrupt: keep the first 4 records, as a run stopped after one batch
    recs = (run / "records.jsonl").read_text().splitlines(keepends=True)
    (run / "records.jsonl").write_text("".join(recs[:4]))
    for f in ("summary.json", "summary.csv"):
        (run / f).unlink(missing_ok=True)
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")  # the same files on another machine / path
    moved = load_dataset("cifar10", data_dir=tmp_path / "m2")
    assert moved.info["root"] != first.info["root"]
    again = certify_dataset(m, moved, num_examples=12, batch_size=4, out_dir=run, square_cap=0, resume=True)
    assert again.summary.n == 12
    assert (run / "records.jsonl").read_text().splitlines(keepends=True) == recs  # the same records
    other = load_dataset("cifar10", data_dir=_cifar_dir(tmp_path / "m3", _batch(12, seed=4)))
    with pytest.raises(PatchcertError, match="different data"):
        certify_dataset(m, other, num_examples=12, batch_size=4, out_dir=run, square_cap=0, resume=True)
