"""Top-k sources (exact, popularity, index), exclusion keys, candidate generation and the hard-negative
cache: against brute force on small tensors and a tiny prepared dataset (one process, no sharding)."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from training import run_command

import trec.evaluation.topk as topk_module
from trec.config import DataConfig
from trec.data import Csr, PreparedDataset
from trec.distributed import DistContext
from trec.errors import TrecError
from trec.evaluation.candidates import load_or_mine_hard_candidates, retrieve_candidates, user_batches
from trec.evaluation.topk import exact_topk, exclusion_keys, index_topk, popularity_topk, score_topk
from trec.models import RetrieverRun

CPU = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")


def _brute_force(scores: torch.Tensor, excluded: list[set[int]], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's k best non-excluded items (stable order of equal scores), padded with -1 / -inf."""
    items, values = [], []
    for row, banned in enumerate(excluded):
        order = [int(i) for i in torch.argsort(scores[row], descending=True, stable=True) if int(i) not in banned][:k]
        items.append(order + [-1] * (k - len(order)))
        values.append([float(scores[row, i]) for i in order] + [-np.inf] * (k - len(order)))
    return items, values


@pytest.fixture
def catalog():
    generator = torch.Generator().manual_seed(0)
    queries, items = torch.randn(7, 4, generator=generator), torch.randn(9, 4, generator=generator)
    # Row 2 has only 2 eligible items left (fewer than k); row 5 is a padding row (-1).
    seen = Csr.from_keys(np.sort(np.concatenate([[0 * 9 + 3, 1 * 9 + 0, 1 * 9 + 8], 2 * 9 + np.arange(7),
                                                 [6 * 9 + 4]])), 7, 9)
    return queries, items, seen


def test_exclusion_keys_of_a_batch_with_padding(catalog):
    _, _, seen = catalog
    users = np.array([1, -1, 6])
    keys = exclusion_keys(seen, users, 9, torch.device("cpu"))
    assert keys.tolist() == [0 * 9 + 0, 0 * 9 + 8, 2 * 9 + 4]  # by position in the batch; -1 excludes nothing
    assert exclusion_keys(None, users, 9, torch.device("cpu")) is None


@pytest.mark.parametrize("chunk_elements", [1 << 25, 9, 20])  # one block; one row per block; 2 rows per block
def test_exact_topk_is_brute_force_with_exclusions_in_any_chunking(catalog, monkeypatch, chunk_elements):
    queries, items, seen = catalog
    monkeypatch.setattr(topk_module, "SCORE_CHUNK_ELEMENTS", chunk_elements)
    users = np.arange(7)
    users[5] = -1
    found, scores = exact_topk(items)(queries, exclusion_keys(seen, users, 9, torch.device("cpu")), 4)
    banned = [set(seen.row(u).tolist()) if u >= 0 else set() for u in users]
    expected_items, expected_scores = _brute_force(queries @ items.T, banned, 4)
    assert found.tolist() == expected_items
    assert torch.allclose(scores, torch.tensor(expected_scores))
    assert found[2, 2:].tolist() == [-1, -1]  # an excluded item is never a filler


def test_a_source_pads_a_catalog_smaller_than_k(catalog):
    queries, items, _ = catalog
    found, scores = exact_topk(items)(queries, None, 12)
    assert found.shape == (7, 12) and (found[:, 9:] == -1).all() and torch.isneginf(scores[:, 9:]).all()


def test_popularity_ignores_the_query_and_leaves_the_counts_as_they_were(catalog):
    queries, _, seen = catalog
    counts = torch.tensor([5.0, 1, 7, 3, 3.5, 0, 2, 9, 4])
    users = np.arange(7)
    found, _ = popularity_topk(counts)(queries, exclusion_keys(seen, users, 9, torch.device("cpu")), 3)
    expected, _ = _brute_force(counts.expand(7, -1), [set(seen.row(u).tolist()) for u in users], 3)
    assert found.tolist() == expected
    assert counts.tolist() == [5.0, 1, 7, 3, 3.5, 0, 2, 9, 4]
    scores = torch.tensor([[5.0, 4.0, 3.0]])
    score_topk(scores, torch.tensor([0]), 2)
    assert scores.tolist() == [[5.0, 4.0, 3.0]]  # score_topk masks a copy


class ExactIndex:
    """A stand-in for trec.export.ShardedIndex: exact inner-product search, -1 past the catalog."""

    def __init__(self, items: torch.Tensor) -> None:
        self.items = items.numpy()

    def search(self, queries: np.ndarray, k: int):
        scores = queries @ self.items.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        found = np.take_along_axis(scores, order, axis=1)
        pad = k - order.shape[1]
        return SimpleNamespace(item_indices=np.pad(order, ((0, 0), (0, pad)), constant_values=-1),
                               scores=np.pad(found, ((0, 0), (0, pad)), constant_values=-np.inf))


def test_an_exact_index_source_equals_exact_search(catalog):
    queries, items, seen = catalog
    users = np.arange(7)
    excluded = exclusion_keys(seen, users, 9, torch.device("cpu"))
    exact_items, exact_scores = exact_topk(items)(queries, excluded, 4)
    index_items, index_scores = index_topk(ExactIndex(items), 9)(queries, excluded, 4)
    assert index_items.tolist() == exact_items.tolist()
    assert torch.allclose(index_scores, exact_scores)


def _prepare(tmp_path) -> PreparedDataset:
    """4 users, 6 items, leave-last-1 split."""
    rows = [(u, i, t) for u in range(1, 5) for t, i in enumerate([10 + (u + j) % 6 for j in range(4)])]
    users, items, times = zip(*rows)
    pq.write_table(pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(times),
                             "label": pa.array([1.0] * len(rows), pa.float32())}), tmp_path / "log.parquet")
    run_command([sys.executable, "-m", "trec", "data", "prepare", "parquet", "--source", str(tmp_path / "log.parquet"),
                 "--out", str(tmp_path / "prepared"), "--label-col", "label", "--quiet", "--split", "leave-last-n",
                 "--last-n", "1"], timeout=600)
    return PreparedDataset.open(tmp_path / "prepared")


class TableRetriever:
    """A retriever of fixed vectors: row r of ``users`` / ``items`` for the batch's user_id / item_id."""

    normalized = False

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        self.users, self.items = users, items

    def _lookup(self, batch, feature: str, table: torch.Tensor) -> torch.Tensor:
        ids = batch.sparse_features[feature]
        out = torch.zeros(ids.lengths().numel(), table.shape[1])
        out[ids.lengths() > 0] = table[ids.values()]
        return out

    def encode_users(self, batch, rows=None):
        return self._lookup(batch, "user_id", self.users)

    def encode_items(self, batch):
        return self._lookup(batch, "item_id", self.items)


def test_candidates_and_the_hard_negative_cache(tmp_path, caplog):
    dataset = _prepare(tmp_path)
    generator = torch.Generator().manual_seed(1)
    retriever = TableRetriever(torch.randn(dataset.num_users, 3, generator=generator),
                               torch.randn(dataset.num_items, 3, generator=generator))
    scores = retriever.users @ retriever.items.T
    train = dataset.user_items(["train"])
    banned = [set(train.row(u).tolist()) for u in range(dataset.num_users)]

    # Candidates: the user encoder ranked through exact search, train items excluded.
    generate = retrieve_candidates(retriever.encode_users, exact_topk(retriever.items), train, dataset.num_items)
    users = np.arange(dataset.num_users)
    for selected, batch in user_batches(dataset, users, DataConfig(eval_batch_size=3), CPU):
        found, _ = generate(selected, batch, 3)
        rows = [s for s in selected.tolist() if s >= 0]
        assert found[: len(rows)].tolist() == _brute_force(scores[rows], [banned[u] for u in rows], 3)[0]

    # Mined on a miss (load() called once), with the top 2 after skipping the first 1.
    loads = []

    def loader(path, data):
        assert data is dataset
        return RetrieverRun({"retrieval_run": str(path), "retrieval_checkpoint": "step-1@1"}, DataConfig(),
                            lambda: loads.append(path) or retriever)

    cache = tmp_path / "hard.parquet"
    mined = load_or_mine_hard_candidates(cache, tmp_path / "run", 2, 1, dataset, CPU, loader)
    expected = _brute_force(scores, banned, 3)[0]
    for user in range(dataset.num_users):
        assert mined.row(user).tolist() == [i for i in expected[user][1:] if i >= 0]
    assert len(loads) == 1 and cache.is_file()
    meta = pq.read_schema(cache).metadata
    assert meta[b"retrieval_checkpoint"] == b"step-1@1" and meta[b"top_n"] == b"2" and meta[b"skip"] == b"1"

    # A hit reads the file and never loads the model; other settings mine again.
    again = load_or_mine_hard_candidates(cache, tmp_path / "run", 2, 1, dataset, CPU, loader)
    assert len(loads) == 1 and np.array_equal(again.offsets, mined.offsets) and np.array_equal(again.values, mined.values)
    with caplog.at_level(logging.WARNING, logger="trec"):
        load_or_mine_hard_candidates(cache, tmp_path / "run", 1, 1, dataset, CPU, loader)
    assert len(loads) == 2 and "was mined with other settings" in caplog.text

    cache.write_bytes(b"not parquet")
    with pytest.raises(TrecError, match="not a readable hard-negatives cache"):
        load_or_mine_hard_candidates(cache, tmp_path / "run", 1, 1, dataset, CPU, loader)
