"""Offline export of item embeddings into a sharded FAISS index, and search over it.

The only package in trec that imports faiss (lazily, in :mod:`trec.export.backend`).

Export (collective: call on every rank; a single process works the same)::

    from trec.export import export_directory, EmbeddingPartWriter, part_path, build_sharded_index

    with export_directory(out_dir) as tmp:                       # temp dir, renamed at the end
        with EmbeddingPartWriter(part_path(tmp / "embeddings", "items", rank), dimension=D) as part:
            for raw_ids, indices, vectors in encoded_batches:    # (B,), (B,) int64, B X D float32
                part.write(raw_ids, indices, vectors)
        manifest = build_sharded_index(tmp, cfg.export, normalized=True,
                                       source={"checkpoint": ..., "config": ...})

Search::

    index = ShardedIndex.load(out_dir, device="cpu")
    raw_ids, item_indices, scores = index.search(queries, k=10)  # N X k each
    recall = recall_at_k(item_indices, index.exact_search(queries, 10).item_indices)
"""

from trec.export.build import SHARDING_RULE, build_sharded_index, shard_of, shards_of_rank
from trec.export.exact import exact_topk, recall_at_k
from trec.export.kinds import IndexSpec, add_vectors, index_spec, new_index, set_search_params, train_template
from trec.export.layout import export_directory, shard_file
from trec.export.manifest import read_manifest, verify_export
from trec.export.parts import (
    EmbeddingPartWriter,
    iter_embedding_batches,
    part_path,
    part_paths,
    read_embedding_parts,
    write_embedding_part,
)
from trec.export.search import SearchResult, ShardedIndex

__all__ = [
    "SHARDING_RULE",
    "EmbeddingPartWriter",
    "IndexSpec",
    "SearchResult",
    "ShardedIndex",
    "add_vectors",
    "build_sharded_index",
    "exact_topk",
    "export_directory",
    "index_spec",
    "iter_embedding_batches",
    "new_index",
    "part_path",
    "part_paths",
    "read_embedding_parts",
    "read_manifest",
    "recall_at_k",
    "set_search_params",
    "shard_file",
    "shard_of",
    "shards_of_rank",
    "train_template",
    "verify_export",
    "write_embedding_part",
]
