"""fastnet_cifar and the mask_cutout objective (training for double masking)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchcert.models import load_model
from patchcert.errors import PatchcertError
from patchcert.masks import centre_weights, mask_set
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


def test_mask_cutout_centre_weight_favours_the_central_masks():
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4)
    uni = create_objective("mask_cutout", model, (32, 32), patch="5x5", k=6, probs=[0.0, 1.0, 0.0])
    cen = create_objective("mask_cutout", model, (32, 32), patch="5x5", k=6, probs=[0.0, 1.0, 0.0],
                           centre_weight=3.0)
    assert "centre_weight" not in uni.describe() and cen.describe()["centre_weight"] == 3.0
    table = mask_set((32, 32), (5, 5), 6).boolean()
    central = [14, 15, 20, 21]  # rows/columns 2 and 3 of the 6 x 6 set
    x = torch.full((2000, 3, 32, 32), 0.9)

    def share(obj):
        filled = (obj.prepare(x.clone(), torch.Generator().manual_seed(0)) == 0.5).all(1)
        idx = torch.stack([(filled == table[i]).all((1, 2)) for i in range(36)], 1).float().argmax(1)
        return float(torch.isin(idx, torch.tensor(central)).float().mean())

    # uniform: 4/36 = 0.11; centre weight 3: the four central masks weigh 3 - 2 d/d_max each
    w = centre_weights(mask_set((32, 32), (5, 5), 6), 3.0)
    want = float(w[central].sum() / w.sum())
    assert abs(share(uni) - 4 / 36) < 0.03 and abs(share(cen) - want) < 0.03 and want > 0.15


@pytest.mark.parametrize("bad", [{"k": 0}, {"probs": [0.5, 0.5]}, {"probs": [0.5, 0.6, 0.1]}, {"fill": 2},
                                 {"label_smoothing": 1.0}, {"patch": "40x40"}, {"patch": "5y5"}, {"nope": 1},
                                 {"centre_weight": 0}, {"centre_weight": "2"}, {"centre_weight": float("nan")}])
def test_mask_cutout_bad_options(bad):
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4)
    with pytest.raises(PatchcertError):
        create_objective("mask_cutout", model, (32, 32), **bad)


def _resumes_bit_identically(tmp_path: Path, base: dict):
    """The run trained in one call and in two (stopped after epoch 1, resumed) ends with the same
    weights; returns the first run's model."""
    train(TrainConfig(**base, out_dir=str(tmp_path / "a")))
    train(TrainConfig(**base, out_dir=str(tmp_path / "b")), stop_after_epoch=1)
    train(TrainConfig(**base, out_dir=str(tmp_path / "b")), resume=True)
    a, b = load_model(tmp_path / "a" / "model.safetensors"), load_model(tmp_path / "b" / "model.safetensors")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    return a


@pytest.mark.parametrize("greedy,centre", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.5)])
def test_mask_cutout_training_resumes_bit_identically(tmp_path: Path, greedy, centre):
    base = dict(model="fastnet_cifar", model_cfg={"widths": [4, 4, 4], "stem": 4}, dataset="synthetic",
                objective="mask_cutout", objective_cfg={"patch": "3x3", "k": 3, "label_smoothing": 0.1,
                                                        "greedy_fraction": greedy, "greedy_candidates": 3,
                                                        "centre_weight": centre},
                epochs=2, batch_size=16, optimizer="sgd", lr=0.05, nesterov=True, warmup_epochs=0.5,
                eval_examples=16, seed=3, num_threads=1)
    a = _resumes_bit_identically(tmp_path, base)
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


def _tiny_teacher(tmp_path: Path, num_classes: int = 3) -> str:
    from patchcert.checkpoint import save_checkpoint

    torch.manual_seed(7)
    t = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=num_classes)
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(path, t)
    return str(path)


def test_distillation_loss_is_the_documented_mixture(tmp_path: Path):
    """Soft targets come from the teacher on the *unmasked* images; the loss is
    (1 - a) CE + a T^2 KL(teacher || student), checked against a hand computation."""
    import contextlib

    import torch.nn.functional as F

    teacher_path = _tiny_teacher(tmp_path)
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4, num_classes=3)
    obj = create_objective("mask_cutout", model, (32, 32), patch="5x5", k=3, teacher=teacher_path,
                           distill_weight=0.3, distill_temperature=2.0, label_smoothing=0.1)
    assert obj.refines and obj.describe()["teacher"] == teacher_path
    clean = torch.rand(5, 3, 32, 32)
    masked = obj.prepare(clean.clone(), torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (5,))
    x = obj.refine(clean, masked, y, model, lambda _: contextlib.nullcontext())
    assert torch.equal(x, masked)  # no greedy fraction: the input is unchanged
    out = model(x)
    got = obj.loss(out, y)
    with torch.no_grad():
        t = load_model(teacher_path)(clean).mean((2, 3))
    s = out.float().mean((2, 3))
    want = 0.7 * F.cross_entropy(s, y, label_smoothing=0.1) + 0.3 * 4.0 * F.kl_div(
        F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    got.backward()  # gradients reach the student, never the teacher
    assert all(p.grad is None for p in obj.teacher.parameters())
    with pytest.raises(PatchcertError, match="refine must run"):
        obj.loss(model(x), y)  # the targets are used once


@pytest.mark.parametrize("bad", [{"teacher": ""}, {"teacher": "no_such_model"}, {"distill_weight": 1.5},
                                 {"distill_temperature": 0.0}, {"teacher_classes": 4}])
def test_distillation_bad_options(tmp_path: Path, bad):
    model = create_model("fastnet_cifar", widths=[4, 4, 4], stem=4)
    with pytest.raises(PatchcertError):
        opts = {"teacher": _tiny_teacher(tmp_path, bad.pop("teacher_classes", 10))} | bad
        create_objective("mask_cutout", model, (32, 32), **opts)


def test_distilled_training_resumes_bit_identically(tmp_path: Path):
    base = dict(model="fastnet_cifar", model_cfg={"widths": [4, 4, 4], "stem": 4}, dataset="synthetic",
                objective="mask_cutout", objective_cfg={"patch": "3x3", "k": 3, "teacher": _tiny_teacher(tmp_path),
                                                        "greedy_fraction": 0.5, "greedy_candidates": 2},
                dataset_cfg={"num_classes": 3}, epochs=2, batch_size=16, optimizer="sgd", lr=0.05, warmup_epochs=0.5, eval_examples=16, seed=3,
                num_threads=1)
    a = _resumes_bit_identically(tmp_path, base)
    assert a.checkpoint_meta["objective"]["distill_weight"] == 0.5
