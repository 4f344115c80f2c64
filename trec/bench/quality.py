"""`trec bench quality`: recommendation quality of trec's models beside strong baselines, one split each.

For each split seed, on one prepared dataset (``--data``, or ML-100K prepared here with the
benchmark protocol: stratified, test fraction 0.25, no val split), every method is scored on the
test split by trec's one evaluation code (same exclusions: the user's train items; same
:class:`~trec.metrics.RankingAccumulator`):

- **popularity**: items by positive training count (the ``popularity/`` keys of the EASE pass);
- **ease**: the closed-form item-item model, λ chosen on a validation set carved from train
  (:mod:`trec.evaluation.ease`), fit and scored in this process;
- **mf**, **two_tower**: ``trec train`` of configs/movielens_mf.yaml / movielens_two_tower.yaml in a
  subprocess (one process, no torchrun), which ends with the test evaluation into RUN/metrics.json;
- **two_stage**: the two-tower run retrieves, ``trec train`` of configs/movielens_dcn.yaml re-ranks
  (``trec evaluate --run-dir TT --ranker-run-dir DCN``, the ``two_stage/`` keys).

Training seconds: ``train_seconds`` of metrics.json (two-stage: the two-tower's plus the ranker's);
EASE's is its λ search and refit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trec.errors import TrecError
from trec.io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
ML100K = REPO.parent / "shared" / "datasets" / "ml-100k"
METHODS = ("popularity", "ease", "mf", "two_tower", "two_stage")
CONFIGS = {"mf": "configs/movielens_mf.yaml", "two_tower": "configs/movielens_two_tower.yaml",
           "dcn": "configs/movielens_dcn.yaml"}
COLUMNS = ("precision@10", "recall@10", "ndcg@10", "map@10", "coverage@10")
PROTOCOLS = ("stratified", "leave-last-one-out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR",
                        help="a prepared dataset (default: ML-100K prepared per seed under --cache)")
    parser.add_argument("--source", metavar="DIR", default=str(ML100K),
                        help="MovieLens files to prepare when --data is not given (default ../shared/datasets/ml-100k)")
    parser.add_argument("--cache", metavar="DIR", default="data/bench-quality",
                        help="where each seed's split is prepared and reused (default data/bench-quality)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="stratified",
                        help="stratified (default: test fraction 0.25 per user, seeded) or leave-last-one-out (each "
                        "user's last interaction by time is the test item: hit rate and NDCG@10 over the full catalog)")
    parser.add_argument("--seeds", default="42",
                        help="comma-separated split seeds (default 42); with --data they seed training and "
                        "EASE's validation set only")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--runs", metavar="DIR",
                        help="keep the training runs here (default: a temporary directory, removed at the end)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trained method, e.g. training.max_steps=100 (repeatable)")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="trainings run side by side, one thread each (default: 2, or 1 on one core)")


def parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise TrecError(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise TrecError(f"--seeds: expected comma-separated integers, got {text!r}")
    return seeds


def prepared_split(args: argparse.Namespace, seed: int) -> Path:
    """--data, or the ML-100K split of ``seed`` (prepared under --cache once, then reused)."""
    if args.data:
        return Path(args.data)
    loo = args.protocol == "leave-last-one-out"
    out = Path(args.cache) / (f"ml100k-leave-last-one-out-seed{seed}" if loo else f"ml100k-stratified-0.25-seed{seed}")
    if (out / "manifest.json").is_file():
        return out
    if not (Path(args.source) / "u.data").is_file():
        raise TrecError(f"--source {args.source}: no MovieLens 100K u.data there; pass --source or --data DIR")
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.movielens import MovieLensSource
    from trec.config import PrepareConfig

    print(f"preparing ML-100K, {args.protocol}, seed {seed}, in {out} (reused next time)", flush=True)
    options = PrepareConfig(split="leave-last-n", last_n=1, seed=seed) if loo else \
        PrepareConfig(test_fraction=0.25, seed=seed)
    prepare_dataset(MovieLensSource(str(args.source)), out, options, overwrite=True)
    return out


def check_one_test_item(data: Path) -> None:
    """Leave-last-one-out reports recall@10 as the hit rate: true only when every evaluated user has exactly one
    positive test item; anything else is refused, never mislabelled."""
    from trec.data import PreparedDataset

    lengths = PreparedDataset.open(data).user_items(["test"], positives=True).lengths
    if (lengths > 1).any():
        raise TrecError(f"{data}: leave-last-one-out needs one test item per user, but {int((lengths > 1).sum())} "
                        f"users have up to {int(lengths.max())}; prepare it with --split leave-last-n --last-n 1")


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def baselines(data: Path, seed: int) -> dict[str, dict]:
    """Popularity and EASE, in this process: {method: metrics with train_seconds}."""
    import torch

    from trec.config import DataConfig, EvaluationConfig
    from trec.data import PreparedDataset
    from trec.distributed import DistContext
    from trec.evaluation.ease import evaluate_ease
    from trec.evaluation.protocol import excluded_splits

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device, backend="gloo")
    data_cfg = DataConfig()
    dataset = PreparedDataset.open(data, positive_threshold=data_cfg.positive_threshold)
    started = time.perf_counter()
    metrics = evaluate_ease(dataset, "test", excluded_splits(dataset, "test"), EvaluationConfig(ks=[10]), data_cfg,
                            ctx, seed)
    seconds = time.perf_counter() - started
    ease = {k: v for k, v in metrics.items() if not k.startswith("popularity/")} | {"train_seconds": seconds}
    popularity = {k.removeprefix("popularity/"): v for k, v in metrics.items() if k.startswith("popularity/")}
    return {"ease": ease, "popularity": popularity | {"train_seconds": 0.0}}


def trec_cli(*args: object, threads: int | None = None) -> None:
    """``python -m trec ARGS`` in a subprocess (``threads``: its torch/OpenMP threads); a failure stops the
    benchmark with its output's tail."""
    command = [sys.executable, "-m", "trec", *map(str, args)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise TrecError(f"{' '.join(command)} failed ({proc.returncode}):\n" + "\n".join(tail))


def train_run(model: str, data: Path, runs: Path, seed: int, overrides: list[str],
              threads: int | None = None) -> tuple[Path, dict]:
    """``trec train`` of ``model``'s config (one process), unless the run finished before (the two-tower
    serves both two_tower and two_stage); (run dir, its metrics.json)."""
    run_dir = (runs / f"seed{seed}" / model).resolve()
    if not (run_dir / "metrics.json").is_file():
        print(f"seed {seed}: training {model} ...", flush=True)
        trec_cli("train", "--config", REPO / CONFIGS[model], "--data", Path(data).resolve(), "--run-dir", run_dir,
                 f"training.seed={seed}", *overrides, threads=threads)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def runs_needed(methods: list[str]) -> list[str]:
    """The configs to train for ``methods`` (two_stage: the two-tower and the DCN), each once."""
    needed = [m for m in methods if m in ("mf", "two_tower")] + (["two_tower", "dcn"] if "two_stage" in methods else [])
    return list(dict.fromkeys(sorted(needed, key=lambda m: -COST[m])))


COST = {"dcn": 3, "two_tower": 2, "mf": 1}  # longest first, so the parallel runs end together


def train_all(todo: list[tuple[str, Path, int]], runs: Path, overrides: list[str], jobs: int) -> None:
    """Every (model, data, seed) run, ``jobs`` at a time with one thread each (small models scale
    better over processes than over threads), or one at a time with the default threads."""
    from concurrent.futures import ThreadPoolExecutor

    threads = 1 if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(train_run, model, data, runs, seed, overrides, threads)
                       for model, data, seed in todo]:
            future.result()


def trained(method: str, data: Path, runs: Path, seed: int, overrides: list[str]) -> dict:
    """Test metrics of mf, two_tower or two_stage (keys as for a retriever, plus train_seconds)."""
    if method != "two_stage":
        return train_run(method, data, runs, seed, overrides)[1]
    tt_dir, tt = train_run("two_tower", data, runs, seed, overrides)
    dcn_dir, _ = train_run("dcn", data, runs, seed, overrides)
    if not any(key.startswith("two_stage/") for key in json.loads((dcn_dir / "metrics.json").read_text())):
        trec_cli("evaluate", "--run-dir", tt_dir, "--ranker-run-dir", dcn_dir)
    metrics = json.loads((dcn_dir / "metrics.json").read_text())
    two_stage = {k.removeprefix("two_stage/"): v for k, v in metrics.items() if k.startswith("two_stage/")}
    return two_stage | {"train_seconds": tt["train_seconds"] + metrics["train_seconds"]}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method, mean and (over several seeds) sample std of each column and of train_seconds."""
    summary = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(mine)}
        for column in (*COLUMNS, "train_seconds"):
            values = [r[column] for r in mine]
            entry[column] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary.append(entry)
    return summary


def format_table(summary: list[dict]) -> str:
    several = any(entry["seeds"] > 1 for entry in summary)
    width = 17 if several else 9
    header = f"{'method':<12}" + "".join(f" {c:>{width}}" for c in (*COLUMNS, "train s"))
    lines = [header, "-" * len(header)]
    for entry in summary:
        cells = []
        for column in (*COLUMNS, "train_seconds"):
            mean, std = entry[column]["mean"], entry[column]["std"]
            digits = 1 if column == "train_seconds" else 4
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if several else f"{mean:.{digits}f}")
        lines.append(f"{entry['method']:<12}" + "".join(f" {c:>{width}}" for c in cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from trec.bench.index import machine

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trec-bench-quality-") as scratch:
        runs = Path(args.runs) if args.runs else Path(scratch)
        rows, splits = [], {seed: prepared_split(args, seed) for seed in seeds}
        for seed, data in splits.items():
            if args.protocol == "leave-last-one-out":
                check_one_test_item(data)
        if args.jobs < 1:
            raise TrecError(f"--jobs must be >= 1, got {args.jobs}")
        train_all([(model, splits[seed], seed) for model in runs_needed(methods) for seed in seeds], runs,
                  list(args.set_overrides), args.jobs)
        for seed, data in splits.items():
            results = baselines(data, seed) if {"popularity", "ease"} & set(methods) else {}
            for method in methods:
                if method not in results:
                    results[method] = trained(method, data, runs, seed, list(args.set_overrides))
                row = {"seed": seed, "method": method, "data": str(Path(data).resolve())}
                row |= {c: float(results[method][c]) for c in (*COLUMNS, "train_seconds")}
                if args.protocol == "leave-last-one-out":
                    row["hit_rate@10"] = row["recall@10"]  # one test item per user (checked above)
                if method == "ease":
                    row["lambda"] = results[method]["lambda"]
                rows.append(row)
                print(f"seed {seed}: {method} ndcg@10 {row['ndcg@10']:.4f} ({row['train_seconds']:.1f} s)", flush=True)
    summary = summarise(rows, methods)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hit_rate = " (recall@10 = hit rate@10: one test item per user)" if args.protocol == "leave-last-one-out" else ""
    print(f"\n{args.protocol} test split{hit_rate}, K=10, {len(seeds)} seed(s) {','.join(map(str, seeds))}"
          f"{' (mean ± std)' if len(seeds) > 1 else ''}; {machine()}, {when}")
    print(format_table(summary))
    wall = time.perf_counter() - started
    print(f"wall time {wall / 60:.1f} min ({args.jobs} training job(s) at a time)")
    if args.json:
        protocol = ({"data": str(Path(args.data).resolve())} if args.data else
                    {"source": str(Path(args.source).resolve()), "split": args.protocol,
                     **({"test_fraction": 0.25} if args.protocol == "stratified" else {"last_n": 1}),
                     "val_split": False})
        atomic_write_json(Path(args.json), {"benchmark": "quality", "machine": machine(), "date": when,
                                            "protocol": protocol, "seeds": seeds, "methods": methods,
                                            "runs": rows, "summary": summary,
                                            "wall_seconds": wall, "jobs": args.jobs})
        print(f"wrote {args.json}")
    return 0
