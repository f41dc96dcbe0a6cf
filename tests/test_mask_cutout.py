"""fastnet_cifar and the mask_cutout objective (training for double masking)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchcert.models import load_model
from patchcert.errors import PatchcertError
from patchcert.masks import mask_set
from patchcert.models import create_model
from patchcert.train import TrainConfig, train
from patchcert.train.objectives import create_objective


def test_fastnet_shapes_and_bad_options():
    m = create_model("fastnet_cifar", widths=[4, 8, 8], stem=4, num_classes=7).eval()
    out = m.score_map(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7, 1, 1) and m.geometry.rf == (None, None)
    assert m.logits(torch.rand(3, 3, 32, 32)).shape == (3, 7)
    for bad in ({"widths": []}, {"widths": [4, 0]}, {"widths": "64"}, {"stem": 0}, {"head_scale": -1},
                {"widths": [10_000_000]}):
        with pytest.raises(PatchcertError):
            create_model("fastnet_cifar", **bad)


def test_mask_cutout_occludes_with_masks_of_the_set():
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4)
    obj = create_objective("mask_cutout", model, (32, 32), patch="5x5", k=6, probs=[0.0, 0.0, 1.0], fill=0.25)
    x = torch.rand(64, 3, 32, 32) * 0.1 + 0.6  # never 0.25
    g = torch.Generator().manual_seed(0)
    y = obj.prepare(x.clone(), g)
    filled = (y == 0.25).all(1)  # [N, H, W]
    table = mask_set((32, 32), (5, 5), 6).boolean()
    pairs = {(i, j) for i in range(36) for j in range(36)}
    for row in filled:
        assert any(torch.equal(row, table[i] | table[j]) for i, j in pairs)
    assert torch.equal(y[~filled[:, None].expand_as(y)], x[~filled[:, None].expand_as(x)])
    # the same generator state gives the same masks (resumable runs)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(obj.prepare(x.clone(), g2), y)
    d = obj.describe()
    assert d["masks_per_shape"] == [36] and d["probs"] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [{"k": 0}, {"probs": [0.5, 0.5]}, {"probs": [0.5, 0.6, 0.1]}, {"fill": 2},
                                 {"label_smoothing": 1.0}, {"patch": "40x40"}, {"patch": "5y5"}, {"nope": 1}])
def test_mask_cutout_bad_options(bad):
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4)
    with pytest.raises(PatchcertError):
        create_objective("mask_cutout", model, (32, 32), **bad)


@pytest.mark.parametrize("greedy", [0.0, 0.5])
def test_mask_cutout_training_resumes_bit_identically(tmp_path: Path, greedy):
    base = dict(model="fastnet_cifar", model_cfg={"widths": [4, 4, 4], "stem": 4}, dataset="synthetic",
                objective="mask_cutout", objective_cfg={"patch": "3x3", "k": 3, "label_smoothing": 0.1,
                                                        "greedy_fraction": greedy, "greedy_candidates": 3},
                epochs=2, batch_size=16, optimizer="sgd", lr=0.05, nesterov=True, warmup_epochs=0.5,
                eval_examples=16, seed=3, num_threads=1)
    train(TrainConfig(**base, out_dir=str(tmp_path / "a")))
    train(TrainConfig(**base, out_dir=str(tmp_path / "b")), stop_after_epoch=1)
    train(TrainConfig(**base, out_dir=str(tmp_path / "b")), resume=True)
    a, b = load_model(tmp_path / "a" / "model.safetensors"), load_model(tmp_path / "b" / "model.safetensors")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert a.checkpoint_meta["objective"]["name"] == "mask_cutout"


def test_greedy_cutout_picks_the_worst_candidates():
    torch.manual_seed(0)
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    obj = create_objective("mask_cutout", model, (32, 32), patch="5x5", k=3, probs=[1.0, 0.0, 0.0], fill=0.5,
                           greedy_fraction=0.5, greedy_candidates=9)  # every mask is a candidate (9 masks)
    assert obj.refines
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 3, (8,))
    import contextlib

    model.train()
    out = obj.refine(x, x.clone(), y, model, lambda _: contextlib.nullcontext())
    assert model.training  # restored
    assert torch.equal(out[4:], x[4:])
    table = mask_set((32, 32), (5, 5), 3).boolean()
    model.eval()
    import torch.nn.functional as F
    from patchcert.masks import apply_masks

    def loss(img, m):
        return float(F.cross_entropy(model(apply_masks(img[None], m[None], 0.5)).flatten(1), y[:1]))

    with torch.no_grad():
        # image 0: round 1 takes the worst single mask (all 9 are candidates), round 2 the worst second one
        i = max(range(9), key=lambda a: loss(x[0], table[a]))
        j = max(range(9), key=lambda b: loss(x[0], table[i] | table[b]))
    assert torch.equal(out[0], apply_masks(x[:1], (table[i] | table[j])[None], 0.5)[0])


def test_training_evaluation_of_mask_cutout_certifies_with_double_masking():
    """The objective names its deployed defense (double masking on its own mask set); the loop's
    evaluation certifies a spread sample with it: the very certificates of a certify run."""
    from patchcert.certify import certify_dataset
    from patchcert.data import synthetic_dataset
    from patchcert.train import default_eval_defense, evaluate

    spec = default_eval_defense("mask_cutout", {"k": 2, "patch": "5x5"})
    assert spec["name"] == "double-masking" and spec["k"] == 2
    torch.manual_seed(3)
    m = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    data = synthetic_dataset(n=5, num_classes=3, size=32)
    ev = evaluate(m, data, "5x5", torch.device("cpu"), batch_size=2, defense=spec)
    run = certify_dataset(m, data, defenses=["double-masking:k=2,patch=5x5"], patches=["5x5"], square_cap=0,
                          device="cpu")
    row = run.summary.results[0]
    assert ev["cert_acc"] == pytest.approx(row.certified_accuracy)  # 5 images < 64: all of them
    assert ev["clean_acc"] == pytest.approx(row.clean_accuracy)
