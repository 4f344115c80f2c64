"""2-rank check of the replicated managed-collision remapper (trec.models.managed.ManagedIds).

Each rank feeds different raw IDs for a few training steps; the remapper all-gathers them, so
both replicas must end with the same state and map any ID to the same row. Each rank writes its
state and the rows of a probe set of IDs to ``OUT_DIR/rank-R.json``.
Usage: ``torchrun --nproc_per_node 2 tests/workers/managed_ids.py OUT_DIR``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

from trec.config import ManagedCollisionConfig
from trec.distributed import distributed_session
from trec.models.managed import ManagedIds


def main() -> None:
    out_dir = Path(sys.argv[1])
    with distributed_session(seed=0) as ctx:
        remapper = ManagedIds({"item_id": 8}, {"item_id": ("item_id", True)}, ManagedCollisionConfig())
        remapper.train()
        generator = torch.Generator().manual_seed(ctx.rank)  # each rank its own IDs and batch size
        for _ in range(4):
            ids = torch.randint(0, 12, (3 + ctx.rank * 2,), generator=generator) * 1_000_003 + 7
            remapper(KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32)))
        remapper.eval()
        probe = torch.arange(12) * 1_000_003 + 7
        rows = remapper.rows("item_id", probe)
        state = {key: value.tolist() for key, value in remapper.state_dict().items()}
        (out_dir / f"rank-{ctx.rank}.json").write_text(json.dumps({"rows": rows.tolist(), "state": state}))


if __name__ == "__main__":
    main()
