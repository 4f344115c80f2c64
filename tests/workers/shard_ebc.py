"""2-rank sharding smoke job: shard a small EmbeddingBagCollection with trec's planner and DMP.

Each rank runs one forward/backward step and writes what it holds (table → local shard shape)
to ``OUT_DIR/rank-R.json``, so a test can assert that the tables really were split across ranks.
Usage: ``torchrun --nproc_per_node 2 tests/workers/shard_ebc.py OUT_DIR [SHARDING_TYPE [MIN_PARTITION]]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from trec.config import ShardingConfig, ShardingKind, TableShardingConfig
from trec.distributed import distributed_session, shard_model


def describe_plan(sharded) -> dict[str, str]:
    """table name → sharding type chosen by the planner (what this worker reports)."""
    plan = getattr(sharded, "plan", None)
    placement: dict[str, str] = {}
    if plan is None:
        return placement
    for module_plan in plan.plan.values():
        for table, param_sharding in module_plan.items():
            placement[table] = param_sharding.sharding_type
    return placement


def main() -> None:
    out_dir = Path(sys.argv[1])
    kinds = [ShardingKind(sys.argv[2])] if len(sys.argv) > 2 else [ShardingKind.table_wise]
    min_partition = int(sys.argv[3]) if len(sys.argv) > 3 else None
    tables = [
        EmbeddingBagConfig(name=f"t_{i}", embedding_dim=32, num_embeddings=1000 * (i + 1), feature_names=[f"f_{i}"])
        for i in range(4)
    ]
    with distributed_session(seed=0) as ctx:
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        per_table = {t.name: TableShardingConfig(min_partition=min_partition) for t in tables}
        model = shard_model(ebc, ShardingConfig(sharding_types=kinds, tables=per_table), ctx, batch_size=8)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f_{i}" for i in range(4)],
            values=torch.arange(16, dtype=torch.long) + ctx.rank,
            lengths=torch.ones(16, dtype=torch.int32),
        )
        pooled = model(features)  # a KeyedTensor: B X (sum of table dims)
        pooled.values().sum().backward()
        held = {}
        for key, value in model.state_dict().items():
            shards = getattr(value, "local_shards", lambda: [])()
            if shards:
                held[key] = [
                    {"offsets": list(shard.metadata.shard_offsets), "shape": list(shard.tensor.shape)}
                    for shard in shards
                ]
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"rank": ctx.rank, "world_size": ctx.world_size, "plan": describe_plan(model), "held": held,
                   "pooled_shape": list(pooled.values().shape)}
        (out_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(payload, indent=2))
        print(json.dumps(payload))


if __name__ == "__main__":
    main()
