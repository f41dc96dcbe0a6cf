"""Wrap-around geometries (De-randomized smoothing's column bands and blocks): ``attack``,
``certify`` and ``report`` must certify with the very same (wrapping) defense and agree on
which examples are certified.

The models here are hand-built so that the answer is known: their score maps hold votes
arranged so that every window placement *inside* the map passes BagCert's Condition 3.2 (a tie
at worst, which the label 0 wins) while the placement *wrapping around* the edge fails. A
defense built without ``wrap`` therefore certifies the image; the sound (wrapping) one does
not. Before the fix ``patchcert attack`` built its defenses without the geometry's ``wrap``
and recorded such an image as certified.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcert.cli import main
from patchcert.defenses import create_defense
from patchcert.geometry import Geometry
from patchcert.models import list_models, register_model
from patchcert.models.base import ScoreMapModel

# cell states: A votes for class 0, B for class 1, N for neither (sign votes: 1[score >= 0])
A, N, B = 255, 128, 0


class _BandNet(ScoreMapModel):
    """Votes read off the red channel: red 1 -> class 0, red 0 -> class 1, red 1/2 -> neither.

    ``mode="column"``: one cell per column (the column's mean red), map ``[N, 2, 1, W]``;
    ``mode="block"``: one cell per pixel, map ``[N, 2, H, W]``. The declared geometry is DS's
    with band/block size 2 (``wrap=True``): a 1-pixel patch reaches 2 cells, wrapping around.
    (The true field is 1 pixel: declaring a larger one is conservative, hence sound.)"""

    def __init__(self, num_classes: int = 2, mode: str = "column") -> None:
        super().__init__((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.arch, self.config, self.num_classes = f"wrap_{mode}_net", {}, num_classes
        self.mode = mode
        self.scale = torch.nn.Parameter(torch.tensor(8.0))  # a parameter, so the model has a device
        rf = (None, 2) if mode == "column" else (2, 2)
        self.geometry = Geometry(rf=rf, stride=(1, 1), offset=(0, 0), wrap=True, input_size=(16, 16))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        r = x[:, 0]
        r = r.mean(1, keepdim=True) if self.mode == "column" else r  # [N, 1|H, W]
        s0 = self.scale * (r - 0.625)
        s1 = self.scale * (0.375 - r)
        return torch.stack([s0, s1], 1)


for _mode in ("column", "block"):
    if f"wrap_{_mode}_net" not in list_models():
        def _factory(num_classes: int = 2, _m: str = _mode) -> _BandNet:
            return _BandNet(num_classes, _m)

        _factory.__name__ = f"wrap_{_mode}_net"
        register_model(_factory)


def _column_image() -> np.ndarray:
    """Columns A N A N ... A N N A (8 A, 5 B, 3 N): no two A's are adjacent inside the map,
    columns 15 and 0 (adjacent only with wrap-around) are both A. n0 - n1 = 3, so a 2-wide
    window margin is ``3 - (A's in it) + (B's in it) - 2``: >= 0 inside, -1 on the wrap."""
    cols = [A, B, A, B, A, B, A, B, A, B, A, N, A, N, N, A]
    red = np.tile(np.array(cols, dtype=np.uint8), (16, 1))
    return red


def _block_image() -> np.ndarray:
    """A on the four corners and on the even cells of rows/cols 2..12 (40 A), 35 B, rest N:
    every 2x2 window inside the map holds at most one A and some hold one A and no B; the
    wrapping corner window holds four. n0 - n1 = 5: margin 1 - (A - B) >= 0 inside, -3 on the wrap."""
    red = np.full((16, 16), N, dtype=np.uint8)
    for i in (0, 15):
        for j in (0, 15):
            red[i, j] = A
    for i in range(2, 13, 2):
        for j in range(2, 13, 2):
            red[i, j] = A
    free = [(i, j) for i in range(16) for j in range(16) if red[i, j] == N and i not in (2, 3) and j not in (2, 3)]
    for i, j in free[:35]:
        red[i, j] = B
    return red


def _write_folder(root: Path, red0: np.ndarray) -> Path:
    """Class ``a`` (label 0): the crafted image and a plain all-A image (certified either way);
    class ``b`` (label 1): an all-B image."""
    imgs = {("a", "0"): red0, ("a", "1"): np.full((16, 16), A, np.uint8), ("b", "0"): np.full((16, 16), B, np.uint8)}
    for (c, name), red in imgs.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        rgb = np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1)
        Image.fromarray(rgb, "RGB").save(root / c / f"{name}.png")
    return root


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def test_the_crafted_maps_separate_wrapping_from_non_wrapping_defenses():
    for mode, red in (("column", _column_image()), ("block", _block_image())):
        model = _BandNet(mode=mode)
        x = torch.from_numpy(np.stack([red, 0 * red, 0 * red])).float().div(255)[None]
        s = model.score_map(x).detach().double()
        y = torch.tensor([0])
        win = model.geometry.window((1, 1))
        assert win == ((1, 2) if mode == "column" else (2, 2))
        flat = create_defense("voting", wrap=False)
        wrapping = create_defense("voting", wrap=True)
        assert bool(flat.predict(s)[0] == 0)
        assert bool(flat.certify(s, y, [win])[0]), mode       # the unsound defense certifies it ...
        assert not bool(wrapping.certify(s, y, [win])[0]), mode  # ... the wrapping one does not


@pytest.mark.parametrize("mode", ["column", "block"])
def test_attack_certify_and_report_agree_on_wrapping_geometries(mode, tmp_path, capsys):
    data = _write_folder(tmp_path / "data", _column_image() if mode == "column" else _block_image())
    common = ["--model", f"wrap_{mode}_net", "--dataset", f"imagefolder:{data}", "--dataset-cfg",
              '{"size": 16, "resize": 16}', "--patch", "1x1", "--patch", "2x2", "--defense", "voting",
              "--defense", "voting:condition=3.3", "--no-progress", "--json"]
    cert, att, rep = tmp_path / "cert", tmp_path / "att", tmp_path / "rep"
    assert main(["certify", *common, "--out", str(cert)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["attack", *common, "--steps", "5", "--step-size", "0.1", "--out", str(att)])
    err = capsys.readouterr().err
    assert rc == 0, err
    # attack recorded the defenses certify built: wrapping ones, under the same keys
    cert_cfg = json.loads((cert / "config.json").read_text())
    att_cfg = json.loads((att / "config.json").read_text())
    assert att_cfg["defenses"] == cert_cfg["defenses"]
    assert all(d["config"]["wrap"] is True for d in att_cfg["defenses"])
    keys = [d["key"] for d in cert_cfg["defenses"]]
    assert keys == ["voting(sign,3.2,wrap)", "voting(sign,3.3,wrap)"]
    # per example, per defense, per patch: the same certified flags
    c_recs, a_recs = _records(cert), _records(att)
    assert [r["index"] for r in c_recs] == [r["index"] for r in a_recs] == [0, 1, 2]
    for c, a in zip(c_recs, a_recs):
        for k in keys:
            for p in ("1x1", "2x2"):
                assert c["defenses"][k]["certified"][p] == a["defenses"][k]["certified"][p], (c["index"], k, p)
    # the crafted image (index 0) is not certified (the wrapping window breaks it); the plain one is
    assert not c_recs[0]["defenses"][keys[0]]["certified"]["1x1"]
    assert c_recs[1]["defenses"][keys[0]]["certified"]["1x1"]
    # the report joins the two runs row by row and shows the same certified accuracy
    assert main(["report", str(cert), "--attack", str(att), "--out", str(rep), "--no-plots", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = doc["results"]
    assert len(rows) == len(keys) * 2  # every attack result joined a certify row: no rows of its own
    summary = json.loads((att / "summary.json").read_text())
    acc = {(r["defense"], r["patch"]): r["certified_accuracy"] for r in summary["results"]}
    for r in rows:
        assert r["attack"] is not None
        assert r["certified_accuracy"] == acc[(r["defense"], r["patch"])]
        assert r["soundness_failures"] == 0


@pytest.mark.parametrize("mode", ["column", "block"])
def test_training_evaluation_certifies_with_the_wrapping_defense(mode, tmp_path):
    from patchcert.data import load_dataset
    from patchcert.errors import PatchcertError
    from patchcert.train.loop import evaluate

    data = load_dataset(f"imagefolder:{_write_folder(tmp_path, _column_image() if mode == 'column' else _block_image())}",
                        size=16, resize=16)
    model = _BandNet(mode=mode)
    ev = evaluate(model, data, "1x1", torch.device("cpu"), defense={"name": "voting", "binarize": "sign"})
    assert ev == {"clean_acc": 1.0, "cert_acc": 2 / 3}  # the crafted image is not certified
    with pytest.raises(PatchcertError, match="wrap"):
        evaluate(model, data, "1x1", torch.device("cpu"), defense={"name": "voting", "wrap": False})
