"""The reader: RecBatch/KJT layout, history without the target, 2-rank sharding, epochs and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.prepare import prepare_dataset
from data_pipeline.sources.movielens import MovieLensSource
from trec.config import PrepareConfig
from trec.data import InteractionReader, PreparedDataset, RecBatch, iter_index_batches
from trec.errors import TrecError


@pytest.fixture(scope="module")
def sharded(ml100k, tmp_path_factory) -> Path:
    """ML-100K in 10,000-row shards, so the reader has many blocks to permute and split."""
    out = tmp_path_factory.mktemp("sharded") / "ml"
    options = PrepareConfig(test_fraction=0.25, seed=42, rows_per_shard=10_000)
    prepare_dataset(MovieLensSource(str(ml100k)), out, options)
    return out


@pytest.fixture(scope="module")
def dataset(sharded) -> PreparedDataset:
    return PreparedDataset.open(sharded)


def pairs(batch: RecBatch) -> np.ndarray:
    """(B,) user * 10_000 + item keys of the labelled rows (ML-100K has no repeated pair)."""
    kjt = batch.sparse_features.to_dict()
    count = batch.num_labelled
    return kjt["user_id"].values()[:count].numpy() * 10_000 + kjt["item_id"].values()[:count].numpy()


def epoch_pairs(reader: InteractionReader) -> list[np.ndarray]:
    return [pairs(batch) for batch in reader]


def train_pairs(root: Path) -> np.ndarray:
    table = pq.read_table(root / "train")
    return table["user_id"].to_numpy() * 10_000 + table["item_id"].to_numpy()


# ---- build_batch ----------------------------------------------------------------------------------


def test_batch_layout_with_item_only_rows(dataset):
    users = np.array([0, 1, 2, -1, -1])
    items = np.array([10, 11, 12, 13, 14])
    batch = dataset.build_batch(users, items, labels=np.ones(3), ratings=np.array([4.0, 5.0, 3.0]))
    kjt = batch.sparse_features
    assert isinstance(batch, RecBatch)
    assert kjt.stride() == 5
    assert kjt.keys() == [f.name for f in dataset.sparse_features]
    assert kjt.keys() == ["user_id", "user_age", "user_gender", "user_occupation", "user_zip", "user_history",
                          "item_id", "item_genres"]
    by_key = kjt.to_dict()
    for key in ("user_id", "user_age", "user_gender", "user_occupation", "user_zip", "user_history"):
        assert by_key[key].lengths()[3:].tolist() == [0, 0], key
    assert by_key["user_id"].lengths().tolist() == [1, 1, 1, 0, 0]
    assert by_key["item_id"].lengths().tolist() == [1, 1, 1, 1, 1]
    assert by_key["item_id"].values().tolist() == [10, 11, 12, 13, 14]
    assert batch.dense_features.shape == (5, 1) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (3,) and batch.ratings.tolist() == [4.0, 5.0, 3.0]
    assert kjt.values().dtype == torch.int64
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, RecBatch) and torch.equal(moved.ratings, batch.ratings)


def test_item_only_rows_have_zero_dense_and_rows_without_items_are_empty(dataset):
    batch = dataset.build_batch(np.array([3, 4]), np.array([-1, 7]), labels=np.ones(2))
    by_key = batch.sparse_features.to_dict()
    assert by_key["item_id"].lengths().tolist() == [0, 1]
    assert by_key["item_genres"].lengths()[0] == 0
    assert batch.dense_features[0].tolist() == [0.0]
    year = dataset.dense_features[0]
    items = pq.read_table(dataset.path / "features" / "items.parquet")
    raw_year = items["item_year"][7].as_py()
    assert batch.dense_features[1, 0].item() == pytest.approx((raw_year - year.mean) / year.std, rel=1e-5)


def test_history_excludes_the_target_and_keeps_the_most_recent(dataset):
    history = pq.read_table(dataset.path / "features" / "user_history.parquet")["history"]
    user = 0
    full = history[user].as_py()
    target, older = full[-1], full[:-1]
    batch = dataset.build_batch(np.array([user, user]), np.array([target, -1]), labels=np.ones(2),
                                history_exclude=np.array([target, -1]), history_max_len=10)
    hist = batch.sparse_features.to_dict()["user_history"]
    lengths = hist.lengths().tolist()
    values = hist.values().tolist()
    assert lengths == [10, 10]
    assert values[:10] == older[-10:]  # target removed, the ten before it, oldest first
    assert values[10:] == full[-10:]  # a row without an item (-1) has nothing to exclude
    plain = dataset.build_batch(np.array([user]), np.array([target]), labels=np.ones(1), history_max_len=10)
    assert plain.sparse_features.to_dict()["user_history"].values().tolist() == full[-10:]


def test_reader_batches_never_contain_their_target_in_history(dataset):
    reader = InteractionReader(dataset, "train", 512, seed=1, history_max_len=50)
    batch = next(iter(reader))
    kjt = batch.sparse_features.to_dict()
    items = kjt["item_id"].values().numpy()
    lengths = kjt["user_history"].lengths().numpy()
    rows = np.repeat(np.arange(len(lengths)), lengths)
    assert not (kjt["user_history"].values().numpy() == items[rows]).any()
    assert lengths.max() == 50


def test_sampled_ranking_rows_read_their_positives_history(dataset):
    """A ranker's sampled negative reads the same history as the positive it was drawn for (the positive's
    item left out): otherwise the one item missing from positives' histories tells them apart."""
    from trec.negatives import RankingNegativeSampler

    k = 3
    sampler = RankingNegativeSampler(dataset.user_items(["train"]), dataset.num_items, k)
    batch = next(iter(InteractionReader(dataset, "train", 256, seed=4, history_max_len=30, augment=sampler)))
    history = batch.sparse_features.to_dict()["user_history"]
    offsets = np.concatenate([[0], np.cumsum(history.lengths().numpy())])
    values = history.values().numpy()
    rows = [values[offsets[r]:offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
    labels = batch.labels.numpy()
    positives = np.flatnonzero(labels[:256] == 1)
    assert len(positives) > 50
    for row in positives:
        for j in range(k):
            assert rows[256 + row * k + j] == rows[row]
    items = batch.sparse_features.to_dict()["item_id"].values().numpy()
    assert not any(items[row] in rows[row] for row in positives)


def test_context_features_and_empty_dense(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"user_id": [1, 1, 2, 2], "item_id": [3, 4, 3, 5], "timestamp": [1, 2, 3, 4],
                             "device": ["a", "b", "a", "b"]}), tmp_path / "e.parquet")
    options = PrepareConfig(test_fraction=0.0)
    options.columns.context_features = ["device"]
    from data_pipeline.sources.tabular import TabularSource

    prepare_dataset(TabularSource("parquet", str(tmp_path / "e.parquet"), options.columns), tmp_path / "out", options)
    ds = PreparedDataset.open(tmp_path / "out")
    batch = ds.build_batch(np.array([0, 1, -1]), np.array([0, 1, 2]), np.ones(2), context={"context_device": [0, 1]})
    assert batch.dense_features.shape == (3, 0)
    assert batch.sparse_features.to_dict()["context_device"].lengths().tolist() == [1, 1, 0]


# ---- sharding, epochs, resume -------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_are_disjoint_equal_and_cover_the_split(dataset, sharded, drop_last):
    readers = [InteractionReader(dataset, "train", 1000, rank=r, world_size=2, seed=5, drop_last=drop_last,
                                 window_rows=7000) for r in (0, 1)]
    assert len(readers[0]) == len(readers[1]) == (37 if drop_last else 38)
    batches = [epoch_pairs(reader) for reader in readers]
    assert [len(b) for b in batches] == [len(readers[0])] * 2
    if drop_last:
        assert all(len(b) == 1000 for rank in batches for b in rank)
    seen = [np.concatenate(rank) for rank in batches]
    assert not set(seen[0]) & set(seen[1])
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)
    expected = 74_000 if drop_last else 74_992  # 74,992 train rows: 37,496 per rank
    assert len(everything) == expected
    assert set(everything) <= set(train_pairs(sharded))


def test_epochs_reshuffle_the_same_rows(dataset):
    reader = InteractionReader(dataset, "train", 2048, seed=9)
    first = np.concatenate(epoch_pairs(reader))
    assert reader.state_dict() == {"epoch": 1, "batch": 0}
    second = np.concatenate(epoch_pairs(reader))
    assert not np.array_equal(first, second)
    assert len(np.intersect1d(first, second)) > 0.95 * len(first)  # drop_last leaves out a different few
    reader.set_epoch(0)
    assert np.array_equal(np.concatenate(epoch_pairs(reader)), first)  # same seed, same epoch → same order


def test_shuffle_off_reads_in_file_order(dataset, sharded):
    reader = InteractionReader(dataset, "train", 1000, shuffle=False)
    assert np.array_equal(np.concatenate(epoch_pairs(reader)), train_pairs(sharded)[:74_000])


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(dataset):
    def negatives(users, items, labels, ratings, rng):  # augmented rows must replay identically too
        extra = rng.integers(0, dataset.num_items, 16)
        return np.r_[users, np.full(16, -1)], np.r_[items, extra], labels, ratings

    def make():
        return InteractionReader(dataset, "train", 1000, rank=1, world_size=2, seed=3, augment=negatives,
                                 window_rows=7000)

    reference = make()
    reference.set_epoch(2)
    full = [b.sparse_features.to_dict()["item_id"].values().numpy() for b in reference]
    interrupted = make()
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    for _ in range(11):
        next(iterator)
    state = interrupted.state_dict()
    iterator.close()
    assert state == {"epoch": 2, "batch": 11}
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(2)  # the training loop calls this for the epoch it resumes: position kept
    rest = [b.sparse_features.to_dict()["item_id"].values().numpy() for b in resumed]
    assert len(rest) == len(full) - 11
    for got, want in zip(rest, full[11:]):
        assert np.array_equal(got, want)
    assert resumed.state_dict() == {"epoch": 3, "batch": 0}


def test_resume_after_the_last_batch_moves_to_the_next_epoch(dataset):
    reader = InteractionReader(dataset, "train", 4096, seed=2)
    reader.load_state_dict({"epoch": 4, "batch": len(reader)})
    assert list(reader) == []
    assert reader.state_dict() == {"epoch": 5, "batch": 0}
    with pytest.raises(TrecError, match="batch outside"):
        reader.load_state_dict({"epoch": 0, "batch": len(reader) + 1})


def test_prefetch_thread_reports_errors_and_stops_on_break(dataset):
    def broken(users, items, labels, ratings, rng):
        raise RuntimeError("augment failed")

    reader = InteractionReader(dataset, "train", 1000, augment=broken)
    with pytest.raises(RuntimeError, match="augment failed"):
        next(iter(reader))
    reader = InteractionReader(dataset, "train", 1000)
    for index, _ in enumerate(reader):
        if index == 2:
            break
    assert reader.state_dict() == {"epoch": 0, "batch": 3}


def test_too_small_split_is_an_error(dataset):
    with pytest.raises(TrecError, match="split 'train' has 74992 rows: too few for batch_size 40000 on 2 rank"):
        InteractionReader(dataset, "train", 40_000, rank=0, world_size=2)
    with pytest.raises(TrecError, match="no 'val' split"):
        InteractionReader(dataset, "val", 10)


# ---- index batches, dataset helpers ---------------------------------------------------------------


def test_iter_index_batches_pads_ranks_to_equal_counts():
    ranks = [list(iter_index_batches(10, 3, rank, 2)) for rank in (0, 1)]
    assert [b.tolist() for b in ranks[0]] == [[0, 1, 2], [3, 4, -1]]
    assert [b.tolist() for b in ranks[1]] == [[5, 6, 7], [8, 9, -1]]
    four = [list(iter_index_batches(7, 3, rank, 4)) for rank in range(4)]
    assert {len(b) for b in four} == {1}
    got = np.concatenate([b for rank in four for b in rank])
    assert sorted(got[got >= 0].tolist()) == list(range(7))
    assert list(iter_index_batches(0, 4, 0, 2)) == []


def test_user_items_csr(dataset, sharded):
    seen = dataset.user_items(["train"])
    assert seen.offsets.shape == (944,) and seen.offsets[-1] == 74_992 and seen.num_rows == 943
    table = pq.read_table(sharded / "train")
    mine = np.sort(table["item_id"].to_numpy()[table["user_id"].to_numpy() == 5])
    assert seen.row(5).tolist() == mine.tolist()
    assert dataset.user_items(["train", "test"]).offsets[-1] == 100_000


def test_open_validates_the_manifest(sharded, tmp_path):
    with pytest.raises(TrecError, match="not a prepared dataset"):
        PreparedDataset.open(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(TrecError, match="format_version 99 is not supported"):
        PreparedDataset.open(copy)
    (copy / "manifest.json").write_text("{broken")
    with pytest.raises(TrecError, match=r"manifest.json: invalid JSON \(line 1"):
        PreparedDataset.open(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with (copy / "train" / "part-00000.parquet").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\0\0\0\0")
    PreparedDataset.open(copy)  # checksums are only read with verify=True (fast open)
    with pytest.raises(TrecError, match=r"part-00000.parquet: checksum mismatch"):
        PreparedDataset.open(copy, verify=True)


def test_lookup_and_raw_ids(dataset):
    index = dataset.lookup_index("item_id", "50")
    assert dataset.raw_ids("item_id")[index] == 50
    assert dataset.lookup_index("user_history", 50) == index  # history shares item_id's vocabulary
    with pytest.raises(TrecError, match=r"item_id: unknown raw ID 99999 \(not in mappings/item_id.parquet\)"):
        dataset.lookup_index("item_id", 99999)
    with pytest.raises(TrecError, match="has no ID mapping"):
        dataset.raw_ids("item_year")
    assert dataset.num_rows("train") == 74_992 and not dataset.has_split("val")
    assert [f.name for f in dataset.features_of("item")] == ["item_id", "item_genres", "item_year"]


@pytest.mark.parametrize("max_len", [0, 1, 3, 8])
def test_history_window_matches_a_plain_python_reference(max_len):
    from trec.data import Csr

    rng = np.random.default_rng(max_len)
    lengths = rng.integers(0, 12, 40)
    offsets = np.r_[0, np.cumsum(lengths)]
    values = rng.integers(0, 6, offsets[-1])  # few distinct items: repeats and hits are common
    csr = Csr(offsets, values)
    index = rng.integers(-1, 40, 200)
    exclude = rng.integers(-1, 6, 200)
    for excluding in (False, True):
        got_lengths, got_values = csr.last(index, max_len, exclude if excluding else None)
        expected = []
        for row, target in zip(index, exclude):
            history = [] if row < 0 else values[offsets[row] : offsets[row + 1]].tolist()
            if excluding:
                history = [v for v in history[len(history) - min(len(history), max_len + 1):] if v != target]
            expected.append(history[len(history) - min(len(history), max_len):])
        assert got_lengths.tolist() == [len(h) for h in expected]
        assert got_values.tolist() == [v for h in expected for v in h]
