"""Memory per rank: what a sharding plan puts on each rank, the refusal when no plan fits, peak RSS, huge pages.

Plan bytes are torchrec's planner estimates (``Shard.storage``): a shard's weights, the state of
the fused optimizer attached to its table (RowWiseAdagrad: one float per row, Adam: two per
weight) and the planner's estimate of the shard's input/output buffers at the batch size. They are
counted in the memory the tables live in, the tier: HBM on CUDA, host memory (DDR) on CPU. Each
rank's cap is the Topology's (``sharding.hbm_cap_gb`` / ``ddr_cap_gb``, else measured); the planner
first reserves part of it (dense parameters, input batches) and places table shards in the rest.

No process group here, and torchrec is imported only inside functions: the planner's objects
come in as arguments (trec.distributed builds the planner).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trec.config import ShardingConfig
from trec.errors import TrecError

if TYPE_CHECKING:  # torch stays unimported here: trec.cli reads HUGE_PAGES_ENV before torch may load
    from torch import nn

# PyTorch's CPU allocator backs each buffer of 2 MiB or more with transparent huge pages when this is
# 1. Embedding rows are read at random, so with 4 KiB pages a large table pays a TLB miss per lookup:
# at 100M rows the tables step cost 1.49-1.80x its cost at 1M rows, with huge pages 1.25-1.37x
# (`trec bench scale`). c10 reads the variable once, at its first allocation, so the process entry
# (trec.cli.run_cli) sets it to 1 before anything imports torch, for that process and the ranks it
# launches, unless the environment chose: 0 keeps 4 KiB pages.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: float) -> str:
    """``count`` bytes with a binary unit and about three digits, e.g. ``1.23 MiB``, ``392 KiB``."""
    unit = 0
    while abs(count) >= 1024 and unit < len(_UNITS) - 1:
        count, unit = count / 1024, unit + 1
    if unit == 0:
        return f"{int(count)} B"
    return f"{count:.{0 if abs(count) >= 100 else 1 if abs(count) >= 10 else 2}f} {_UNITS[unit]}"


def memory_tier(compute_device: str) -> str:
    """The ``Storage`` field a device's tables are counted in: ``hbm`` on an accelerator, ``ddr`` on CPU."""
    return "ddr" if compute_device == "cpu" else "hbm"


@dataclass(frozen=True)
class TablePlacement:
    """Where the plan put one table: its sharding type, the ranks holding its shards, its bytes."""

    sharding_type: str
    ranks: tuple[int, ...]
    shards: int
    bytes: int


@dataclass(frozen=True)
class PlanMemory:
    """What a sharding plan puts on each rank, in bytes of the planner's storage estimates."""

    tier: str
    """``ddr`` (host memory, CPU runs) or ``hbm`` (GPU memory, CUDA runs)."""
    cap: int
    """Each rank's cap in that tier (the Topology's)."""
    budget: int | None
    """What the planner left of the cap for table shards after its reservations (None: unknown)."""
    per_rank: tuple[int, ...]
    """Bytes of the table shards each rank holds, in rank order."""
    tables: dict[str, TablePlacement]

    @classmethod
    def of(cls, best_plan, topology, reserved_topology=None) -> "PlanMemory":
        """From the planner's chosen ``ShardingOption``s, its ``Topology`` and the reserved one."""
        tier = memory_tier(topology.compute_device)
        per_rank = [0] * topology.world_size
        tables: dict[str, TablePlacement] = {}
        for option in best_plan:
            sizes = [(shard.rank, getattr(shard.storage, tier)) for shard in option.shards]
            for rank, size in sizes:
                per_rank[rank] += size
            tables[option.name] = TablePlacement(option.sharding_type, tuple(sorted({r for r, _ in sizes})),
                                                 len(sizes), sum(size for _, size in sizes))
        budget = getattr(reserved_topology.devices[0].storage, tier) if reserved_topology else None
        return cls(tier, getattr(topology.devices[0].storage, tier), budget, tuple(per_rank), tables)

    def lines(self) -> list[str]:
        """Two log lines: the bytes per rank against the cap, then where each table went."""
        left = f", {format_bytes(self.budget)} of it for tables" if self.budget is not None else ""
        ranks = ", ".join(f"rank {rank} holds {format_bytes(size)}" for rank, size in enumerate(self.per_rank))
        tables = "; ".join(
            f"{name} {t.sharding_type} {t.shards} shard(s) on rank(s) {','.join(map(str, t.ranks))} {format_bytes(t.bytes)}"
            for name, t in self.tables.items()
        )
        return [f"sharding memory ({self.tier}): cap {format_bytes(self.cap)} per rank{left}; {ranks}",
                f"sharding tables: {tables or 'none'}"]


def dense_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters outside embedding tables (replicated on every rank).

    Given to the planner's storage reservation so that it does not have to guess the dense
    size from unmaterialised (meta) tensors.
    """
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    table_params = {
        id(p) for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for p in m.parameters()
    }
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in table_params)


def cap_source(cfg: ShardingConfig, tier: str) -> tuple[str, str]:
    """(the config key that sets each rank's cap in ``tier``, how the cap was chosen), for messages."""
    key = f"sharding.{tier}_cap_gb"
    value = cfg.hbm_cap_gb if tier == "hbm" else cfg.ddr_cap_gb
    measured = "GPU memory" if tier == "hbm" else "host memory / local ranks"
    return key, f"{key}={value}" if value else f"measured {measured} x sharding.memory_fraction={cfg.memory_fraction}"


def table_footprints(search_space, tier: str) -> dict[str, int]:
    """table name → its smallest footprint (bytes, summed over its shards) among the planner's options."""
    need: dict[str, int] = {}
    for option in search_space:
        total = sum(getattr(shard.storage, tier) for shard in option.shards)
        need[option.name] = min(need.get(option.name, total), total)
    return need


def no_plan_error(footprints: dict[str, int], memory: PlanMemory, world_size: int, cap_key: str,
                  cap_source: str) -> TrecError:
    """The one-line refusal when no plan fits: the largest table and the bytes against each rank's cap.

    ``memory``: the caps (its ``per_rank`` and ``tables`` are unused); ``cap_key``: the config key
    that sets the cap; ``cap_source``: how the cap was chosen (that key's value, or measured).
    """
    left = ""
    if memory.budget is not None:
        left = f", {format_bytes(max(memory.budget, 0))} of it left for tables after dense parameters and input buffers"
    if not footprints:
        return TrecError(f"sharding: no plan fits {world_size} rank(s) with {format_bytes(memory.cap)} "
                         f"{memory.tier} each ({cap_source}{left}); raise {cap_key} or train on more ranks")
    name, largest = max(footprints.items(), key=lambda item: item[1])
    return TrecError(
        f"sharding: no plan fits the tables ({format_bytes(sum(footprints.values()))} with optimizer state and "
        f"buffers; the largest, '{name}', {format_bytes(largest)} = {largest} bytes) on {world_size} rank(s) with "
        f"{format_bytes(memory.cap)} {memory.tier} each ({cap_source}{left}); raise {cap_key}, train on more "
        f"ranks or make the tables smaller (model.embedding_dim, model.tables.<feature>.embedding_dim)"
    )


def huge_page_bytes() -> int:
    """This process's memory in transparent huge pages now (``AnonHugePages``; 0 where /proc has no such line)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (bytes)."""
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def maxrss_bytes(ru_maxrss: int) -> int:
    """A ``ru_maxrss`` (of this process, or of a child from ``os.wait4``) in bytes."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024  # Linux reports KiB, macOS bytes
