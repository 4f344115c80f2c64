"""Micro-batching: concurrent requests gathered into one :meth:`Recommender.recommend_many` call.

    batcher = MicroBatcher(recommender.recommend_many, max_batch=64, max_wait_ms=2, threads=2)
    await batcher.start()
    response = await batcher.submit(request)          # from any number of concurrent handlers
    items = await batcher.call(recommender.similar_items, "242", 10)   # same thread, outside a batch

One collector task on the event loop takes the first waiting request, then whatever else arrives
until ``max_batch`` requests or ``max_wait_ms`` after the first; the batch runs in the one worker
thread (the model, the index and ``Recommender.last_search`` are used by that thread only), so
the event loop keeps accepting requests while it computes, and those form the next batch.
``max_batch=1`` answers one request at a time (the baseline of ``trec bench serve``).

A bad request (``RequestError``) fails alone: it is answered with its error and the batch runs
again without it (validation happens before any model work, so a retry costs little). Any other
exception in a batch of several re-runs its requests one by one, so only the request that
causes it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from trec.serving.requests import RecommendRequest, RecommendResponse, RequestError

log = logging.getLogger("trec.serving")

BatchFn = Callable[[list[RecommendRequest]], list[RecommendResponse]]


class MicroBatcher:
    """Gathers :meth:`submit` calls into batches for ``batch_fn`` (see the module docstring)."""

    def __init__(self, batch_fn: BatchFn, max_batch: int = 64, max_wait_ms: float = 2.0,
                 threads: int | None = None, on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        """Called in the worker thread after each batch with (size, seconds)."""
        self._threads = threads
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trec-batch", initializer=self._init_thread)
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _init_thread(self) -> None:
        # OpenMP thread counts are per thread: set torch's in the thread that runs the model.
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)

    async def submit(self, request: RecommendRequest) -> RecommendResponse:
        """The response to ``request``, computed in a batch with the requests waiting beside it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker thread (between batches)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [(request, future) for request, future in batch if not future.cancelled()]
            if not live:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._answer, [r for r, _ in live])
            except Exception as error:  # noqa: BLE001 - the collector must outlive any batch
                log.exception("micro-batch failed")
                outcomes = [error] * len(live)
            for (_, future), outcome in zip(live, outcomes):
                if future.done():
                    continue  # the client went away
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _answer(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse | BaseException]:
        """Each request's response or exception (worker thread)."""
        outcomes: list[RecommendResponse | BaseException | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            started = time.perf_counter()
            try:
                responses = self.batch_fn([requests[position] for position in pending])
            except Exception as error:  # noqa: BLE001 - one request must not fail the others
                position = getattr(error, "position", None) if isinstance(error, RequestError) else None
                if position is not None and 0 <= position < len(pending):
                    outcomes[pending.pop(position)] = error
                    continue
                if len(pending) == 1:
                    outcomes[pending[0]] = error
                    break
                log.warning("a batch of %d failed (%s: %s); answering its requests one by one",
                            len(pending), type(error).__name__, error)
                for position in pending:
                    outcomes[position] = self._answer([requests[position]])[0]
                break
            if self.on_batch is not None:
                self.on_batch(len(pending), time.perf_counter() - started)
            for position, response in zip(pending, responses):
                outcomes[position] = response
            break
        return outcomes
