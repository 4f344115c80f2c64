"""`trec bench data`: reader throughput into ready RecBatches, beside the training step rate.

Prepares (once, then reuses) a synthetic dataset of ``--interactions`` rows, or reads ``--data``,
and times :class:`trec.data.InteractionReader` producing ``--batches`` batches of
``--batch-size`` rows: with 1 rank, with 1 rank plus sampled item-only negative rows (what the
two-tower task adds), and with 2 ranks reading concurrently in two processes (figures per
rank). samples/s counts labelled rows; MB/s counts the bytes of the batch tensors (dense,
KJT values and lengths, labels, ratings); samples/CPU-s divides by the reader process's CPU
time instead of wall time, a figure that does not move with the load of a shared machine. The
training step rate of the same batch size comes from ``trec.bench.train.step_rate``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np

from trec.errors import TrecError
from trec.io import atomic_write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", help="prepared dataset to read (default: a synthetic one in --cache)")
    parser.add_argument("--cache", metavar="DIR", default="data/bench-synthetic",
                        help="where the synthetic dataset is prepared and reused (default data/bench-synthetic)")
    parser.add_argument("--interactions", type=int, default=10_000_000, help="synthetic interactions (default 10M)")
    parser.add_argument("--users", type=int, default=200_000, help="synthetic users (default 200,000)")
    parser.add_argument("--items", type=int, default=50_000, help="synthetic items (default 50,000)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per batch (default 8192)")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per configuration (default 200)")
    parser.add_argument("--history-max-len", type=int, default=100, help="user_history items per row (default 100)")
    parser.add_argument("--negatives", type=int, default=1024,
                        help="item-only rows appended per batch in the '+ negatives' run; 0 skips it (default 1024)")
    parser.add_argument("--prefetch", type=int, default=4, help="batches prefetched by the reader thread")


def _dataset_dir(args: argparse.Namespace) -> Path:
    """--data, or the cached synthetic dataset of this size (prepared here if missing)."""
    if args.data:
        return Path(args.data)
    from trec.bench.synthetic import cached_synthetic_dataset
    from trec.config import PrepareConfig

    options = PrepareConfig(seed=0, history_max_len=max(args.history_max_len, 1))
    options.synthetic.interactions, options.synthetic.users, options.synthetic.items = (
        args.interactions, args.users, args.items)
    return cached_synthetic_dataset(Path(args.cache) / f"{args.interactions}-{args.users}-{args.items}", options)


def random_negatives(num_items: int, count: int):
    """An augment hook appending ``count`` uniformly sampled item-only rows (user -1)."""

    def augment(users, items, labels, ratings, rng):
        extra = rng.integers(0, num_items, count)
        return (np.concatenate([users, np.full(count, -1, np.int64)]), np.concatenate([items, extra]),
                labels, ratings)

    return augment


def measure(path: str, split: str, batch_size: int, batches: int, rank: int, world_size: int,
            history_max_len: int, negatives: int, prefetch: int) -> dict:
    """Time ``batches`` batches of one rank's reader (after one warm-up batch)."""
    from trec.data import InteractionReader, PreparedDataset

    dataset = PreparedDataset.open(path)
    augment = random_negatives(dataset.num_items, negatives) if negatives else None
    reader = InteractionReader(dataset, split, batch_size, rank=rank, world_size=world_size, seed=0,
                               prefetch_batches=prefetch, history_max_len=history_max_len, augment=augment)
    wanted = min(batches, len(reader) - 1)
    if wanted < 1:
        raise TrecError(f"{path}: split '{split}' gives only {len(reader)} batches of {batch_size} per rank")
    iterator = iter(reader)
    next(iterator)  # warm-up: thread start, first window read
    started, cpu_started = time.perf_counter(), time.process_time()
    samples = nbytes = 0
    for _ in range(wanted):
        batch = next(iterator)
        samples += batch.num_labelled
        nbytes += batch.nbytes()
    seconds = time.perf_counter() - started
    # CPU time of this process (prefetch thread included): unlike wall time, it does not
    # depend on what else the machine runs, so it shows the reader's own cost.
    cpu_seconds = time.process_time() - cpu_started
    iterator.close()
    return {"rank": rank, "world_size": world_size, "batches": wanted, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "samples_per_s": samples / seconds, "mb_per_s": nbytes / seconds / 1e6,
            "samples_per_cpu_s": samples / cpu_seconds, "batch_mb": nbytes / wanted / 1e6}


def _measure_star(arguments: tuple) -> dict:
    return measure(*arguments)


def run(args: argparse.Namespace) -> int:
    from trec.bench.train import step_rate
    from trec.data import PreparedDataset

    path = _dataset_dir(args)
    dataset = PreparedDataset.open(path)
    common = (str(path), "train", args.batch_size, args.batches)
    rows = []
    print(f"reader on {path} (train split {dataset.num_rows('train'):,} rows), batch size {args.batch_size}, "
          f"history {args.history_max_len}, {args.batches} batches per run")
    rows.append(("reader, 1 rank", measure(*common, 0, 1, args.history_max_len, 0, args.prefetch)))
    if args.negatives:
        rows.append((f"reader + {args.negatives} negatives, 1 rank",
                     measure(*common, 0, 1, args.history_max_len, args.negatives, args.prefetch)))
    # Two ranks read at the same time, as under torchrun: one process each (spawn: no forked threads).
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        per_rank = pool.map(_measure_star, [(*common, r, 2, args.history_max_len, 0, args.prefetch) for r in (0, 1)])
    rows += [(f"reader, 2 ranks: rank {r['rank']}", r) for r in per_rank]
    steps = step_rate(dataset, args.batch_size)
    _print_table(rows, steps, args.batch_size)
    if args.json:
        payload = {
            "benchmark": "data", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
            "dataset": str(path), "train_rows": dataset.num_rows("train"), "batch_size": args.batch_size,
            "history_max_len": args.history_max_len,
            "results": [{"name": name, **result} for name, result in rows],
            "train_steps_per_s": steps,
            "train_samples_per_s": steps * args.batch_size,
        }
        atomic_write_json(Path(args.json), payload)
    return 0


def _print_table(rows: list[tuple[str, dict]], steps: float, batch_size: int) -> None:
    width = max(len(name) for name, _ in rows + [("training step (same batch size)", {})])
    print(f"{'':<{width}}  {'samples/s':>11}  {'MB/s':>8}  {'batches/s':>9}  {'samples/CPU-s':>13}")
    for name, result in rows:
        print(f"{name:<{width}}  {result['samples_per_s']:>11,.0f}  {result['mb_per_s']:>8.1f}  "
              f"{result['batches'] / result['seconds']:>9.1f}  {result['samples_per_cpu_s']:>13,.0f}")
    name = "training step (same batch size)"
    print(f"{name:<{width}}  {steps * batch_size:>11,.0f}  {'':>8}  {steps:>9.2f}")
    print(f"reader / trainer samples/s: {rows[0][1]['samples_per_s'] / (steps * batch_size):.1f}x")
