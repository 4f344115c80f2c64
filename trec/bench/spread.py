"""The same batches over larger tables, so that `trec bench scale` compares equal work across row counts.

A batch drawn from small tables keeps its bag lengths, lookups and repeated IDs; only its rows move
across the whole of each larger table (a bijection per key).
"""

from __future__ import annotations

# Knuth's multiplicative-hash constant, a prime larger than any table here: x -> x * P mod n is then
# a bijection of [0, n), so distinct IDs stay distinct and repeated ones stay repeated.
_SPREAD_PRIME = 2_654_435_761


def spread_ids(batches: list, source_rows: dict[str, int], target_rows: dict[str, int]) -> list:
    """``batches`` (drawn from tables of ``source_rows`` rows per KJT key) over tables of ``target_rows``.

    Each value v of a key whose table grew becomes (v * P) mod target rows: the same lengths,
    lookups and duplicate pattern per batch (a bijection), only the rows now lie across the whole
    larger table. Keys whose table kept its size keep their values.
    """
    from trec.data.batch import RecBatch, keyed_jagged

    grown = {key for key, rows in target_rows.items() if rows != source_rows[key]}
    if not grown:
        return batches
    if any(_SPREAD_PRIME <= target_rows[key] or target_rows[key] < source_rows[key] for key in grown):
        raise ValueError(f"spread_ids maps into larger tables under {_SPREAD_PRIME:,} rows only")
    out = []
    for batch in batches:
        kjt = batch.sparse_features
        jagged = kjt.to_dict()  # split once per batch: indexing the KJT by key splits it again each time
        values = [jagged[key].values() for key in kjt.keys()]
        values = [(v * _SPREAD_PRIME) % target_rows[key] if key in grown else v for key, v in zip(kjt.keys(), values)]
        sparse = keyed_jagged(kjt.keys(), [jagged[key].lengths().numpy() for key in kjt.keys()],
                              [v.numpy() for v in values], kjt.stride())
        out.append(RecBatch(dense_features=batch.dense_features, sparse_features=sparse, labels=batch.labels,
                            ratings=batch.ratings))
    return out


def table_rows(dataset) -> dict[str, int]:
    """Rows of each categorical feature's table (one table per feature, hashed IDs)."""
    return {feature.name: feature.cardinality for feature in dataset.sparse_features}
