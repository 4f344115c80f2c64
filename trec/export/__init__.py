"""Offline export of item embeddings into a sharded FAISS index, and search over it.

The only package in trec that imports faiss (lazily, in :mod:`trec.export.backend`). Called, the
package exports a trained run: ``trec.export(run_dir, out)`` is :func:`~trec.export.encode.export_trained_run`.

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

import importlib
import sys
import types

# name → submodule. Resolved on first use (PEP 562), so that importing one light submodule (or
# building the CLI parser) does not import torch through the distributed builder.
_EXPORTS = {
    "SHARDING_RULE": "build", "build_sharded_index": "build", "shard_of": "build", "shards_of_rank": "build",
    "export_trained_run": "encode", "exact_topk": "exact", "recall_at_k": "exact",
    "IndexSpec": "kinds", "add_vectors": "kinds", "index_spec": "kinds", "new_index": "kinds",
    "set_search_params": "kinds", "train_template": "kinds",
    "export_directory": "layout", "shard_file": "layout",
    "read_manifest": "manifest", "verify_export": "manifest",
    "EmbeddingPartWriter": "parts", "iter_embedding_batches": "parts", "part_path": "parts", "part_paths": "parts",
    "read_embedding_parts": "parts", "write_embedding_part": "parts",
    "SearchResult": "search", "ShardedIndex": "search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trec.export' has no attribute '{name}'")
    return getattr(importlib.import_module(f"trec.export.{_EXPORTS[name]}"), name)


class _CallablePackage(types.ModuleType):
    """``trec.export(run_dir, out, ...)``, the public API's export, is this package called
    (:func:`trec.export.encode.export_trained_run`): once imported, a package is the attribute of its
    name on its parent, so a plain function ``trec.export`` would be replaced by it."""

    def __call__(self, run_dir, out, **options) -> dict:
        from trec.export.encode import export_trained_run

        return export_trained_run(run_dir, out, **options)


sys.modules[__name__].__class__ = _CallablePackage
