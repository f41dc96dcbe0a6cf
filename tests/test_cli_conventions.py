"""CLI conventions (issue 17): the patchcert logger only, -v/-q after the verb, train
--print-config, `models` at 80 columns, one --json shape."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from patchcert.cli import main
from patchcert.cli._logging import TqdmHandler


def test_only_the_patchcert_logger_is_configured(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHCERT_WEIGHTS_DIR", str(tmp_path))
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    mpl = logging.getLogger("matplotlib.font_manager")
    try:
        assert main(["models", "-v"]) == 0  # -v after the verb
        assert (list(root.handlers), root.level) == before
        pc = logging.getLogger("patchcert")
        assert pc.level == logging.DEBUG and sum(isinstance(h, TqdmHandler) for h in pc.handlers) == 1
        assert not mpl.isEnabledFor(logging.DEBUG) or mpl.getEffectiveLevel() == root.level
        assert main(["models", "-q"]) == 0
        assert pc.level == logging.WARNING and sum(isinstance(h, TqdmHandler) for h in pc.handlers) == 1
        assert main(["-v", "models"]) == 0 and pc.level == logging.DEBUG  # before the verb still works
        capsys.readouterr()
        assert main(["models", "-v", "-q"]) == 2
        assert "not both" in capsys.readouterr().err
    finally:
        for h in list(logging.getLogger("patchcert").handlers):
            if isinstance(h, TqdmHandler):
                logging.getLogger("patchcert").removeHandler(h)
        logging.getLogger("patchcert").setLevel(logging.NOTSET)


def test_log_lines_go_around_the_progress_bar(capsys):
    from tqdm import tqdm

    from patchcert.cli._logging import configure_logging

    log = configure_logging()
    try:
        bar = tqdm(total=3, desc="work", file=None)
        logging.getLogger("patchcert.test").info("a line of its own")
        bar.close()
        err = capsys.readouterr().err
        line = [ln for ln in err.replace("\r", "\n").splitlines() if "a line of its own" in ln]
        assert line and all("work" not in ln for ln in line)  # never glued onto the bar
    finally:
        for h in list(log.handlers):
            if isinstance(h, TqdmHandler):
                log.removeHandler(h)
        log.setLevel(logging.NOTSET)


def test_train_print_config_lists_every_field(capsys):
    from patchcert.train import TrainConfig

    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        line = [ln for ln in out.splitlines() if ln.startswith(f"{f.name} = ")]
        assert line, f.name
        help_line = out.splitlines()[out.splitlines().index(line[0]) + 1]
        assert help_line.startswith("    ") and len(help_line.strip()) > 5, f.name
    assert "mask_cutout" in out and "init_from" in out
    assert main(["train", "--print-config", "--epochs", "7"]) == 0
    assert "epochs = 7 (default 30)" in capsys.readouterr().out


def test_train_help_lists_mask_cutout(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "mask_cutout" in capsys.readouterr().out


def test_models_fits_80_columns(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert max(len(ln) for ln in out.splitlines()) <= 80
    # descriptions end at a sentence, never mid-sentence
    assert "BagCert CIFAR-10 net (32x32 in, 32x32 map, stride 1)." in out
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["verb"] == "models" and isinstance(doc["results"], list) and "pretrained" in doc
