"""``patchcert models``: the registered models (default geometry) and the shipped pretrained ones."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
import textwrap
from typing import Any

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models and shipped pretrained weights",
                       description="Registered models with their default receptive field, stride and wrap-around, "
                                   "and the pretrained checkpoints shipped with patchcert.")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def model_info(name: str) -> dict[str, Any]:
    """Name, one-line description, options (defaults) and default geometry of a registered model.

    The model is built as a skeleton on the meta device (no memory, no initialisation).
    """
    from ..models import model_entrypoint
    from ..models.convert import skeleton_model

    fn = model_entrypoint(name)
    params = inspect.signature(fn).parameters
    options = {k: p.default for k, p in params.items()
               if k != "num_classes" and p.default is not inspect.Parameter.empty}
    doc = inspect.getdoc(fn) or ""
    ncls = params["num_classes"].default if "num_classes" in params else None
    info: dict[str, Any] = {"name": name, "description": _first_sentence(doc),
                            "num_classes": ncls, "options": options, "geometry": None}
    try:
        m = skeleton_model(name, ncls if isinstance(ncls, int) else 10)
        info["geometry"] = m.geometry.to_dict()
    except Exception as e:  # a model that cannot be built with its defaults is still listed
        log.debug("cannot build %s with defaults: %s", name, e)
    return info


def _first_sentence(doc: str) -> str:
    """The docstring's first paragraph, cut after its first sentence (never mid-sentence)."""
    para = " ".join(doc.split("\n\n", 1)[0].split())
    for i, ch in enumerate(para):
        if ch == "." and (i + 1 == len(para) or para[i + 1] == " ") and not para[max(0, i - 3):i].endswith(("e.g", "i.e")):
            return para[:i + 1]
    return para


def pretrained_info() -> list[dict[str, Any]]:
    """The shipped models (``patchcert.pretrained.list_pretrained()``)."""
    from ..pretrained import list_pretrained

    return [dict(d) for d in list_pretrained()]


def _fmt_geom(g: dict | None) -> tuple[str, str, str, str]:
    if g is None:
        return ("?", "?", "?", "?")

    def pair(v) -> str:
        a, b = v
        a = "all" if a is None else a
        b = "all" if b is None else b
        return str(a) if a == b else f"{a} x {b}"

    size = "any" if g.get("input_size") is None else "x".join(str(v) for v in g["input_size"])
    return (pair(g["rf"]), pair(g["stride"]), "yes" if g.get("wrap") else "no", size)


def _first(d: dict, *keys: str) -> Any:
    for k in keys:
        if d.get(k) not in (None, "", {}):
            return d[k]
    return None


def _accuracy(meta: dict) -> str:
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    found = {k: v for src in (metrics, meta) for k, v in src.items()
             if "acc" in k.lower() and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ", ".join(f"{k}={v:.4g}" for k, v in found.items()) or "-"


def _data(meta: dict) -> str:
    d = meta.get("data")
    if isinstance(d, dict):
        name = _first(d, "dataset", "name")
        if name is None:
            return json.dumps(d, sort_keys=True)
        split = d.get("split")
        return f"{name} ({split})" if split else str(name)
    return "-" if d is None else str(d)


_TRAIN_KEYS = ("model", "model_cfg", "objective", "objective_cfg", "dataset", "epochs", "batch_size", "lr", "seed")


def _training(meta: dict) -> str:
    """The recorded training command, else the key settings of the recorded training config."""
    cmd = _first(meta, "command", "train_command", "training_command")
    if cmd is not None:
        return str(cmd)
    tc = meta.get("train_config")
    if isinstance(tc, dict) and tc:
        parts = [f"{k}={json.dumps(tc[k], sort_keys=True) if isinstance(tc[k], (dict, list)) else tc[k]}"
                 for k in _TRAIN_KEYS if tc.get(k) not in (None, "", {})]
        return "patchcert train " + " ".join(parts)
    return "-"


def _deployment(meta: dict) -> str:
    """The measured deployment options per defense (``checkpoint_meta["deployment"]``), or ''."""
    dep = meta.get("deployment")
    if not isinstance(dep, dict):
        return ""
    parts = []
    for name, entry in dep.items():
        opts = entry.get("options") if isinstance(entry, dict) else None
        if isinstance(opts, dict) and opts:
            parts.append(f"{name}:" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                               for k, v in opts.items()))
    return "; ".join(parts)


def _epochs(meta: dict) -> str:
    done = _first(meta, "epochs", "epoch")
    tc = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    total = tc.get("epochs")
    if done is None:
        return "-" if total is None else str(total)
    return f"{done}/{total}" if total is not None else str(done)


def run(args: argparse.Namespace) -> int:
    from ..models import list_models

    models = [model_info(n) for n in list_models()]
    pre = pretrained_info()
    if args.json:
        from ._output import print_json

        print_json("models", models, pretrained=pre)
        return 0
    width = max(60, min(shutil.get_terminal_size((80, 24)).columns, 100))
    out = ["registered models (patchcert.create_model; rf/stride in pixels, 'all' = global):", ""]
    for m in models:
        rf, st, wrap, size = _fmt_geom(m["geometry"])
        geo = f"rf {rf}, stride {st}, input {size}" + (", wraps" if wrap == "yes" else "")
        out.append(f"{m['name']:<16} {geo}" if len(m["name"]) < 16 else f"{m['name']}  {geo}")
        out += _wrap(m["description"], width)
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items())
        if opts:
            out += _wrap(f"options: {opts}", width)
    if not pre:
        out += ["", "pretrained models: none shipped"]
        print("\n".join(out))
        return 0
    out += ["", "pretrained models (patchcert.pretrained; --model NAME):", ""]
    for d in pre:
        meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else d
        cfg = meta.get("config")
        arch = str(_first(meta, "arch") or "-") + (f" {json.dumps(cfg, sort_keys=True)}" if cfg else "")
        name = str(d.get("name", "?")) + (" (default)" if d.get("default") else "")
        out.append(name)
        rows = [("arch", arch), ("data", _data(meta)), ("epochs", _epochs(meta)),
                ("accuracy", _accuracy(meta)), ("training", _training(meta))]
        dep = _deployment(meta)
        if dep:
            rows.append(("deployment", dep))
        for label, text in rows:
            out += _wrap(f"{label}: {text}", width)
    print("\n".join(out))
    return 0


def _wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped to ``width`` columns under a 4-space indent (long words are not broken)."""
    return textwrap.wrap(text, width=width, initial_indent="    ", subsequent_indent="      ",
                         break_long_words=False, break_on_hyphens=False) or ["    -"]
