"""The index build across ranks: a 2-rank build of embedding parts equals a 1-rank build of the same parts."""

from __future__ import annotations

import numpy as np
import pytest

from trec.export import ShardedIndex, part_path, write_embedding_part

KINDS = ("flat", "ivf_flat", "ivf_pq")


def write_parts(directory, n: int = 2500, d: int = 16, parts: int = 3) -> np.ndarray:
    """Clustered unit vectors in ``parts`` contiguous slices (as ranks would encode them)."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((20, d)).astype(np.float32)
    vectors = centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for rank, rows in enumerate(np.array_split(np.arange(n), parts)):
        write_embedding_part(part_path(directory, "items", rank), rows * 10, rows, vectors[rows])  # int raw ids
    return rng.standard_normal((30, d)).astype(np.float32)


@pytest.mark.dist
def test_two_rank_build_equals_one_rank_build(torchrun, tmp_path):
    queries = write_parts(tmp_path / "parts")
    torchrun(2, "tests/workers/export_index.py", tmp_path / "parts", tmp_path / "two", *KINDS)
    torchrun(1, "tests/workers/export_index.py", tmp_path / "parts", tmp_path / "one", *KINDS)
    for kind in KINDS:
        two, one = ShardedIndex.load(tmp_path / "two" / kind), ShardedIndex.load(tmp_path / "one" / kind)
        assert (two.num_shards, one.num_shards) == (2, 1)  # num_shards=0: one shard per rank
        assert two.manifest["factory"] == one.manifest["factory"]
        assert two.manifest["source"]["world_size"] == 2
        assert set(two.manifest["checksums"]) >= {f"embeddings/items-part-{r}.parquet" for r in range(3)}
        a, b = two.search(queries, 10), one.search(queries, 10)  # nprobe 4: approximate, same quantizer
        assert np.array_equal(a.item_indices, b.item_indices), kind
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert np.array_equal(a.raw_ids, a.item_indices * 10)
