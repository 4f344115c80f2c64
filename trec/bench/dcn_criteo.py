"""`trec bench train --workload dcn-criteo`: the workload torchrec is built for, where the tables dominate.

A DCN-v2 ranker (trec's :class:`~trec.models.dcn.model.DCNRanker`: cross network over the 26
pooled embeddings and the bottom MLP's output, then the top MLP and a click logit, trained with
BCE) over 13 numeric and 26 categorical features with Criteo-like cardinalities (1k to 2M rows,
9.7M in all; ``--scale`` multiplies them), ``--hot`` lookups per feature and row. Batches are
synthetic and built in memory (uniform IDs, 25% clicks): no dataset is prepared. In one run:

- **tables only**: FBGEMM's fused RowWiseAdagrad tables (one EBC sharded by DMP) against 26
  ``nn.EmbeddingBag(sparse=True)`` + ``SparseAdam``, lookup + backward + update, no MLP: the ceiling;
- **the full step**: trec (DMP, fused RowWiseAdagrad, ``TrainPipelineSparseDist``, Adam for the
  MLPs) against the same ranker with its EBC swapped for (a) ``EmbeddingBag(sparse)`` + SparseAdam
  (+ Adam) and (b) dense ``nn.Embedding`` + Adam (every step updates every row: few steps).

Targets: the full step's ratio over (a) reaches 80% of the tables-only ratio, and 100x (b).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trec.config import ShardingKind, TrecConfig
from trec.data import FeatureSpec, RecBatch
from trec.data.batch import keyed_jagged
from trec.io import atomic_write_json

# Criteo-like cardinalities (1k to 2M rows): a few huge ID tables, a long tail of small ones.
CARDINALITIES = (2_000_000, 2_000_000, 1_500_000, 1_000_000, 800_000, 600_000, 400_000, 300_000, 200_000, 150_000,
                 100_000, 80_000, 50_000, 30_000, 20_000, 15_000, 10_000, 8_000, 6_000, 5_000, 4_000, 3_000, 2_000,
                 1_500, 1_200, 1_000)
NUMERIC = 13
TARGETS = {"share_of_tables_ratio": 0.8, "dense_baseline": 100.0}


def cardinalities(scale: float) -> list[int]:
    return [max(4, round(rows * scale)) for rows in CARDINALITIES]


def synthetic_criteo(scale: float, hot: int) -> SimpleNamespace:
    """The features a :class:`DCNRanker` reads from a dataset (``sparse_features``, ``dense_features``)."""
    sparse = [FeatureSpec(name=f"cat_{i}", entity="context", kind="categorical", multi_hot=hot > 1, cardinality=rows)
              for i, rows in enumerate(cardinalities(scale))]
    dense = [FeatureSpec(name=f"int_{i}", entity="context", kind="numeric") for i in range(NUMERIC)]
    return SimpleNamespace(path="synthetic Criteo-like features", sparse_features=sparse, dense_features=dense)


def synthetic_batches(data: SimpleNamespace, hot: int, batch_size: int, count: int, seed: int = 0) -> list[RecBatch]:
    """``count`` batches of ``batch_size`` rows: ``hot`` uniform IDs per feature, N(0, 1) numeric
    features, a click on 25% of the rows."""
    rng = np.random.default_rng(seed)
    names = [spec.name for spec in data.sparse_features]
    batches = []
    for _ in range(count):
        lengths = [np.full(batch_size, hot, np.int32) for _ in names]
        values = [rng.integers(0, spec.cardinality, batch_size * hot) for spec in data.sparse_features]
        batches.append(RecBatch(
            dense_features=torch.from_numpy(rng.standard_normal((batch_size, NUMERIC), dtype=np.float32)),
            sparse_features=keyed_jagged(names, lengths, values, batch_size),
            labels=torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32)),
            ratings=torch.zeros(batch_size)))
    return batches


class ClickTask(nn.Module):
    """The ranker and the pointwise click loss of :class:`~trec.models.dcn.model.RankingTask`
    (which also needs a prepared dataset for its negative sampler): ``forward(batch) -> (loss, outputs)``."""

    def __init__(self, cfg: TrecConfig, data: SimpleNamespace) -> None:
        super().__init__()
        from trec.models.dcn.model import DCNRanker

        self.model = DCNRanker(cfg.model, cfg.model.dcn, data)

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, _ = self.model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, {"loss": loss.detach()}


def bench_config(batch_size: int, dim: int) -> TrecConfig:
    """A light DCN-v2 (bottom 32-D, 2 cross layers of rank 16, top 64-32): the tables dominate its step."""
    from trec.models import load_config

    cfg = load_config(None, ["model.name=dcn", f"model.embedding_dim={dim}", f"data.batch_size={batch_size}",
                             "optimizer.warmup_steps=0", "optimizer.decay=none", "model.dcn.cross_layers=2",
                             "model.dcn.low_rank=16"])
    cfg.model.dcn.dense_layers, cfg.model.dcn.top_layers = [32, dim], [64, 32]
    cfg.sharding.sharding_types = [ShardingKind.table_wise]  # whole tables: one kernel per table group on CPU
    return cfg


def trec_step(cfg: TrecConfig, data, ctx):
    """(step(batch), the DMP model) of trec's full DCN training step through TrainPipelineSparseDist."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trec.distributed import shard_model
    from trec.optim import attach_sparse_optimizer, build_optimizer

    task = ClickTask(cfg, data)
    attach_sparse_optimizer(task, cfg.optimizer)
    model = shard_model(task, cfg.sharding, ctx, batch_size=cfg.data.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, total_steps=10**6)
    model.train()
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    return pipeline, model


def baseline_step(cfg: TrecConfig, data, sparse: bool):
    """step(batch) of the same ranker with plain-PyTorch tables (see trec.bench.baselines)."""
    from trec.bench.baselines import PlainEmbeddingBags, baseline_optimizers, training_step

    task = ClickTask(cfg, data)
    arch = task.model.sparse_arch
    arch.ebc = PlainEmbeddingBags(arch.ebc.embedding_bag_configs(), sparse)
    return training_step(task, baseline_optimizers(task, sparse))


def run(args: argparse.Namespace) -> int:
    from trec.bench.train import embedding_only_seconds_per_step, time_steps
    from trec.distributed import barrier, distributed_session
    from trec.models.modules import embedding_tables

    dim = args.dim or 32
    data = synthetic_criteo(args.scale, args.hot)
    cfg = bench_config(args.batch_size, dim)
    rows = sum(spec.cardinality for spec in data.sparse_features)
    print(f"DCN-v2 over 26 features ({rows:,} rows x {dim}, {rows * dim * 4 / 2**30:.2f} GiB per copy), {args.hot} "
          f"lookups per feature, batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    batches = synthetic_batches(data, args.hot, args.batch_size, args.steps + args.warmup)
    seconds: dict[str, float] = {}
    profile = None
    with distributed_session(seed=0, log_level="WARNING") as ctx:
        tables = embedding_tables(data.sparse_features, cfg.model)
        seconds["tables only: FBGEMM fused RowWiseAdagrad"] = embedding_only_seconds_per_step(
            cfg, tables, ctx, batches, args.warmup, fused=True)
        seconds["tables only: EmbeddingBag(sparse) + SparseAdam"] = embedding_only_seconds_per_step(
            cfg, tables, ctx, batches, args.warmup, fused=False)
        print("timed the tables alone", flush=True)
        pipeline, model = trec_step(cfg, data, ctx)
        iterator = iter(batches)
        seconds["trec DCN step"] = time_steps(lambda _: pipeline.progress(iterator), batches, args.warmup, barrier)
        del pipeline, model
        gc.collect()
        if args.profile:
            profile = _profile(cfg, data, ctx, batches, args.profile)
        print("timed trec", flush=True)
    seconds["(a) EmbeddingBag(sparse) + SparseAdam"] = time_steps(baseline_step(cfg, data, True), batches, args.warmup)
    gc.collect()
    print("timed baseline (a)", flush=True)
    dense_batches = batches[: min(args.warmup, 1) + args.dense_steps]
    seconds["(b) dense Embedding + Adam"] = time_steps(baseline_step(cfg, data, False), dense_batches,
                                                      min(args.warmup, 1))
    gc.collect()
    report = _report(seconds, args, dim, rows, profile)
    print(report["table"])
    if args.json:
        atomic_write_json(Path(args.json), {k: v for k, v in report.items() if k != "table"})
    return 0


def _profile(cfg: TrecConfig, data, ctx, batches, steps: int) -> dict:
    from trec.bench.step_profile import profile_pipeline

    pipeline, model = trec_step(cfg, data, ctx)
    profile = profile_pipeline(pipeline, batches, steps)
    del pipeline, model
    gc.collect()
    return profile


def _report(seconds: dict[str, float], args, dim: int, rows: int, profile: dict | None) -> dict:
    names = list(seconds)
    fused, plain, trec, sparse, dense = (seconds[name] for name in names)
    tables_ratio, full_ratio, dense_ratio = plain / fused, sparse / trec, dense / trec
    lines = [f"{'':<50}{'samples/s':>12}{'ms/step':>10}"]
    lines += [f"{name:<50}{args.batch_size / s:>12,.0f}{s * 1e3:>10.1f}" for name, s in seconds.items()]
    share = full_ratio / tables_ratio
    met = share >= TARGETS["share_of_tables_ratio"] and dense_ratio >= TARGETS["dense_baseline"]
    lines += [f"tables only: FBGEMM / EmbeddingBag(sparse) = {tables_ratio:.2f}x (the ceiling)",
              f"full step: trec / (a) = {full_ratio:.2f}x ({share:.0%} of the tables-only ratio), "
              f"trec / (b) = {dense_ratio:,.0f}x",
              f"targets: >= {TARGETS['share_of_tables_ratio']:.0%} of the tables-only ratio and >= "
              f"{TARGETS['dense_baseline']:.0f}x (b): {'met' if met else 'NOT met'}"]
    if profile is not None:
        from trec.bench.step_profile import profile_table

        lines += ["profile of the trec step:", profile_table({"trec DCN step": profile})]
    return {
        "benchmark": "train", "workload": "dcn-criteo", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "embedding_rows": rows, "dim": dim, "hot": args.hot, "scale": args.scale,
        "batch_size": args.batch_size, "steps": args.steps, "dense_steps": args.dense_steps,
        "seconds_per_step": seconds, "tables_only_ratio": tables_ratio, "full_step_ratio": full_ratio,
        "share_of_tables_ratio": share, "vs_dense_baseline": dense_ratio, "targets_met": met, "profile": profile,
        "table": "\n".join(lines),
    }
