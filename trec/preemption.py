"""SIGTERM as a request to stop training at the next step boundary, agreed on by every rank.

Kubernetes sends SIGTERM before it kills a pod (and torchrun forwards it to every worker); the
handler only sets a flag, and the loop asks :meth:`StopSignal.agreed` after each step::

    with StopSignal(ctx) as signals:
        while ...:
            train_step()
            if signals.agreed():   # every rank stops after the same step
                break
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch.distributed as dist

from trec.distributed import DistContext, dist_max

logger = logging.getLogger("trec")


class StopSignal:
    """SIGTERM as a request to stop at the next step boundary, agreed on by every rank.

    Ranks may see the signal at different steps, so :meth:`agreed` all-reduces the flag (MAX) at
    every step boundary: all ranks stop after the same step and save one consistent checkpoint.
    The flag is a CPU tensor reduced over gloo (a side group when training on NCCL), so it never
    waits on the GPU; one scalar per step.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.received: int | None = None
        self.name = "SIGTERM"
        self._previous = None
        self._group = None

    def __enter__(self) -> "StopSignal":
        if self.ctx.world_size > 1 and dist.is_initialized() and self.ctx.backend != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank enters fit together
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received the signal (collective)."""
        return dist_max(self.received is not None, group=self._group)

    def __exit__(self, kind, error, traceback) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if error is not None and self.received is not None:
            # After SIGTERM, a failing step or collective means a peer is already gone (torchrun stops
            # the survivors of a dead worker with SIGTERM): no checkpoint can be agreed on, so end the
            # way SIGTERM ends a process, without a traceback; the newest complete checkpoint stands.
            logger.warning("SIGTERM received and the process group failed (%s: %s): exiting without a checkpoint",
                           kind.__name__, str(error).splitlines()[0] if str(error) else "")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(128 + signal.SIGTERM)
