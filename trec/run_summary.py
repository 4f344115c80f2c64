"""The start-of-run summary in the log: each table's shape and placement, bytes per rank, parameters.

Read from the sharding plan DMP holds (``model.plan``), so it shows what the planner chose, not
what the config asked for::

    model: 6 tables (39,360 parameters), 135,840 dense parameters (replicated on every rank)
      table               rows x dim  sharding          ranks
      item_id              101 x  64  table_wise        0
      ...
    table weights per rank (fp32, without optimizer state): rank 0 154 KiB, rank 1 ...

The planner's estimates with optimizer state and buffers are :mod:`trec.memory`'s log lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trec.memory import format_bytes

TABLE_BYTES = 4  # trec's tables are fp32


@dataclass
class TablePlacement:
    """Where one table lives: its shape and the rows x columns each rank holds."""

    name: str
    rows: int
    dim: int
    sharding: str
    rank_elements: dict[int, int]
    """rank → weight elements it holds (the whole table on each rank for data_parallel)."""


def table_placements(model: nn.Module) -> list[TablePlacement]:
    """Every table of the DMP-wrapped ``model``'s plan (empty for a model without one)."""
    plan = getattr(model, "plan", None)
    if plan is None:
        return []
    params = dict(model.named_parameters())
    tables = []
    for path, module_plan in plan.plan.items():
        for name, sharding in module_plan.items():
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            if shards:
                rows = max(s.shard_offsets[0] + s.shard_sizes[0] for s in shards)
                dim = max(s.shard_offsets[1] + s.shard_sizes[1] for s in shards)
                elements: dict[int, int] = {}
                for s in shards:
                    rank = s.placement.rank()
                    elements[rank] = elements.get(rank, 0) + s.shard_sizes[0] * s.shard_sizes[1]
            else:  # data_parallel: no spec, a full copy on every rank of the plan
                weight = params.get(f"{path}.embedding_bags.{name}.weight",
                                    params.get(f"{path}.embeddings.{name}.weight"))
                rows, dim = tuple(weight.shape) if weight is not None else (0, 0)
                elements = {rank: rows * dim for rank in sharding.ranks or []}
            tables.append(TablePlacement(name, rows, dim, sharding.sharding_type, elements))
    return tables


def dense_parameters(model: nn.Module) -> int:
    """Parameters outside the sharded tables (the dense part, replicated on every rank)."""
    plan = getattr(model, "plan", None)
    paths = tuple(f"{path}." for path in plan.plan) if plan is not None else ()
    return sum(p.numel() for name, p in model.named_parameters() if not (paths and name.startswith(paths)))


def format_duration(seconds: float) -> str:
    """``12s``, ``4m12s``, ``1h02m``."""
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plan_summary(model: nn.Module, world_size: int) -> str:
    """The multi-line start-of-run summary of the DMP-wrapped ``model`` (see the module docstring)."""
    tables = table_placements(model)
    sparse = sum(t.rows * t.dim for t in tables)
    lines = [f"model: {len(tables)} tables ({sparse:,} parameters), "
             f"{dense_parameters(model):,} dense parameters (replicated on every rank)"]
    if tables:
        width = max(len("table"), *(len(t.name) for t in tables))
        lines.append(f"  {'table':<{width}}  {'rows':>10} x dim  {'sharding':<18}ranks")
        for t in tables:
            ranks = ",".join(str(rank) for rank in sorted(t.rank_elements))
            lines.append(f"  {t.name:<{width}}  {t.rows:>10,} x {t.dim:>3}  {t.sharding:<18}{ranks}")
        per_rank = [sum(t.rank_elements.get(rank, 0) for t in tables) * TABLE_BYTES for rank in range(world_size)]
        lines.append("table weights per rank (fp32, without optimizer state): "
                     + ", ".join(f"rank {rank} {format_bytes(b)}" for rank, b in enumerate(per_rank)))
    return "\n".join(lines)
