"""Copy a finished training run's model into the package's shipped weights.

    python scripts/ship_model.py runs/doublemask_cifar10_fastnet doublemask_cifar10 \
        --command "PATCHCERT_DATA=../shared/data patchcert train --config configs/doublemask_cifar10_fastnet.toml" \
        --training "50 epochs, bf16 + channels_last, 2 CPU cores"

``--deploy "double-masking:bf16=true,channels_last=true" --evidence "..."`` records the measured
deployment (``checkpoint_meta["deployment"]``): the options a defense spec that leaves them out
takes for this model (see README, "Deployment options"); give it only with a measurement.

Writes ``src/patchcert/weights/<name>.safetensors`` (the tensors unchanged; metadata made portable:
no absolute paths) and ``<name>.json`` (the same metadata + the file's SHA-256, checked on load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patchcert.checkpoint import file_sha256, load_tensors, portable_metadata, save_tensors


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("name")
    p.add_argument("--command", default="")
    p.add_argument("--training", default="")
    p.add_argument("--deploy", action="append", default=[], metavar="SPEC",
                   help="a defense's measured deployment options, e.g. double-masking:bf16=true (repeatable)")
    p.add_argument("--evidence", default="", help="the measurement behind --deploy (required with it)")
    a = p.parse_args()
    if a.deploy and not a.evidence:
        p.error("--deploy needs --evidence (the measurement that shows the options change no certificate)")
    tensors, meta = load_tensors(Path(a.run) / "model.safetensors")
    meta = portable_metadata(meta)
    if a.deploy:
        from patchcert.errors import PatchcertError
        from patchcert.specs import parse_defense_spec

        meta["deployment"] = {}
        for text in a.deploy:
            try:
                spec = parse_defense_spec(text)
            except PatchcertError as e:
                p.error(f"--deploy {text!r}: {e}")
            meta["deployment"][spec.name] = {"options": dict(spec.params), "evidence": a.evidence}
    meta.update({"command": a.command, "training": a.training,
                 "data_note": "CIFAR-10 (re-encoded copy: pixels went through JPEG); not standard CIFAR-10 numbers"})
    out = Path(__file__).resolve().parents[1] / "src" / "patchcert" / "weights" / f"{a.name}.safetensors"
    save_tensors(out, tensors, meta)
    side = {**meta, "sha256": file_sha256(out)}
    out.with_suffix(".json").write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    print(out, side["sha256"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
