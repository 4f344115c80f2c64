"""`trec export`, `trec search` and `trec evaluate --index` on the ML-100K two-tower run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from training import run_command, trec_command

from trec.export import read_embedding_parts

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def run(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command(trec_command(nproc, *args), check, timeout=600)


@pytest.fixture(scope="module")
def exports(full_run, tmp_path_factory) -> dict[str, Path]:
    """2-rank flat and ivf_flat exports, and a 1-rank flat export, of the same run."""
    root = tmp_path_factory.mktemp("exports")
    run(2, "export", "--run-dir", full_run, "--out", root / "flat2", "--users")
    run(2, "export", "--run-dir", full_run, "--out", root / "ivf2", "--set", "export.index=ivf_flat")
    run(1, "export", "--run-dir", full_run, "--out", root / "flat1", "--users")
    return {name: root / name for name in ("flat2", "ivf2", "flat1")}


def test_two_rank_export_writes_parts_shards_and_manifest(exports):
    import faiss

    out = exports["flat2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metric"] == "inner_product" and manifest["num_shards"] == 2
    assert manifest["num_vectors"] == 1682 and manifest["dimension"] == 64 and manifest["normalized"] is True
    assert manifest["source"]["checkpoint"].endswith("checkpoints/best")
    names = sorted(p.name for p in (out / "embeddings").iterdir())
    assert names == ["items-part-0.parquet", "items-part-1.parquet", "users-part-0.parquet", "users-part-1.parquet"]
    total = 0
    for shard in sorted((out / "index").glob("shard-*.faiss")):
        index = faiss.read_index(str(shard))  # plain FAISS opens every shard
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT
        total += index.ntotal
    assert total == 1682


def test_two_rank_export_equals_one_rank_export(exports):
    for kind in ("items", "users"):
        raw2, idx2, vec2 = read_embedding_parts(exports["flat2"] / "embeddings", kind)
        raw1, idx1, vec1 = read_embedding_parts(exports["flat1"] / "embeddings", kind)
        order2, order1 = np.argsort(idx2), np.argsort(idx1)
        assert np.array_equal(idx2[order2], idx1[order1])
        assert list(raw2[order2]) == list(raw1[order1])
        np.testing.assert_allclose(vec2[order2], vec1[order1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, nprobe", [("flat2", None), ("ivf2", "8")])
def test_evaluation_through_the_index_matches_exact(exports, full_run, tmp_path, name, nprobe):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    extra = ["--nprobe", nprobe] if nprobe else []
    run(1, "evaluate", "--run-dir", run_dir, "--index", exports[name], *extra)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(metrics["index/ndcg@10"] - metrics["ndcg@10"]) <= 0.01
    assert metrics["index/ann_recall@10"] >= (1.0 if name == "flat2" else 0.9)


def test_export_of_resumed_run_equals_uninterrupted_run(exports, resumed_run, tmp_path):
    resumed_dir = resumed_run[0]
    run(1, "export", "--run-dir", resumed_dir, "--out", tmp_path / "resumed")
    _, idx_a, vec_a = read_embedding_parts(exports["flat1"] / "embeddings")  # 1 rank, the uninterrupted run
    _, idx_b, vec_b = read_embedding_parts(tmp_path / "resumed" / "embeddings")
    assert np.array_equal(idx_a, idx_b) and np.array_equal(vec_a, vec_b)


def test_search_prints_titled_items_and_refuses_a_corrupt_index(exports, full_run, tmp_path):
    out = run(1, "search", "--index", exports["ivf2"], "--run-dir", full_run, "--user", "1", "-k", "5").stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("user 1: top 5 of 1,682 items (ivf_flat")
    assert len(lines) == 6 and lines[1].lstrip().startswith("1.") and "(19" in lines[1]  # "Title (year)"

    corrupt = tmp_path / "corrupt"
    shutil.copytree(exports["ivf2"], corrupt)
    shard = corrupt / "index" / "shard-1.faiss"
    shard.write_bytes(shard.read_bytes()[:-16] + b"\0" * 16)
    proc = run(1, "search", "--index", corrupt, "--run-dir", full_run, "--user", "1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: index/shard-1.faiss: checksum mismatch")

    shard.unlink()
    proc = run(1, "search", "--index", corrupt, "--run-dir", full_run, "--user", "1", check=False)
    assert proc.returncode == 2 and "index/shard-1.faiss: missing" in proc.stderr


def test_failed_export_leaves_nothing_and_a_restart_starts_clean(full_run, tmp_path):
    out = tmp_path / "export"
    # An interrupted attempt's temporary directory (as left by a killed rank 0).
    stale = tmp_path / ".export.abc123.tmp"
    (stale / "embeddings").mkdir(parents=True)
    (stale / "embeddings" / "items-part-0.parquet").write_bytes(b"partial")
    proc = run(1, "export", "--run-dir", full_run, "--out", out,
               "--set", "export.index=ivf_pq", "--set", "export.pq_m=7", check=False)  # 7 does not divide 64
    assert proc.returncode == 2 and "pq_m" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".export.*.tmp"))
    run(1, "export", "--run-dir", full_run, "--out", out)
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".export.*.tmp"))
