"""The notebook API: ``patchcert.certify_dataset`` / ``attack_dataset`` / ``load_pretrained`` /
``load_dataset`` on tensors, datasets of pairs and PIL images, flat per-example tables, and a
library that never switches matplotlib's backend."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

import patchcert
from patchcert.data import ImageDataset, as_image_dataset
from patchcert.errors import DataError
from patchcert.models.base import ScoreMapModel, trace_geometry
from patchcert.results import TABLE_FIELDS


class _Net(ScoreMapModel):
    def __init__(self) -> None:
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.arch, self.config, self.num_classes = "api_net", {}, 3
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)
        self.geometry = trace_geometry([(3, 1, 1), (1, 1, 0)], input_size=(12, 12))

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, f):
        return self.head(f)


def _uint8(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_the_api_is_exported_from_the_package():
    for name in ("certify_dataset", "attack_dataset", "load_pretrained", "load_dataset", "records_table"):
        assert callable(getattr(patchcert, name)) and name in patchcert.__all__


def test_float_tensors_pairs_and_pil_images_certify_like_the_dataset(tmp_path):
    from PIL import Image

    model = _Net().eval()
    xb, y = _uint8()
    ref = patchcert.certify_dataset(model, ImageDataset(xb, y, ("a", "b", "c"), "ref"), defenses=["voting", "clipping"],
                                    patches=["2x2"], square_cap=0)
    assert ref.summary.metadata.device == ("cuda" if torch.cuda.is_available() else "cpu")  # device="auto"
    xf = xb.float() / 255
    pairs = [(xf[i], int(y[i])) for i in range(len(y))]
    pil = [(Image.fromarray(xb[i].permute(1, 2, 0).numpy()), int(y[i])) for i in range(len(y))]

    class DS:  # a map-style dataset, torchvision-like
        classes = ["a", "b", "c"]

        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            return pairs[i]

    for data in ((xf, y), pairs, DS(), pil):
        run = patchcert.certify_dataset(model, data, defenses=["voting", "clipping"], patches=["2x2"], square_cap=0)
        assert [r.to_json() for r in run.records] == [r.to_json() for r in ref.records]
    table = ref.table()
    assert len(table) == 6 * 2 and set(table[0]) == set(TABLE_FIELDS)
    assert {(r["index"], r["defense"], r["patch"]) for r in table} == {
        (i, k, "2x2") for i in range(6) for k in ("voting(sign,3.2)", "clipping(tanh)")}
    row = next(r for r in table if r["index"] == 2 and r["defense"] == "voting(sign,3.2)")
    rec = ref.records[2].defenses["voting(sign,3.2)"]
    assert row["certified"] == rec.certified["2x2"] and row["pred"] == rec.pred and row["label"] == int(y[2])
    patchcert.records_table(ref, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == TABLE_FIELDS


def test_attack_dataset_in_memory_and_its_table():
    model = _Net().eval()
    xb, y = _uint8(5, seed=1)
    with torch.no_grad():
        y = create_labels = patchcert.create_defense("voting").predict(model.score_map(xb.float() / 255))
    run = patchcert.attack_dataset(model, (xb.float() / 255, y), patches=["3x3"],
                                   config=patchcert.attacks.PatchAttackConfig(steps=5, step_size=0.1))
    assert run.out_dir is None and len(run.records) == 5 and run.failures == []
    table = run.table()
    assert len(table) == 5 and all(r["attacked"] is not None for r in table)
    assert all(r["correct"] for r in table) and create_labels.shape == (5,)


def test_bad_in_memory_data_is_one_line():
    model = _Net().eval()
    xb, y = _uint8()
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        patchcert.certify_dataset(model, (xb.float(), y))  # 0..255 floats: not in [0, 1]
    with pytest.raises(DataError, match="differ in shape"):
        as_image_dataset([(torch.rand(3, 12, 12), 0), (torch.rand(3, 10, 12), 1)])
    with pytest.raises(DataError, match=r"\(image, label\)"):
        as_image_dataset([torch.rand(3, 12, 12)])


def test_the_library_never_switches_the_matplotlib_backend(tmp_path):
    import matplotlib

    from patchcert.report import plot_attack_example

    before = matplotlib.get_backend()
    res = {"attacked": True, "success": False, "adv_pred": 0, "target": 1, "pixel": [2, 3], "patch": [2, 2]}
    out = plot_attack_example(tmp_path / "a.png", torch.rand(3, 12, 12), torch.rand(3, 12, 12), torch.rand(12, 12),
                              torch.rand(12, 12), res, 0, 0, ["a", "b"], "voting(sign,3.2)", "2x2", False, None)
    assert out.is_file() and out.stat().st_size > 1000
    assert matplotlib.get_backend() == before
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out))
    assert arr.shape[0] > 200
