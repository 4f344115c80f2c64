"""FAISS export: embedding parts, index kinds, sharded search against brute force, manifest checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trec.config import ExportConfig
from trec.errors import TrecError
from trec.export import (
    EmbeddingPartWriter,
    ShardedIndex,
    build_sharded_index,
    exact_topk,
    export_directory,
    part_path,
    read_embedding_parts,
    recall_at_k,
    write_embedding_part,
)
from trec.export.build import choose_sample
from trec.export.kinds import resolve_nlist

N, D, K = 3000, 32, 10
SMALL_PQ = {"pq_m": 8, "pq_nbits": 6}  # 64 centroids per sub-quantizer: enough for 3k vectors


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Catalogs here are tiny: one thread is plenty, and it keeps OpenMP barriers from spinning
    when other jobs share the 2 cores (then two threads can be 10x slower than one)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def make_catalog(n: int = N, d: int = D, seed: int = 0):
    """Clustered unit vectors; item indices are a shuffled 1..n (0 left out, like a padding row)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, d)).astype(np.float32)
    vectors = centers[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indices = rng.permutation(n).astype(np.int64) + 1
    raw_ids = np.array([f"item-{i}" for i in indices], dtype=object)
    return raw_ids, indices, vectors


CATALOG = make_catalog()
QUERIES = np.random.default_rng(1).standard_normal((40, D)).astype(np.float32)


def export(out: Path, cfg: ExportConfig, parts: int = 2, catalog=CATALOG) -> Path:
    """Write ``parts`` contiguous slices of the catalog as parts, then build the index."""
    raw_ids, indices, vectors = catalog
    with export_directory(out) as tmp:
        for rank, rows in enumerate(np.array_split(np.arange(len(indices)), parts)):
            write_embedding_part(part_path(tmp / "embeddings", "items", rank), raw_ids[rows], indices[rows], vectors[rows])
        build_sharded_index(tmp, cfg, normalized=True, source={"checkpoint": "test", "config": {}})
    return out


def brute_force(k: int = K):
    _, indices, vectors = CATALOG
    return exact_topk(QUERIES, vectors, k, ids=indices)


# --------------------------------------------------------------------------------------------
# embedding parts
# --------------------------------------------------------------------------------------------


def test_embedding_parts_round_trip_string_and_integer_ids(tmp_path):
    raw_ids, indices, vectors = CATALOG
    with EmbeddingPartWriter(part_path(tmp_path, "items", 0), D) as part:  # streamed in batches
        for rows in np.array_split(np.arange(1000), 3):
            part.write(raw_ids[rows], indices[rows], vectors[rows])
    write_embedding_part(part_path(tmp_path, "items", 1), raw_ids[1000:], indices[1000:], vectors[1000:])
    write_embedding_part(part_path(tmp_path, "users", 0), np.arange(5) * 7, np.arange(5), vectors[:5])

    got_raw, got_indices, got_vectors = read_embedding_parts(tmp_path, "items")
    assert list(got_raw) == list(raw_ids) and np.array_equal(got_indices, indices)
    assert got_vectors.dtype == np.float32 and np.array_equal(got_vectors, vectors)
    schema = pq.read_schema(part_path(tmp_path, "items", 0))
    assert schema.field("raw_id").type == pa.string() and schema.field("index").type == pa.int64()
    assert schema.field("vector").type == pa.list_(pa.field("item", pa.float32(), nullable=False), D)

    user_raw, user_indices, _ = read_embedding_parts(tmp_path, "users")
    assert user_raw.dtype == np.int64 and list(user_raw) == [0, 7, 14, 21, 28]
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_part_with_wrong_vector_type_is_refused(tmp_path):
    path = tmp_path / "items-part-0.parquet"
    pq.write_table(pa.table({"raw_id": ["a"], "index": [0], "vector": [[0.5, 1.0]]}), path)  # list<double>
    with pytest.raises(TrecError) as info:
        read_embedding_parts(tmp_path)
    assert str(info.value) == f"{path}: column 'vector' must be fixed_size_list<float32>[D], found list<element: double>"


def test_no_parts_is_refused(tmp_path):
    with pytest.raises(TrecError, match=r"no items-part-\*\.parquet embedding parts found"):
        read_embedding_parts(tmp_path)


# --------------------------------------------------------------------------------------------
# sharded search against brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_flat_equals_brute_force(tmp_path, shards):
    index = ShardedIndex.load(export(tmp_path / "x", ExportConfig(index="flat", num_shards=shards)))
    assert index.num_shards == shards and index.num_vectors == N
    result = index.search(QUERIES, K)
    exact_ids, exact_scores = brute_force()
    assert np.array_equal(result.item_indices, exact_ids)
    np.testing.assert_allclose(result.scores, exact_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_ivf_flat_probing_every_list_equals_brute_force(tmp_path, shards):
    index = ShardedIndex.load(export(tmp_path / "x", ExportConfig(index="ivf_flat", num_shards=shards)))
    index.nprobe = index.manifest["params"]["nlist"]
    result = index.search(QUERIES, K)
    exact_ids, exact_scores = brute_force()
    assert np.array_equal(result.item_indices, exact_ids)
    np.testing.assert_allclose(result.scores, exact_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_shards_share_one_quantizer_and_merge_like_one_index(tmp_path, kind):
    out = export(tmp_path / "x", ExportConfig(index=kind, num_shards=3, nprobe=3, **SMALL_PQ))
    sharded = ShardedIndex.load(out)
    owners = [faiss.read_index(str(out / f"index/shard-{k}.faiss")) for k in range(3)]  # keep alive
    shards = [faiss.extract_index_ivf(owner) for owner in owners]
    centroids = [s.quantizer.reconstruct_n(0, s.nlist) for s in shards]
    assert all(np.array_equal(centroids[0], c) for c in centroids[1:])
    # One unsharded index with that same trained quantizer (and codebook): shard 0, emptied, refilled.
    whole = faiss.read_index(str(out / "index/shard-0.faiss"))
    whole.reset()
    _, indices, vectors = CATALOG
    whole.add_with_ids(vectors, indices)
    faiss.extract_index_ivf(whole).nprobe = 3
    scores, ids = whole.search(QUERIES, K)
    result = sharded.search(QUERIES, K)
    assert np.array_equal(result.item_indices, ids)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    assert recall_at_k(result.item_indices, brute_force()[0]) < 1.0, "nprobe=3 should be approximate here"


def test_every_kind_uses_inner_product_and_plain_faiss_reads_every_shard(tmp_path):
    for kind, extra in [("flat", {}), ("ivf_flat", {}), ("ivf_pq", SMALL_PQ),
                        ("ivf_pq", {**SMALL_PQ, "pq_refine_factor": 4}), ("hnsw", {"hnsw_m": 16})]:
        out = export(tmp_path / f"{kind}-{len(extra)}", ExportConfig(index=kind, num_shards=2, **extra))
        manifest = json.loads((out / "manifest.json").read_text())
        for name in manifest["shard_files"]:
            shard = faiss.read_index(str(out / name))
            assert shard.metric_type == faiss.METRIC_INNER_PRODUCT, (kind, name)
            assert shard.d == D
        assert manifest["metric"] == "inner_product"
        recall = recall_at_k(ShardedIndex.load(out).search(QUERIES, K).item_indices, brute_force()[0])
        assert recall > (0.35 if kind == "ivf_pq" and not extra.get("pq_refine_factor") else 0.8), (kind, recall)


# --------------------------------------------------------------------------------------------
# round trip, manifest
# --------------------------------------------------------------------------------------------


def test_round_trip_returns_raw_ids_and_manifest_describes_the_export(tmp_path):
    out = export(tmp_path / "x", ExportConfig(index="ivf_flat", num_shards=2, nprobe=8), parts=3)
    index = ShardedIndex.load(out)
    raw_ids, item_indices, scores = index.search(QUERIES[:3], 5)
    assert raw_ids.shape == item_indices.shape == scores.shape == (3, 5)
    assert all(raw == f"item-{i}" for raw, i in zip(raw_ids.ravel(), item_indices.ravel()))
    assert np.all(np.diff(scores, axis=1) <= 0), "best first"

    m = index.manifest
    nlist = m["params"]["nlist"]
    assert nlist == resolve_nlist(0, N, N) == 76  # 4 * sqrt(3000) = 219, clamped to 3000 // 39
    assert (m["factory"], m["index_kind"], m["dimension"], m["metric"]) == (f"IVF{nlist},Flat", "ivf_flat", D, "inner_product")
    assert m["num_shards"] == 2 and sum(m["vectors_per_shard"]) == m["num_vectors"] == N
    assert m["shard_files"] == ["index/shard-0.faiss", "index/shard-1.faiss"]
    assert m["normalized"] is True and m["search_defaults"] == {"nprobe": 8}
    assert m["id_mapping"]["file"] == "index/ids.parquet" and m["id_mapping"]["raw_id_type"] == "string"
    assert m["embeddings"]["items"]["rows"] == [1000, 1000, 1000]
    assert set(m["checksums"]) == {"index/ids.parquet", "index/shard-0.faiss", "index/shard-1.faiss",
                                   *(f"embeddings/items-part-{r}.parquet" for r in range(3))}
    assert m["source"] == {"checkpoint": "test", "config": {}}
    assert set(m["versions"]) == {"trec", "faiss", "torch"}
    # Item i sits in shard i % num_shards.
    for k in range(2):
        owner = faiss.read_index(str(out / f"index/shard-{k}.faiss"))
        ivf = faiss.extract_index_ivf(owner)
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst)).copy()
                              for lst in range(ivf.nlist) if ivf.invlists.list_size(lst)])
        assert np.all(ids % 2 == k)

    item_indices_all, vectors = index.item_vectors()
    assert np.array_equal(item_indices_all, np.arange(1, N + 1)) and vectors.shape == (N, D)
    exact = index.exact_search(QUERIES, K)
    assert np.array_equal(exact.item_indices, brute_force()[0])


def test_fewer_items_than_k_are_padded(tmp_path):
    small = tuple(column[:7] for column in CATALOG)
    index = ShardedIndex.load(export(tmp_path / "x", ExportConfig(index="flat", num_shards=3), catalog=small))
    raw_ids, item_indices, scores = index.search(QUERIES[:2], 10)
    assert (item_indices[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()
    assert all(r is None for r in raw_ids[:, 7:].ravel()) and all(r is not None for r in raw_ids[:, :7].ravel())


def test_search_settings_apply_to_every_shard(tmp_path):
    hnsw = ShardedIndex.load(export(tmp_path / "h", ExportConfig(index="hnsw", num_shards=2, hnsw_m=8, ef_search=20)))
    assert hnsw.ef_search == 20 and hnsw.nprobe is None
    hnsw.ef_search = 77
    assert all(faiss.downcast_index(s.index).hnsw.efSearch == 77 for s in hnsw._shards)
    with pytest.raises(TrecError, match="^nprobe applies to ivf_flat and ivf_pq indexes; this export is hnsw$"):
        hnsw.nprobe = 4
    with pytest.raises(TrecError, match=rf"^queries must be N X {D} \(the index dimension\), got shape \(2, 3\)$"):
        hnsw.search(np.zeros((2, 3), np.float32), 5)


def test_sample_is_the_same_whatever_the_part_layout():
    indices = np.sort(CATALOG[1])
    assert np.array_equal(choose_sample(indices, 100, seed=0), choose_sample(indices.copy(), 100, seed=0))
    assert len(choose_sample(indices, 100, seed=0)) == 100
    assert np.array_equal(choose_sample(indices, 10_000, seed=0), indices)


def test_nlist_resolution():
    assert resolve_nlist(0, 1_000_000, 1_000_000) == 4000
    assert resolve_nlist(0, 1_000_000, 100_000) == 2564  # at least 39 training vectors per list
    assert resolve_nlist(0, 10, 10) == 1
    with pytest.raises(TrecError, match="^export.nlist=500 needs at least 500 training vectors, but only 300"):
        resolve_nlist(500, 300, 300)


def test_bad_pq_settings_are_refused(tmp_path):
    with pytest.raises(TrecError, match=f"^export.pq_m=7 must divide the embedding dimension {D}$"):
        export(tmp_path / "x", ExportConfig(index="ivf_pq", pq_m=7))


# --------------------------------------------------------------------------------------------
# refusals: the loader checks the files against the manifest
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_export(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("built") / "export", ExportConfig(index="ivf_flat", num_shards=2))


@pytest.fixture
def copy(built_export, tmp_path) -> Path:
    return Path(shutil.copytree(built_export, tmp_path / "export"))


def refusal(root: Path) -> str:
    with pytest.raises(TrecError) as info:
        ShardedIndex.load(root)
    return str(info.value)


def test_corrupted_shard_is_refused(copy):
    path = copy / "index/shard-1.faiss"
    expected = json.loads((copy / "manifest.json").read_text())["checksums"]["index/shard-1.faiss"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from trec.io import sha256_file

    actual = sha256_file(path)
    assert refusal(copy) == (
        f"index/shard-1.faiss: checksum mismatch (manifest says {expected[:12]}, file has {actual[:12]})"
    )


def test_missing_shard_is_refused(copy):
    (copy / "index/shard-1.faiss").unlink()
    assert refusal(copy) == "index/shard-1.faiss: missing"


def test_manifest_listing_a_shard_that_is_not_there_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shard_files"].append("index/shard-2.faiss")
    manifest["vectors_per_shard"].append(0)
    manifest["num_shards"] = 3
    manifest["checksums"]["index/shard-2.faiss"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert refusal(copy) == "index/shard-2.faiss: missing"


def test_unlisted_shard_is_refused(copy):
    shutil.copy(copy / "index/shard-0.faiss", copy / "index/shard-2.faiss")
    assert refusal(copy) == "index/shard-2.faiss: not listed in manifest.json (left over from another export?)"


def test_missing_manifest_is_refused(copy):
    (copy / "manifest.json").unlink()
    assert refusal(copy) == f"manifest.json: not found in {copy}"


def test_corrupted_embedding_part_is_refused_and_verify_false_skips_checksums(copy):
    with open(copy / "embeddings/items-part-0.parquet", "ab") as handle:
        handle.write(b"junk")
    assert refusal(copy).startswith("embeddings/items-part-0.parquet: checksum mismatch (manifest says ")
    assert ShardedIndex.load(copy, verify=False).num_vectors == N


# --------------------------------------------------------------------------------------------
# the export directory is atomic
# --------------------------------------------------------------------------------------------


def test_failure_mid_build_leaves_no_directory(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        with export_directory(out) as tmp:
            raw_ids, indices, vectors = CATALOG
            write_embedding_part(part_path(tmp / "embeddings", "items", 0), raw_ids, indices, vectors)
            raise RuntimeError("encoder crashed")
    with pytest.raises(TrecError, match="must divide"):
        export(out, ExportConfig(index="ivf_pq", pq_m=5))  # fails inside build_sharded_index
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(TrecError, match="export: already exists; choose another output directory"):
        with export_directory(tmp_path / "export"):
            pass


# --------------------------------------------------------------------------------------------
# exact search and recall
# --------------------------------------------------------------------------------------------


def test_exact_topk_matches_a_full_sort_in_any_chunking():
    _, indices, vectors = CATALOG
    scores = QUERIES @ vectors.T
    order = np.argsort(-scores, axis=1)[:, :K]
    for query_chunk, vector_chunk in [(1024, 262_144), (7, 100)]:
        ids, top = exact_topk(QUERIES, vectors, K, ids=indices, query_chunk=query_chunk, vector_chunk=vector_chunk)
        assert np.array_equal(ids, indices[order])
        np.testing.assert_allclose(top, np.take_along_axis(scores, order, axis=1), rtol=1e-5, atol=1e-5)
    ids, top = exact_topk(QUERIES[:1], vectors[:3], 5)
    assert list(ids[0, 3:]) == [-1, -1] and np.isneginf(top[0, 3:]).all()


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, -1]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[4, 3, 9, 9], [7, 8, 9, -1]]), exact) == pytest.approx((2 / 4 + 1 / 3) / 2)


# --------------------------------------------------------------------------------------------
# trec bench index (tiny sizes: the command's wiring, table and JSON, not its figures)
# --------------------------------------------------------------------------------------------


def test_bench_index_prints_table_and_writes_json(run_trec, tmp_path, built_export):
    small = ["--queries", "200", "--repeat", "1", "--threads", "1", "--pq-m", "4", "--pq-nbits", "6", "--hnsw-m", "8"]
    proc = run_trec("bench", "index", "--items", "3000", "--dim", "16", "--clusters", "20", *small,
                    "--export-items", "2000", "--cache", tmp_path / "cache", "--json", tmp_path / "bench.json")
    assert "vectors: clustered synthetic: 3,000 unit vectors, D=16" in proc.stdout
    assert "export throughput (items encoded/s): " in proc.stdout and "over 2,000 items" in proc.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    kinds = [r["kind"] for r in figures["rows"]]
    assert kinds[0] == "flat (exact)" and figures["rows"][0]["speedup"] == 1.0
    assert {"ivf_flat", "ivf_pq", "ivf_pq+refine10", "hnsw"} <= set(kinds)
    assert [r["setting"] for r in figures["rows"] if r["kind"] == "ivf_flat"] == [
        f"nprobe={n}" for n in (1, 4, 8, 16, 32, 64)]
    assert all(0.0 <= r["recall"] <= 1.0 and r["qps"] > 0 for r in figures["rows"])
    assert figures["export_throughput"]["items"] == 2000 and figures["export_throughput"]["items_per_s"] > 0
    assert figures["num_items"] == 3000

    proc = run_trec("bench", "index", "--embeddings", built_export, "--kinds", "ivf_flat", "--export-items", "0", *small)
    assert "export throughput (items encoded/s): skipped" in proc.stdout
    assert f"exported vectors from {built_export / 'embeddings'}: 3,000 items, D={D}" in proc.stdout
