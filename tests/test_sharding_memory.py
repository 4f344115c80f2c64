"""Memory-bound sharding: a table larger than one rank's budget is split across ranks, each rank holds
less than its cap, the plan is logged with the bytes per rank, TensorBoard records every rank's peak
RSS, and a cap no plan fits is refused in one line naming the table and its bytes.

Sizes are the smallest that prove it: synthetic data with 1,414 items and a 256-wide item_id table
(about 1.5 MiB with its optimizer state and buffers) against caps of a few MiB per rank.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from training import CONFIG, error_line, run_command, scalar_steps, torchrun_command, trec_command

# The item table is the big one: 256 wide where every other table is 64 wide. Batch 64 keeps the
# planner's buffer estimates (which grow with the batch) small beside the weights.
BIG_ITEM_TABLE = ["data.batch_size=64", "model.tables.item_id.embedding_dim=256"]
# Per rank: 2.05 MiB, of which the planner leaves ~1.3 MiB for tables after reserving the dense
# parameters and input batches; item_id alone needs ~1.5 MiB, all tables ~2.2 MiB.
CPU_CAP = "sharding.ddr_cap_gb=0.002"
SIZES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
SIZE = r"[\d.]+ (?:B|KiB|MiB|GiB|TiB)"  # as trec.memory.format_bytes writes it


@pytest.fixture(scope="module")
def big_items(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sharding-memory") / "data"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "4000",
                             "--interactions", "5000", "--val-fraction", "0.1", "--quiet"))
    return data


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * SIZES[unit]


def _plan_log(log: str) -> tuple[float, float, list[float], dict[str, tuple[str, str, float]]]:
    """(cap, budget for tables, bytes per rank, {table: (sharding type, ranks, bytes)}) from the plan's log lines."""
    memory = re.search(rf"sharding memory \(ddr\): cap ({SIZE}) per rank, ({SIZE}) of it for tables; (.*)", log)
    tables = re.search(r"sharding tables: (.*)", log)
    assert memory and tables, log[-3000:]
    per_rank = [_bytes(size) for _, size in re.findall(rf"rank (\d+) holds ({SIZE})", memory.group(3))]
    placed = {name: (kind, ranks, _bytes(size)) for name, kind, ranks, size in
              re.findall(rf"(\w+) (\w+) \d+ shard\(s\) on rank\(s\) ([\d,]+) ({SIZE})", tables.group(1))}
    return _bytes(memory.group(1)), _bytes(memory.group(2)), per_rank, placed


@pytest.mark.dist
def test_a_table_larger_than_one_rank_trains_split_across_two(big_items, tmp_path):
    from trec.checkpoint import SafeFileSystemReader

    run_dir = tmp_path / "run"
    proc = run_command([*torchrun_command(2), "-m", "trec", "train", "--config", CONFIG, "--data", big_items,
                        "--run-dir", run_dir, *BIG_ITEM_TABLE, CPU_CAP, "training.max_steps=4",
                        "checkpoint.every_steps=4", "logging.log_every_steps=2", "logging.projector_items=0",
                        "logging.histogram_every_steps=0", "evaluation.max_users=50", "evaluation.ks=[10]"])
    cap, budget, per_rank, placed = _plan_log(proc.stderr)
    assert cap == pytest.approx(0.002 * 1024**3, rel=0.01)
    kind, ranks, item_bytes = placed["item_id"]
    assert item_bytes > budget, "item_id would fit on one rank: the test proves nothing"
    assert (kind, ranks) == ("column_wise", "0,1")
    assert len(per_rank) == 2 and all(0 < held <= budget < cap for held in per_rank), (per_rank, budget, cap)
    assert "step 4/4" in proc.stderr and (run_dir / "metrics.json").is_file()

    # The checkpoint agrees: item_id's weight is two column blocks, written by rank 0 and rank 1.
    metadata = SafeFileSystemReader(run_dir / "checkpoints" / "step-4").read_metadata()
    fqn = next(key for key in metadata.state_dict_metadata if key.endswith("embedding_bags.item_id.weight"))
    chunks = metadata.state_dict_metadata[fqn].chunks
    assert sorted((list(c.offsets), list(c.sizes)) for c in chunks) == [([0, 0], [1415, 128]), ([0, 128], [1415, 128])]
    writers = {info.relative_path.split("_")[2] for index, info in metadata.storage_data.items() if index.fqn == fqn}
    assert writers == {"0", "1"}, writers  # __RANK_0.distcp

    for rank in (0, 1):  # every rank's peak RSS, at every logged step
        assert scalar_steps(run_dir / "tb", f"system/peak_rss_gb_rank{rank}") == [2, 4]


def _plan(data: Path, device: str, *overrides: str):
    """trec's plan (in this process, no process group) for two ranks on ``device`` of the two-tower task."""
    from torchrec.distributed.sharding_plan import get_default_sharders

    from trec.data import PreparedDataset
    from trec.distributed import DistContext, plan_sharding
    from trec.models import load_config, model_spec
    from trec.optim import attach_sparse_optimizer

    cfg = load_config(CONFIG, [*BIG_ITEM_TABLE, *overrides])
    task = model_spec(cfg.model.name).build_task(cfg.model, cfg.model.section(), PreparedDataset.open(data))
    attach_sparse_optimizer(task, cfg.optimizer)
    ctx = DistContext(0, 2, 0, 2, torch.device(device), "nccl" if device == "cuda" else "gloo")
    return plan_sharding(task, cfg.sharding, ctx, cfg.data.batch_size, get_default_sharders())[1]


@pytest.mark.parametrize("device, kind, roomy, tight", [
    ("cpu", "column_wise", [], [CPU_CAP]),
    # Planning only (no GPU needed): on CUDA the planner splits rows, within GPU memory.
    ("cuda", "row_wise", ["sharding.sharding_types=[table_wise,row_wise]", "sharding.hbm_cap_gb=1"],
     ["sharding.sharding_types=[table_wise,row_wise]", "sharding.hbm_cap_gb=0.0025"]),
])
def test_the_cap_is_what_splits_the_table(big_items, device, kind, roomy, tight):
    whole = _plan(big_items, device, *roomy).tables["item_id"]
    assert len(whole.ranks) == 1, whole  # with room, the planner keeps the table whole on one rank
    memory = _plan(big_items, device, *tight)
    split = memory.tables["item_id"]
    assert (split.sharding_type, split.ranks) == (kind, (0, 1))
    assert memory.tier == ("hbm" if device == "cuda" else "ddr")
    assert split.bytes > memory.budget and max(memory.per_rank) <= memory.budget < memory.cap


def test_a_cap_no_plan_fits_is_refused_in_one_line_naming_the_table(big_items, tmp_path):
    proc = run_command(trec_command(1, "train", "--config", CONFIG, "--data", big_items, "--run-dir", tmp_path / "run",
                                    *BIG_ITEM_TABLE, "sharding.ddr_cap_gb=0.001"), check=False)
    line = error_line(proc)
    assert re.search(r"error: sharding: no plan fits the tables \(.*; the largest, 'item_id', 1\.\d+ MiB = \d+ bytes\) "
                     r"on 1 rank\(s\) with 1\.02 MiB ddr each \(sharding\.ddr_cap_gb=0\.001, ", line), line
    assert "raise sharding.ddr_cap_gb" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
