"""`trec bench scale`: how the cost of a training step grows with table rows, batch size and ranks.

For each total row count (``--rows``), a synthetic dataset with hashed IDs is prepared once (the
`trec bench train` one: user_id, item_id and user_history get a third of the rows each, plus the
small side-feature tables) and each table dtype x world size runs in its own job (one process
per rank, torchrun for several), so that every rank's peak RSS (``ru_maxrss``) belongs to that
configuration. A job builds its tables once and times every ``--batch-sizes`` on them.

Every row count steps **the same batches**: those of the smallest row count's dataset, each ID
of a grown table sent to its own row of the larger table (:mod:`trec.bench.spread`). The datasets'
own batches would not do: with the interaction count fixed, a larger ID space leaves each user
fewer past interactions, so user_history shrinks (13.7 lookups per sample at 1M rows, 7.0 at
10M, 6.1 at 100M) and larger tables would look cheaper for doing less work.

The timed step (``--step``):

- **tables** (default): the sharded EmbeddingBagCollection alone, FBGEMM fused RowWiseAdagrad
  applied in backward: the part of a step whose cost could grow with the rows. The job also
  builds the tables of the smallest row count and steps both in turns, so "vs min rows" is a
  ratio measured under the same load (other jobs may share the cores); peak RSS therefore
  includes those reference tables too (about 0.26 GB fp32 for 1M rows x 64);
- **full**: the whole two-tower step of `trec bench train` (fp32 tables only: the model has no
  half-precision option), compared across jobs.

Half-precision tables are ``EmbeddingBagConfig(data_type=DataType.FP16)``: FBGEMM's CPU kernels
keep the weights in float16 (half the bytes) and pool in float32. The goal: the cost per sample
of every configuration within ±20% of the same batch, dtype and world size at the smallest row
count of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trec.bench.spread import spread_ids, table_rows
from trec.bench.train import (bench_config, mean_lookups, prebuilt_batches, synthetic_hashed_dataset,
                              trec_seconds_per_step)
from trec.errors import TrecError
from trec.io import atomic_write_json

DTYPE_BYTES = {"fp32": 4, "fp16": 2}
GOAL = 0.20
# A job needs its tables (weights + one RowWiseAdagrad float per row) plus about this much per rank
# for the interpreter, torch and the batches; a configuration that does not fit the memory
# available now is skipped, not swapped into.
_RANK_OVERHEAD_BYTES = 1.5 * 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="1M,10M,30M",
                        help="total embedding rows, comma-separated, k/M suffixes (default 1M,10M,30M)")
    parser.add_argument("--batch-sizes", default="512,2048,8192", help="rows per rank per step (default 512,2048,8192)")
    parser.add_argument("--ranks", default="1,2", help="world sizes (default 1,2)")
    parser.add_argument("--dtypes", default="fp32,fp16", help="table weight dtypes: fp32, fp16 (default both)")
    parser.add_argument("--step", choices=("tables", "full"), default="tables",
                        help="time the sharded tables alone (default) or the full two-tower step")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch threads per rank (default cores // ranks); 1 keeps the timings steady when "
                             "other jobs share the cores (OpenMP's threads stall behind them)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--interactions", type=int, default=1_000_000,
                        help="synthetic interactions of each dataset (default 1M)")
    parser.add_argument("--cache", metavar="DIR", default="data/bench-train",
                        help="where the synthetic datasets are prepared and reused (default data/bench-train)")
    parser.add_argument("--plot", metavar="PNG", help="also draw samples/s against rows, log-log, into this PNG")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # internal: one torchrun rank of a job
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--reference-data", help=argparse.SUPPRESS)


def parse_count(text: str) -> int:
    """'1B' → 1_000_000_000, '30M' → 30_000_000, '500k' → 500_000, '1.5M' → 1_500_000, '1000' → 1000."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text.strip()[-1:].lower(), 1)
    number = text.strip()[:-1] if scale > 1 else text.strip()
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise TrecError(f"'{text}' is not a count (e.g. 1000, 500k, 10M, 1B)") from None
    if value < 1:
        raise TrecError(f"'{text}': counts must be >= 1")
    return value


def parse_counts(text: str) -> list[int]:
    """'1M,10M' → [1_000_000, 10_000_000] (see :func:`parse_count`); empty parts are skipped."""
    return [parse_count(part) for part in text.split(",") if part.strip()]


def _dtypes(text: str, step: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in DTYPE_BYTES:
            raise TrecError(f"--dtypes: '{name}' is not one of {', '.join(DTYPE_BYTES)}")
    if step == "full" and names != ["fp32"]:
        raise TrecError("--step full trains fp32 tables only (the two-tower model has no half-precision option): "
                        "pass --dtypes fp32")
    return names


# --------------------------------------------------------------------------------------------
# one job: a model per (rows, dtype, world size), every batch size timed on it
# --------------------------------------------------------------------------------------------


def sharded_tables_step(cfg, dataset, ctx, dtype: str, batch_size: int):
    """A step over the sharded tables alone (lookup, fused backward + update), weights in ``dtype``."""
    from torchrec.modules.embedding_configs import DataType

    from trec.distributed import shard_model
    from trec.models.modules import embedding_bag_collection, embedding_tables
    from trec.optim import attach_sparse_optimizer

    data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[dtype]
    tables = [dataclasses.replace(table, data_type=data_type)
              for table in embedding_tables(dataset.sparse_features, cfg.model)]
    ebc = embedding_bag_collection(tables)
    attach_sparse_optimizer(ebc, cfg.optimizer)
    model = shard_model(ebc, cfg.sharding, ctx, batch_size=batch_size)

    def step(batch) -> None:
        model(batch.sparse_features).values().sum().backward()

    return step


def interleaved_median_seconds(steps: list, batch_lists: list[list], warmup: int, sync) -> list[float]:
    """Median seconds per step of each ``steps[k]`` over ``batch_lists[k][warmup:]``, the steps taken
    in turns (one of each, then the next of each): a burst of another job on the shared cores then
    slows the contenders alike, and the median ignores the steps it hit (the mean does not). Every
    other turn runs in reverse order, so that no contender always goes first (the step after another
    one finds its freed memory and a warm allocator). Steps are not separated by a barrier: a sharded
    step's own all-to-alls keep the ranks in step."""
    for batches in zip(*(batch_list[:warmup] for batch_list in batch_lists)):
        for step, batch in zip(steps, batches):
            step(batch)
    sync()
    seconds: list[list[float]] = [[] for _ in steps]
    for turn, batches in enumerate(zip(*(batch_list[warmup:] for batch_list in batch_lists))):
        order = list(enumerate(zip(steps, batches)))
        for index, (step, batch) in order if turn % 2 == 0 else reversed(order):
            started = time.perf_counter()
            step(batch)
            seconds[index].append(time.perf_counter() - started)
    sync()
    return [statistics.median(values) for values in seconds]


def _worker(args: argparse.Namespace) -> int:
    """One rank of one job: times each batch size, writes its figures and its peak RSS.

    ``--reference-data`` (the smallest row count of the run) supplies the batches, spread over this
    job's tables; in the tables step its own tables are built too and stepped in turns with these, on
    the unspread batches, so their time ratio is measured under the same load.
    """
    import torch

    from trec.data import PreparedDataset
    from trec.distributed import barrier, distributed_session
    from trec.memory import huge_page_bytes, peak_rss_bytes

    dataset = PreparedDataset.open(args.data)
    source = PreparedDataset.open(args.reference_data) if args.reference_data else dataset
    batch_sizes = parse_counts(args.batch_sizes)
    results = []
    with distributed_session(seed=0, log_level="WARNING") as ctx:
        timed_tables = [dataset] if source is dataset else [dataset, source]
        steps = []
        if args.step == "tables":
            cfg = bench_config(max(batch_sizes), args.dim)
            steps = [sharded_tables_step(cfg, tables, ctx, args.dtypes, max(batch_sizes)) for tables in timed_tables]
        for batch_size in batch_sizes:
            cfg = bench_config(batch_size, args.dim)
            batches = prebuilt_batches(source, cfg, args.steps + args.warmup, ctx.rank, ctx.world_size, None)
            own = spread_ids(batches, table_rows(source), table_rows(dataset))
            if not steps:
                seconds = [trec_seconds_per_step(cfg, dataset, ctx, own, args.warmup)]
            else:
                seconds = interleaved_median_seconds(steps, [own, batches][:len(steps)], args.warmup, barrier)
            result = {"batch_size": batch_size, "seconds_per_step": seconds[0],
                      "lookups_per_sample": mean_lookups(own) / batch_size}
            if len(seconds) > 1:
                result["reference_seconds_per_step"] = seconds[1]
            results.append(result)
            del batches, own
        out = Path(args.worker_out) / f"rank{ctx.rank}.json"
        out.write_text(json.dumps({"rank": ctx.rank, "results": results, "peak_rss_bytes": peak_rss_bytes(),
                                   "huge_page_bytes": huge_page_bytes(), "threads": torch.get_num_threads()}))
    return 0


def _job(args: argparse.Namespace, data: Path, dtype: str, world_size: int, reference: Path | None) -> list[dict]:
    """Runs one job in its own process(es), through torchrun for several ranks; one dict per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        # One rank needs no torchrun agent: trec's session runs a plain process as a group of one.
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
                    if world_size > 1 else [])
        command = [sys.executable, *launcher,
                   "-m", "trec", "bench", "scale", "--data", str(data), "--dtypes", dtype, "--step", args.step,
                   "--batch-sizes", args.batch_sizes, "--dim", str(args.dim), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--worker-out", tmp]
        if reference is not None:
            command += ["--reference-data", str(reference)]
        threads = str(args.threads or max(1, (os.cpu_count() or 1) // world_size))
        proc = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS=threads), stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0:
            refusal = _refusal(proc.stderr)
            if refusal is None:
                sys.stderr.write(proc.stderr)
                raise subprocess.CalledProcessError(proc.returncode, command)
            raise JobRefused(refusal)
        return [json.loads(path.read_text()) for path in sorted(Path(tmp).glob("rank*.json"))]


class JobRefused(Exception):
    """trec refused a job in one line (e.g. the planner found no placement of whole tables under each
    rank's memory cap): the configuration is skipped with that line, not the run ended."""


def _refusal(stderr: str) -> str | None:
    """The one-line ``error: ...`` a worker printed on a TrecError (torchrun prefixes ``[rankN]``), if any."""
    for line in stderr.splitlines():
        message = line.split("] ", 1)[1] if line.startswith("[rank") and "] " in line else line
        if message.startswith("error: "):
            return message.removeprefix("error: ")
    return None


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo (free memory now, other jobs included); total memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def job_bytes(rows: int, dim: int, dtype: str, world_size: int) -> float:
    """What a job is expected to hold: weights, one fp32 optimizer state per row, and per-rank overhead."""
    return rows * (dim * DTYPE_BYTES[dtype] + 4) + world_size * _RANK_OVERHEAD_BYTES


# --------------------------------------------------------------------------------------------
# entry point and report
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.worker_out:
        return _worker(args)
    from trec.data import PreparedDataset

    dtypes, ranks, all_rows = _dtypes(args.dtypes, args.step), parse_counts(args.ranks), sorted(parse_counts(args.rows))
    parse_counts(args.batch_sizes)  # refuse a bad list before preparing anything
    figures, skipped = [], []
    smallest = synthetic_hashed_dataset(Path(args.cache), max(1, all_rows[0] // 3), args.interactions)
    for requested in all_rows:
        data = synthetic_hashed_dataset(Path(args.cache), max(1, requested // 3), args.interactions)
        reference = smallest if data != smallest else None  # the batches of every job; tables step: also timed
        rows = sum(f.cardinality for f in PreparedDataset.open(data).sparse_features)
        for dtype in dtypes:
            for world_size in ranks:
                need, free = job_bytes(rows + all_rows[0], args.dim, dtype, world_size), _available_bytes()
                if need > 0.9 * free:
                    skipped.append(f"{rows:,} rows {dtype} {world_size} rank(s): needs about {need / 2**30:.1f} GiB, "
                                   f"{free / 2**30:.1f} GiB available")
                    print(f"skipped {skipped[-1]}", flush=True)
                    continue
                try:
                    per_rank = _job(args, data, dtype, world_size, reference)
                except JobRefused as refused:
                    skipped.append(f"{rows:,} rows {dtype} {world_size} rank(s): {refused}")
                    print(f"skipped {skipped[-1]}", flush=True)
                    continue
                figures += _rows_of(per_rank, rows, dtype, world_size)
                print(f"timed {rows:,} rows, {dtype}, {world_size} rank(s)", flush=True)
    report = build_report(figures, skipped, args)
    print(report["table"])
    if args.plot:
        from trec.bench.plot import log_log_plot

        log_log_plot(Path(args.plot), _series(figures), "embedding rows", "samples/s",
                     f"trec bench scale ({args.step} step), {datetime.date.today().isoformat()}")
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_json(Path(args.json), {k: v for k, v in report.items() if k != "table"})
    return 0


def _rows_of(per_rank: list[dict], rows: int, dtype: str, world_size: int) -> list[dict]:
    """One figure per batch size; the step time is the slowest rank's (collectives make them equal)."""
    rss = [rank["peak_rss_bytes"] for rank in per_rank]
    out = []
    for index, first in enumerate(per_rank[0]["results"]):
        seconds = max(rank["results"][index]["seconds_per_step"] for rank in per_rank)
        samples = first["batch_size"] * world_size / seconds
        figure = {"rows": rows, "dtype": dtype, "world_size": world_size, "batch_size": first["batch_size"],
                  "seconds_per_step": seconds, "samples_per_s": samples, "us_per_sample": 1e6 / samples,
                  "peak_rss_bytes_per_rank": rss, "threads": per_rank[0]["threads"],
                  "huge_page_bytes_per_rank": [rank["huge_page_bytes"] for rank in per_rank],
                  "lookups_per_sample": first["lookups_per_sample"]}
        if "reference_seconds_per_step" in first:
            reference = max(rank["results"][index]["reference_seconds_per_step"] for rank in per_rank)
            figure["reference_seconds_per_step"] = reference
        out.append(figure)
    return out


def _key(figure: dict) -> tuple:
    return figure["dtype"], figure["world_size"], figure["batch_size"]


def _series(figures: list[dict]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for figure in figures:
        dtype, world, batch = _key(figure)
        series.setdefault(f"{dtype} {world}r b{batch}", []).append((figure["rows"], figure["samples_per_s"]))
    return series


def build_report(figures: list[dict], skipped: list[str], args: argparse.Namespace) -> dict:
    """The table, and each figure's cost per sample against the smallest row count of its series."""
    import torch

    smallest = {}
    for figure in sorted(figures, key=lambda f: f["rows"]):
        smallest.setdefault(_key(figure), figure)
    lines = [f"{'rows':>12} {'dtype':>5} {'ranks':>5} {'batch':>6} {'s/step':>9} {'samples/s':>11} "
             f"{'us/sample':>10} {'lookups':>7} {'vs min rows':>11}  peak RSS per rank, GiB (in huge pages)"]
    worst = 0.0
    for figure in sorted(figures, key=lambda f: (f["dtype"], f["world_size"], f["batch_size"], f["rows"])):
        # Measured in turns with the smallest tables in the same job where it could; else across jobs.
        reference = figure.get("reference_seconds_per_step")
        figure["vs_smallest_rows"] = (figure["seconds_per_step"] / reference if reference else
                                      figure["us_per_sample"] / smallest[_key(figure)]["us_per_sample"])
        worst = max(worst, abs(figure["vs_smallest_rows"] - 1))
        rss = ", ".join(f"{peak / 2**30:.2f} ({huge / 2**30:.2f})" for peak, huge in
                        zip(figure["peak_rss_bytes_per_rank"], figure["huge_page_bytes_per_rank"]))
        lines.append(f"{figure['rows']:>12,} {figure['dtype']:>5} {figure['world_size']:>5} {figure['batch_size']:>6} "
                     f"{figure['seconds_per_step']:>9.4f} {figure['samples_per_s']:>11,.0f} "
                     f"{figure['us_per_sample']:>10.2f} {figure['lookups_per_sample']:>7.2f} "
                     f"{figure['vs_smallest_rows']:>10.2f}x  {rss}")
    lines += [f"skipped {line}" for line in skipped]
    holds = bool(figures) and worst <= GOAL
    lines.append(f"goal: cost per sample within ±{GOAL:.0%} of the smallest row count up to the largest: "
                 f"{'holds' if holds else 'does NOT hold'} (largest deviation {worst:.0%})")
    return {
        "benchmark": "scale", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "step": args.step, "dim": args.dim, "steps": args.steps, "warmup": args.warmup,
        "results": figures, "skipped": skipped, "largest_deviation": worst, "goal_holds": holds,
        "table": "\n".join(lines),
    }
