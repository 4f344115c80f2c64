"""Distributed runtime: process group, device, seeding, rank-0 logging, cross-rank reductions, the one DMP call site.

Launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) every rank
joins the group torchrun describes; launched as a plain process it runs as a group of one, so
the same sharded code path (DistributedModelParallel needs a process group) serves both::

    with distributed_session(seed=42) as ctx:          # cuda+nccl if GPUs exist, else cpu+gloo
        model = shard_model(model, cfg.sharding, ctx, batch_size=cfg.data.batch_size)

This module is also the only place that builds the sharding planner (Topology with measured
memory caps, ParameterConstraints from the config).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trec.config import ComputeKernel, ShardingConfig, ShardingKind
from trec.errors import TrecError
from trec.memory import PlanMemory, cap_source, dense_parameter_bytes, no_plan_error, table_footprints

logger = logging.getLogger("trec")

# Row-wise kinds shard a table's rows across ranks; torchrec implements them with CUDA kernels only.
_CUDA_ONLY_SHARDING = {ShardingKind.row_wise, ShardingKind.table_row_wise}


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job, and the device/backend it computes with."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(preference: str = "auto", local_rank: int = 0) -> tuple[torch.device, str]:
    """(device, backend): cuda+nccl when a GPU is wanted and present, else cpu+gloo."""
    if preference not in ("auto", "cpu", "cuda"):
        raise TrecError(f"training.device: expected auto, cpu or cuda, got '{preference}'")
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrecError("training.device is 'cuda' but no CUDA device is available")
    if preference != "cpu" and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; ranks get distinct streams (seed + rank)."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# Deprecation notices of the pinned stack that say nothing actionable to a trec user.
_QUIET_WARNINGS = (
    "HeuristicalStorageReservation is known to cause issues",  # we pass dense_tensor_estimate
    "`broadcast_buffers` is deprecated",  # raised inside DistributedModelParallel
    "Please use DTensor instead and we are deprecating ShardedTensor",  # torchrec's state dicts
)


def configure_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; the other ranks only log warnings and errors."""
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
    # torch.fx warns on every traced call of a sharded module (torchrec checks is_fx_tracing).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.basicConfig(
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.WARNING,
        force=True,
    )
    logger.setLevel(getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's store, with keys private to this restart attempt.

    After a worker dies, torchrun restarts the group against the same agent store; without a
    per-attempt prefix, a restarted rank can read the dead rank's gloo address and fail to
    connect (seen with torch 2.13's c10d rendezvous).
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/trec/attempt_{attempt}", store)


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Join torchrun's process group, or form a single-process group when run directly."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch_device, backend = pick_device(device, local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if launched_by_torchrun():
            dist.init_process_group(backend=backend, store=_attempt_store(timeout), rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            # A group of one needs no rendezvous: an in-memory store is enough.
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return DistContext(rank, world_size, local_rank, local_world_size, torch_device, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(seed: int = 0, device: str = "auto", log_level: str = "INFO") -> Iterator[DistContext]:
    """Process group for the duration of a block: init, seed, rank-0 logging, clean teardown."""
    ctx = init_distributed(device)
    configure_logging(ctx.rank, log_level)
    seed_everything(seed, ctx.rank)
    logger.info(
        "distributed: world_size=%d backend=%s device=%s", ctx.world_size, ctx.backend, ctx.device
    )
    try:
        yield ctx
    except BaseException:
        shutdown_distributed()  # no barrier: a peer may be gone, and waiting for it would hang
        raise
    # Every rank reaches here before any tears gloo down: destroying the group while a peer still
    # has traffic in flight can abort the process at exit ("terminate called without an active exception").
    barrier()
    shutdown_distributed()


def barrier() -> None:
    if group_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# cross-rank reductions: each a no-op without a process group or in a group of one, so the same
# code runs in a plain process
# --------------------------------------------------------------------------------------------


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (default: every rank); 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live to travel in ``group``: nccl moves CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``tensor`` summed element-wise over the ranks of ``group``, in place (and returned)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def dist_max(value, group: dist.ProcessGroup | None = None):
    """The maximum over the ranks of ``group``: a tensor element-wise, in place (and returned); a
    bool, int or float as the same Python type (e.g. ``dist_max(flag)``: True on every rank once any has it)."""
    if isinstance(value, torch.Tensor):
        if group_size(group) > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value
    if group_size(group) == 1:
        return value
    dtype = torch.float64 if isinstance(value, float) else torch.int64
    tensor = torch.tensor([value], dtype=dtype, device=collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return type(value)(tensor.item())


def dist_gather(value: float, group: dist.ProcessGroup | None = None) -> list[float]:
    """Every rank's ``value`` (a number), in rank order, on every rank of ``group``."""
    if group_size(group) == 1:
        return [float(value)]
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    gathered = [torch.empty_like(tensor) for _ in range(group_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return [part.item() for part in gathered]


def dist_mean(value, group: dist.ProcessGroup | None = None):
    """The mean over the ranks of ``group``: a tensor element-wise, as a new floating tensor (the
    input is left as it is); a number as a float."""
    if isinstance(value, torch.Tensor):
        # At least float32 (bf16 sums lose digits); always a copy, so the caller's tensor stays as it was.
        mean = value.detach().to(torch.promote_types(value.dtype, torch.float32), copy=True)
        return dist_sum(mean, group).div_(group_size(group))
    if group_size(group) == 1:
        return float(value)
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    return dist_sum(tensor, group).item() / group_size(group)


# --------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_topology(cfg: ShardingConfig, ctx: DistContext):
    """torchrec Topology with per-rank memory caps: measured hardware, overridden by the config.

    Host memory is split between the ranks of a node; GPU memory is per device. Only
    ``memory_fraction`` of each is offered to the planner, leaving room for activations,
    optimizer state outside the tables and the data pipeline.
    """
    from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

    gib = 1024**3
    measured_ddr = int(_host_memory_bytes() / ctx.local_world_size * cfg.memory_fraction)
    measured_hbm = None
    if ctx.device.type == "cuda" and not cfg.hbm_cap_gb:
        measured_hbm = int(torch.cuda.get_device_properties(ctx.device).total_memory * cfg.memory_fraction)
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=ctx.world_size,
            local_world_size=ctx.local_world_size,
            hbm_cap_bytes=int(cfg.hbm_cap_gb * gib) if cfg.hbm_cap_gb else None,
            ddr_cap_bytes=int(cfg.ddr_cap_gb * gib) if cfg.ddr_cap_gb else None,
            additional_params={},
        ),
        hardware_config=HardwareConfig(hbm_cap_bytes=measured_hbm, ddr_cap_bytes=measured_ddr, additional_params={}),
        kernel_config=KernelConfig(compute_device=ctx.device.type, additional_params={}),
    )


def allowed_sharding_types(requested: list[ShardingKind], device: torch.device) -> list[str]:
    """The sharding types the planner may use on ``device`` (torchrec's string values)."""
    kinds = list(requested) or [kind for kind in ShardingKind if kind != ShardingKind.table_row_wise]
    if device.type != "cuda":
        # A config may list row-wise kinds for its CUDA runs; on CPU they are skipped, unless
        # nothing else is allowed.
        kinds = [kind for kind in kinds if kind not in _CUDA_ONLY_SHARDING]
        if not kinds:
            raise TrecError(
                f"sharding.sharding_types: {', '.join(k.value for k in requested)} needs CUDA; on CPU use "
                "table_wise, column_wise, table_column_wise or data_parallel"
            )
    return [kind.value for kind in kinds]


def build_constraints(cfg: ShardingConfig, table_names: list[str], device: torch.device):
    """ParameterConstraints per table from the sharding section (section default + per-table)."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import ParameterConstraints

    unknown = sorted(set(cfg.tables) - set(table_names))
    if unknown:
        raise TrecError(
            f"sharding.tables: unknown table '{unknown[0]}'; the model's tables are: {', '.join(table_names)}"
        )
    kernel = (
        EmbeddingComputeKernel.FUSED.value
        if cfg.compute_kernel == ComputeKernel.fused
        else EmbeddingComputeKernel.DENSE.value
    )
    constraints = {}
    for name in table_names:
        table_cfg = cfg.tables.get(name)
        requested = table_cfg.sharding_types if table_cfg and table_cfg.sharding_types else cfg.sharding_types
        constraints[name] = ParameterConstraints(
            sharding_types=allowed_sharding_types(requested, device),
            compute_kernels=[kernel],
            min_partition=table_cfg.min_partition if table_cfg else None,
        )
    return constraints


def embedding_table_names(model: nn.Module) -> list[str]:
    """Names of every table in the model's EmbeddingBagCollections and EmbeddingCollections, in module order."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    names: list[str] = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            names.extend(table.name for table in module.embedding_bag_configs())
        elif isinstance(module, EmbeddingCollection):
            names.extend(table.name for table in module.embedding_configs())
    return names


def plan_sharding(model: nn.Module, cfg: ShardingConfig, ctx: DistContext, batch_size: int, sharders):
    """(torchrec ShardingPlan, :class:`~trec.memory.PlanMemory`) for ``model`` on ``ctx.world_size``
    ranks, planned in this process; a TrecError naming the largest table when no plan fits the caps."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

    topology = build_topology(cfg, ctx)
    constraints = build_constraints(cfg, embedding_table_names(model), ctx.device)
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints)
    reservation = HeuristicalStorageReservation(
        # At least 1 byte: torchrec reads 0 (a model of tables only, e.g. mf) as "not given" and warns.
        percentage=0.15, dense_tensor_estimate=max(dense_parameter_bytes(model), 1)
    )
    chosen: list = []  # the planner hands its best plan to callbacks: keep it for the bytes per rank
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, enumerator=enumerator,
                                       storage_reservation=reservation, constraints=constraints, debug=False,
                                       callbacks=[lambda best: chosen.append(best) or best])
    try:
        plan = planner.plan(model, sharders)
    except PlannerError as error:
        # Both kinds mean that some proposal's shards did not fit a rank; other errors are torchrec's own.
        if error.error_type not in (PlannerErrorType.INSUFFICIENT_STORAGE, PlannerErrorType.STRICT_CONSTRAINTS):
            raise
        caps = PlanMemory.of([], topology, reservation.last_reserved_topology)
        footprints = table_footprints(enumerator.enumerate(model, sharders), caps.tier)
        raise no_plan_error(footprints, caps, ctx.world_size, *cap_source(cfg, caps.tier)) from None
    return plan, PlanMemory.of(chosen[-1] if chosen else [], topology, reservation.last_reserved_topology)


def _plan_or_refusal(model: nn.Module, cfg: ShardingConfig, ctx: DistContext, batch_size: int, sharders):
    try:
        return plan_sharding(model, cfg, ctx, batch_size, sharders)
    except TrecError as error:
        return error


def shard_model(model: nn.Module, cfg: ShardingConfig, ctx: DistContext, batch_size: int) -> nn.Module:
    """Plan the sharding (collectively, identical on every rank) and wrap ``model`` in DMP.

    Embedding tables are placed by torchrec's planner under the config's constraints and each
    rank's memory cap, splitting a table that does not fit one rank; all other parameters are
    replicated data-parallel. Logs the bytes each rank holds. Any fused optimizer must already
    be attached with ``apply_optimizer_in_backward`` (see trec.optim) before this call.
    """
    from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.types import ShardingEnv

    sharders = get_default_sharders()
    pg = dist.GroupMember.WORLD
    # Rank 0 plans and broadcasts (as torchrec's collective_plan does), a refusal included: every
    # rank then raises the same one-line error instead of waiting for a plan that never comes.
    outcome = invoke_on_rank_and_broadcast_result(pg, 0, _plan_or_refusal, model, cfg, ctx, batch_size, sharders)
    if isinstance(outcome, TrecError):
        raise outcome
    plan, memory = outcome
    for line in memory.lines():
        logger.info(line)
    # One rank has no gradient to all-reduce: DDP would only add its hooks, bucket copies and a
    # gloo call to every step, so the dense part stays a plain module, moved as DDP would move it.
    sharded = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(pg), device=ctx.device,
                                       plan=plan, sharders=sharders, init_data_parallel=ctx.world_size > 1)
    if ctx.world_size == 1:
        sharded.module.to(ctx.device)
    return sharded
