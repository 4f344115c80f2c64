"""Cross-rank reductions (trec.distributed.dist_sum / dist_max / dist_mean) and what is built on them.

Without a process group (or in a group of one) each is a local no-op; in a real 2-rank gloo job
they reduce, also over a side group (what :class:`trec.preemption.StopSignal` uses on NCCL).
Run as a script under torchrun, this file is the 2-rank job itself:
``torchrun --nproc_per_node 2 tests/test_reductions.py OUT_DIR`` (each rank writes ``OUT_DIR/rank-R.json``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trec.distributed import DistContext, dist_max, dist_mean, dist_sum, group_size


def test_without_a_process_group_every_reduction_is_local():
    assert not dist.is_initialized() and group_size() == 1
    tensor = torch.tensor([1, 2, 3])
    assert dist_sum(tensor) is tensor and tensor.tolist() == [1, 2, 3]
    assert dist_max(tensor) is tensor
    assert dist_max(True) is True and dist_max(0) == 0 and dist_max(2.5) == 2.5
    loss = torch.tensor(2.0, dtype=torch.bfloat16)
    mean = dist_mean(loss)
    assert mean is not loss and mean.dtype == torch.float32 and mean.item() == 2.0  # at least float32
    assert dist_mean(torch.tensor([4, 6])).tolist() == [4.0, 6.0]
    assert dist_mean(3) == 3.0 and isinstance(dist_mean(3), float)


def test_a_group_of_one_reduces_nothing():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert group_size() == 1
        assert dist_sum(torch.tensor([5.0])).tolist() == [5.0]
        assert dist_max(7) == 7 and dist_mean(torch.tensor([3.0])).tolist() == [3.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_sum_max_and_mean_across_ranks(torchrun, tmp_path):
    torchrun(2, __file__, str(tmp_path), timeout=300)
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert reports[0] == reports[1], "every rank must see the same reduced values"
    report = reports[0]
    assert report["sum"] == [1.0, 12.0]  # [0 + 1, 5 + 7]
    assert report["sum_in_place"] is True
    assert report["max_tensor"] == [1, 7]
    assert report["max_scalars"] == [True, 1, 1.5] and report["max_types"] == ["bool", "int", "float"]
    assert report["mean_tensor"] == [0.5, 6.0] and report["mean_input_untouched"] is True
    assert report["mean_scalar"] == 0.5
    assert report["side_group_max"] is True  # over a gloo side group, as StopSignal does on NCCL
    assert report["stop_signal"] == [False, True]  # one rank's SIGTERM stops both
    assert report["all_succeeded"] == [True, False]


def _two_rank_job(out_dir: Path) -> None:
    from trec.export.comm import all_succeeded
    from trec.preemption import StopSignal

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        summed = torch.tensor([float(rank), 5.0 + 2 * rank])
        maxed = dist_max(torch.tensor([rank, 7 - 6 * rank]))
        mine = torch.tensor([float(rank), 5.0 + 2 * rank])
        mean = dist_mean(mine)
        scalars = [dist_max(rank == 1), dist_max(rank), dist_max(0.5 + rank)]
        side = dist.new_group(backend="gloo")
        # StopSignal on an NCCL job reduces its flag over a gloo side group: the CPU test pretends NCCL.
        ctx = DistContext(rank, 2, rank, 2, torch.device("cpu"), "nccl")
        with StopSignal(ctx) as signals:
            before = signals.agreed()
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
            after = signals.agreed()
        report = {
            "sum": dist_sum(summed).tolist(),
            "sum_in_place": summed.tolist() == [1.0, 12.0],
            "max_tensor": maxed.tolist(),
            "max_scalars": scalars,
            "max_types": [type(value).__name__ for value in scalars],
            "mean_tensor": mean.tolist(),
            "mean_input_untouched": mine.tolist() == [float(rank), 5.0 + 2 * rank],
            "mean_scalar": dist_mean(rank),
            "side_group_max": dist_max(rank == 0, group=side),
            "stop_signal": [before, after],
            "all_succeeded": [all_succeeded(True), all_succeeded(rank == 0)],
        }
        (out_dir / f"rank-{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _two_rank_job(Path(sys.argv[1]))
