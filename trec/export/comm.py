"""The few collectives an export needs, over whatever process group the caller set up.

With no initialised group (or a group of one) every function is a local no-op, so the same
export code runs in a single process. Tensors travel on the group's device (CUDA for nccl).
Bytes are broadcast as uint8 tensors, never pickled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trec.distributed import collective_device, dist_max, group_size


def is_distributed() -> bool:
    return group_size() > 1


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in the process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank ``src``'s ``data`` on every rank (other ranks pass None)."""
    if not is_distributed():
        return data if data is not None else b""
    device = collective_device()
    mine = dist.get_rank() == src
    size = torch.tensor([len(data) if mine else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if mine:
        buffer = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src)
    return data if mine else buffer.cpu().numpy().tobytes()


def all_succeeded(ok: bool) -> bool:
    """True when every rank passes ``ok=True`` (so a failure on one rank stops all, without a hang)."""
    return not dist_max(not ok)  # no rank failed
