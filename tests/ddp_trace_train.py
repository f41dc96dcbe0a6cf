"""Helper for tests/test_loader.py (not collected): ``train()`` under torchrun, recording which
examples each rank decodes.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_trace_train.py CONFIG.json TRACE_DIR``

Every read of an image-folder item (in the rank's process or in its DataLoader workers, which
inherit the patch) appends ``<index>`` to ``TRACE_DIR/rank<RANK>.txt``; reads done by the
evaluation are not training reads and go to ``TRACE_DIR/eval<RANK>.txt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from patchcert.data import ImageFolderDataset
from patchcert.train import TrainConfig, train


def main() -> None:
    cfg = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    trace = Path(sys.argv[2])
    rank = os.environ.get("RANK", "0")
    real = ImageFolderDataset.__getitem__

    def traced(self, i):  # type: ignore[no-untyped-def]
        kind = "rank" if self.train_view else "eval"
        with open(trace / f"{kind}{rank}.txt", "a") as f:
            f.write(f"{int(i)}\n")
        return real(self, i)

    ImageFolderDataset.__getitem__ = traced  # type: ignore[method-assign]
    train(cfg)


if __name__ == "__main__":
    main()
