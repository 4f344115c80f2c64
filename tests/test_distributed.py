"""Distributed runtime: device/backend choice, planner constraints, and a real 2-rank sharded job."""

from __future__ import annotations

import json

import pytest
import torch

from trec.config import ShardingConfig, ShardingKind, TableShardingConfig
from trec.distributed import allowed_sharding_types, build_constraints, pick_device
from trec.errors import TrecError


def test_cpu_machine_picks_gloo():
    device, backend = pick_device("auto")
    if torch.cuda.is_available():
        assert (device.type, backend) == ("cuda", "nccl")
    else:
        assert (device.type, backend) == ("cpu", "gloo")
    assert pick_device("cpu") == (torch.device("cpu"), "gloo")


def test_row_wise_is_refused_on_cpu_with_advice():
    with pytest.raises(TrecError, match="row_wise needs CUDA; on CPU use table_wise"):
        allowed_sharding_types([ShardingKind.row_wise], torch.device("cpu"))
    assert "row_wise" in allowed_sharding_types([], torch.device("cuda"))
    assert "row_wise" not in allowed_sharding_types([], torch.device("cpu"))
    # Listed beside CPU-capable kinds (a config shared by CPU and CUDA runs), it is skipped on CPU.
    mixed = [ShardingKind.table_wise, ShardingKind.row_wise]
    assert allowed_sharding_types(mixed, torch.device("cpu")) == ["table_wise"]
    assert allowed_sharding_types(mixed, torch.device("cuda")) == ["table_wise", "row_wise"]


def test_constraints_per_table_override_section_default():
    cfg = ShardingConfig(
        sharding_types=[ShardingKind.table_wise],
        tables={"t_item_id": TableShardingConfig(sharding_types=[ShardingKind.column_wise], min_partition=16)},
    )
    constraints = build_constraints(cfg, ["t_user_id", "t_item_id"], torch.device("cpu"))
    assert constraints["t_user_id"].sharding_types == ["table_wise"]
    assert constraints["t_item_id"].sharding_types == ["column_wise"]
    assert constraints["t_item_id"].min_partition == 16
    assert constraints["t_item_id"].compute_kernels == ["fused"]


def test_constraints_reject_unknown_table():
    cfg = ShardingConfig(tables={"t_itme_id": TableShardingConfig()})
    with pytest.raises(TrecError, match="sharding.tables: unknown table 't_itme_id'"):
        build_constraints(cfg, ["t_item_id"], torch.device("cpu"))


def _held_by_rank(out_dir):
    reports = [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    return [r["held"] for r in reports], reports


@pytest.mark.dist
def test_two_rank_table_wise_puts_each_table_on_one_rank(torchrun, tmp_path):
    torchrun(2, "tests/workers/shard_ebc.py", tmp_path, "table_wise")
    held, reports = _held_by_rank(tmp_path)
    assert all(kind == "table_wise" for kind in reports[0]["plan"].values())
    tables0, tables1 = set(held[0]), set(held[1])
    assert tables0 and tables1, "each rank must hold at least one table"
    assert tables0.isdisjoint(tables1)
    assert tables0 | tables1 == {f"embedding_bags.t_{i}.weight" for i in range(4)}
    for shards in held[0].values():  # a whole table: full rows and full 32 columns
        assert shards[0]["offsets"] == [0, 0] and shards[0]["shape"][1] == 32


@pytest.mark.dist
def test_two_rank_column_wise_splits_every_table_by_columns(torchrun, tmp_path):
    torchrun(2, "tests/workers/shard_ebc.py", tmp_path, "column_wise", "16")
    held, _ = _held_by_rank(tmp_path)
    assert set(held[0]) == set(held[1]) == {f"embedding_bags.t_{i}.weight" for i in range(4)}
    for table in held[0]:
        offsets = sorted(shard["offsets"][1] for rank in (0, 1) for shard in held[rank][table])
        assert offsets == [0, 16], table  # the two halves of the 32 columns, one per rank
