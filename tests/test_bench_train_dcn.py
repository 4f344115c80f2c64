"""`trec bench train --workload dcn-criteo` at a tiny --scale (the command's wiring, table and JSON,
not its figures), the synthetic Criteo-like batches, and the step profile's split into parts."""

import json

import pytest
import torch

from trec.bench.dcn_criteo import CARDINALITIES, cardinalities, synthetic_batches, synthetic_criteo
from trec.bench.step_profile import DENSE, PARTS, TABLES, _part_of, profile_step, profile_table


def test_criteo_like_tables_span_1k_to_2m_rows_and_scale_down():
    assert len(CARDINALITIES) == 26 and min(CARDINALITIES) == 1_000 and max(CARDINALITIES) == 2_000_000
    assert cardinalities(0.001)[:2] == [2_000, 2_000] and min(cardinalities(0.0001)) == 4


def test_synthetic_batches_are_multi_hot_kjts_within_each_table():
    data = synthetic_criteo(0.001, hot=3)
    (batch,) = synthetic_batches(data, hot=3, batch_size=5, count=1)
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)] and kjt.stride() == 5
    assert kjt.length_per_key() == [15] * 26 and torch.all(kjt.lengths() == 3)
    for spec in data.sparse_features:
        values = kjt[spec.name].values()
        assert values.dtype == torch.int64 and 0 <= int(values.min()) and int(values.max()) < spec.cardinality
    assert batch.dense_features.shape == (5, 13) and batch.labels.shape == (5,)


def test_profile_parts_follow_torchrec_scopes():
    assert _part_of(["aten::copy_", "fbgemm::split_embedding_backward_codegen_rowwise_adagrad_cpu"]) == TABLES
    assert _part_of(["aten::alltoall", "## all2all_data:kjt splits ##", "## start_sparse_data_dist ##"]) == "input dist"
    assert _part_of(["aten::mm", "AddmmBackward0", "autograd::engine::evaluate_function: AddmmBackward0"]) == DENSE
    assert _part_of(["aten::cat", "DistributedDataParallel.forward"]) == "copies and regrouping"
    assert _part_of(["aten::sqrt", "Optimizer.step#Adam.step", "Optimizer.step#CombinedOptimizer.step"]) == DENSE
    assert _part_of(["Optimizer.step#CombinedOptimizer.step"]) == "optimizer bookkeeping"
    assert _part_of(["## step ##"]) == "Python" and set(PARTS) >= {TABLES, DENSE, "Python"}


def test_bench_dcn_criteo_prints_ratios_and_writes_json(run_trec, tmp_path):
    out = tmp_path / "dcn.json"
    proc = run_trec("bench", "train", "--workload", "dcn-criteo", "--scale", "0.0005", "--hot", "2", "--dim", "8",
                    "--batch-size", "32", "--steps", "2", "--warmup", "1", "--dense-steps", "1", "--threads", "1",
                    "--json", out, timeout=120)
    assert "DCN-v2 over 26 features" in proc.stdout and "tables only: FBGEMM / EmbeddingBag(sparse) = " in proc.stdout
    assert "targets: >= 80% of the tables-only ratio" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["workload"] == "dcn-criteo" and figures["hot"] == 2 and figures["dim"] == 8
    assert figures["threads"] == 1 and "1 threads" in proc.stdout
    assert set(figures["seconds_per_step"]) == {
        "tables only: FBGEMM fused RowWiseAdagrad", "tables only: EmbeddingBag(sparse) + SparseAdam", "trec DCN step",
        "(a) EmbeddingBag(sparse) + SparseAdam", "(b) dense Embedding + Adam"}
    assert all(s > 0 for s in figures["seconds_per_step"].values())
    assert figures["share_of_tables_ratio"] == figures["full_step_ratio"] / figures["tables_only_ratio"]
    assert figures["profile"] is None  # --profile 0


def test_profile_step_splits_a_step_into_parts_that_add_up():
    weight = torch.randn(64, 64, requires_grad=True)

    def step():
        (torch.cat([weight, weight]) @ weight).relu().sum().backward()

    profile = profile_step(step, 3)
    assert set(profile["ms"]) == set(PARTS) and profile["ms"][DENSE] > 0
    assert sum(profile["ms"].values()) == pytest.approx(profile["cpu_ms_per_step"])
    assert "| dense math |" in profile_table({"x": profile})
