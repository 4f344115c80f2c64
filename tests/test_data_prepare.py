"""`trec data prepare`: MovieLens counts, splits, ID mapping, side features, generic and synthetic sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.mapping import stable_hash
from data_pipeline.prepare import prepare_dataset
from data_pipeline.sources import build_source
from trec.config import PrepareConfig
from trec.data import PreparedDataset
from trec.errors import TrecError
from trec.io import sha256_file


def prepare(kind: str, source, out: Path, **options) -> dict:
    columns = options.pop("columns", {})
    synthetic = options.pop("synthetic", {})
    config = PrepareConfig(**options)
    for key, value in columns.items():
        setattr(config.columns, key, value)
    for key, value in synthetic.items():
        setattr(config.synthetic, key, value)
    return prepare_dataset(build_source(kind, None if source is None else str(source), config), out, config)


def split_table(root: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((root / split).glob("*.parquet")))


def u_data(ml100k: Path) -> np.ndarray:
    """(100000 X 4) user, item, rating, timestamp of the raw file."""
    return np.loadtxt(ml100k / "u.data", dtype=np.int64)


@pytest.fixture(scope="module")
def ml_plain(ml100k, tmp_path_factory) -> Path:
    """ML-100K, stratified 0.25, seed 42, no val: the protocol of the benchmark results."""
    out = tmp_path_factory.mktemp("plain") / "ml"
    prepare("movielens", ml100k, out, test_fraction=0.25, seed=42)
    return out


# ---- MovieLens 100K ---------------------------------------------------------------------------


def test_cli_prepares_ml100k_with_the_benchmark_protocol(run_trec, ml100k, tmp_path):
    out = tmp_path / "ml"
    proc = run_trec("data", "prepare", "movielens", "--source", ml100k, "--out", out,
                    "--split", "stratified", "--test-fraction", "0.25", "--seed", "42")
    assert "943 users, 1682 items, 100000 interactions" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (943, 1682, 100000)
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 100000
    assert "val" not in manifest["counts"] and not (out / "val").exists()
    assert manifest["source"]["layout"] == "ml-100k" and manifest["format_version"] == 1
    assert manifest["split"] == {"kind": "stratified", "seed": 42, "test_fraction": 0.25, "val_fraction": 0.0}
    assert [f["name"] for f in manifest["features"]] == [
        "user_id", "user_age", "user_gender", "user_occupation", "user_zip", "user_history",
        "item_id", "item_genres", "item_year",
    ]
    for relative, entry in manifest["files"].items():
        path = out / relative
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert entry["rows"] == pq.ParquetFile(path).metadata.num_rows
    assert sorted(p.name for p in out.iterdir()) == ["features", "manifest.json", "mappings", "test", "train"]


def test_stratified_split_is_per_user_exact(ml_plain, ml100k):
    raw = u_data(ml100k)
    dataset = PreparedDataset.open(ml_plain)
    users = dataset.raw_ids("user_id")
    train, test = split_table(ml_plain, "train"), split_table(ml_plain, "test")
    n_train = np.bincount(train["user_id"].to_numpy(), minlength=943)
    n_test = np.bincount(test["user_id"].to_numpy(), minlength=943)
    n_raw = np.bincount(raw[:, 0], minlength=944)[users]
    assert (n_train + n_test == n_raw).all()
    # python_stratified_split(ratio=0.75): each user's train part is round(0.75 n).
    assert (n_train == np.round(0.75 * n_raw)).all()
    assert (n_train >= 1).all() and (n_test >= 1).all()


def test_round_trip_raw_pairs(ml_plain, ml100k):
    """raw u.data → prepared shards → raw IDs again: exactly the 100000 (user, item, rating) rows."""
    dataset = PreparedDataset.open(ml_plain)
    users, items = dataset.raw_ids("user_id"), dataset.raw_ids("item_id")
    table = pa.concat_tables([split_table(ml_plain, "train"), split_table(ml_plain, "test")])
    got = np.stack([users[table["user_id"].to_numpy()], items[table["item_id"].to_numpy()],
                    table["rating"].to_numpy().astype(np.int64), table["timestamp"].to_numpy()], axis=1)
    raw = u_data(ml100k)
    assert sorted(map(tuple, got)) == sorted(map(tuple, raw))
    assert set(table["label"].to_numpy()) == {1.0}


def test_split_is_reproducible_and_depends_on_the_seed(ml100k, tmp_path, ml_plain):
    again = prepare("movielens", ml100k, tmp_path / "again", test_fraction=0.25, seed=42)
    first = json.loads((ml_plain / "manifest.json").read_text())
    assert again["files"] == first["files"]
    other = prepare("movielens", ml100k, tmp_path / "other", test_fraction=0.25, seed=7)
    assert other["files"]["train/part-00000.parquet"]["sha256"] != first["files"]["train/part-00000.parquet"]["sha256"]
    assert other["counts"] == first["counts"]  # same per-user quotas, different rows


def test_val_is_carved_from_train_per_user(ml100k_prepared):
    manifest = json.loads((ml100k_prepared / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 100000 and manifest["counts"]["val"] > 0
    n = {s: np.bincount(split_table(ml100k_prepared, s)["user_id"].to_numpy(), minlength=943)
         for s in ("train", "val", "test")}
    total = n["train"] + n["val"] + n["test"]
    assert (n["test"] == total - np.round(0.75 * total)).all()
    train_part = total - n["test"]
    assert (n["val"] == np.round(train_part * 0.1)).all()
    assert (n["train"] >= 1).all()


def test_temporal_split_is_one_time_cut(ml100k, tmp_path):
    manifest = prepare("movielens", ml100k, tmp_path / "t", split="temporal", test_fraction=0.2)
    train, test = split_table(tmp_path / "t", "train"), split_table(tmp_path / "t", "test")
    cut = manifest["split"]["cut_timestamp"]
    assert train["timestamp"].to_numpy().max() < cut <= test["timestamp"].to_numpy().min()
    assert abs(test.num_rows / 100000 - 0.2) < 0.01


def test_leave_last_n_holds_out_each_users_latest(ml100k, tmp_path):
    prepare("movielens", ml100k, tmp_path / "l", split="leave-last-n", last_n=2)
    train, test = split_table(tmp_path / "l", "train"), split_table(tmp_path / "l", "test")
    assert (np.bincount(test["user_id"].to_numpy(), minlength=943) == 2).all()
    latest_train = np.full(943, -1)
    np.maximum.at(latest_train, train["user_id"].to_numpy(), train["timestamp"].to_numpy())
    earliest_test = np.full(943, np.iinfo(np.int64).max)
    np.minimum.at(earliest_test, test["user_id"].to_numpy(), test["timestamp"].to_numpy())
    assert (latest_train <= earliest_test).all()


def test_vocab_is_by_descending_frequency_with_oov(ml_plain, ml100k):
    mapping = pq.read_table(ml_plain / "mappings" / "item_id.parquet")
    counts, raw = mapping["count"].to_numpy(), mapping["raw"].to_numpy()
    assert (mapping["index"].to_numpy() == np.arange(1682)).all()
    assert (np.diff(counts) <= 0).all()
    ties = np.flatnonzero(np.diff(counts) == 0)
    assert (raw[ties] < raw[ties + 1]).all()  # equal counts: ascending raw ID
    expected = np.bincount(u_data(ml100k)[:, 1])[raw]
    assert (counts == expected).all()
    spec = next(f for f in json.loads((ml_plain / "manifest.json").read_text())["features"] if f["name"] == "item_id")
    assert (spec["cardinality"], spec["oov_index"], spec["mapping"]) == (1683, 1682, "vocab")


def test_min_count_drops_rare_users_and_items(ml100k, tmp_path):
    raw = u_data(ml100k)
    manifest = prepare("movielens", ml100k, tmp_path / "m", min_count=20)
    user_ok = np.bincount(raw[:, 0])[raw[:, 0]] >= 20
    item_ok = np.bincount(raw[:, 1])[raw[:, 1]] >= 20
    assert manifest["num_interactions"] == int((user_ok & item_ok).sum())
    assert manifest["dropped"]["min_count"] == 100000 - manifest["num_interactions"]
    assert manifest["num_items"] == len(np.unique(raw[item_ok, 1]))


def test_hash_mapping(ml100k, tmp_path):
    out = tmp_path / "h"
    manifest = prepare("movielens", ml100k, out, id_mapping="hash", hash_buckets=4096)
    assert manifest["num_items"] == 4096 and manifest["num_users"] == 4096
    spec = next(f for f in manifest["features"] if f["name"] == "item_id")
    assert (spec["cardinality"], spec["mapping"], spec["oov_index"]) == (4096, "hash", None)
    mapping = pq.read_table(out / "mappings" / "item_id.parquet")
    assert mapping.num_rows == 1682
    expected = stable_hash(mapping["raw"].combine_chunks()) % np.uint64(4096)
    assert (mapping["index"].to_numpy() == expected.astype(np.int64)).all()
    assert pq.read_table(out / "features" / "items.parquet").num_rows == 4096
    dataset = PreparedDataset.open(out)
    assert dataset.lookup_index("item_id", 50) == int(stable_hash(pa.array([50]))[0] % np.uint64(4096))
    with pytest.raises(TrecError, match="hash-mapped"):
        dataset.raw_ids("item_id")


def test_stable_hash_is_fixed():
    # Values pinned: a change here would silently remap every hashed dataset.
    assert stable_hash(pa.array([0, 1, -1])).tolist() == [
        16294208416658607535, 10451216379200822465, 16490336266968443936]
    assert stable_hash(pa.array(["", "a", "user-42"])).tolist()[:2] == [14087677454934409008, 6857225946766476583]


def test_movielens_side_features(ml_plain):
    dataset = PreparedDataset.open(ml_plain)
    users = pq.read_table(ml_plain / "features" / "users.parquet")
    assert users["user_id"].to_pylist() == list(range(943))
    index = dataset.lookup_index("user_id", 1)  # u.user line 1: 1|24|M|technician|85711
    row = {name: users[name][index].as_py() for name in users.column_names}
    assert dataset.raw_ids("user_age")[row["user_age"]] == 18
    assert dataset.raw_ids("user_gender")[row["user_gender"]] == "M"
    assert dataset.raw_ids("user_occupation")[row["user_occupation"]] == "technician"
    assert dataset.raw_ids("user_zip")[row["user_zip"]] == "857"
    items = pq.read_table(ml_plain / "features" / "items.parquet")
    toy = dataset.lookup_index("item_id", 1)
    genres = dataset.raw_ids("item_genres")
    assert sorted(genres[items["item_genres"][toy].as_py()]) == ["Animation", "Children's", "Comedy"]
    assert items["item_year"][toy].as_py() == 1995.0
    assert dataset.item_titles()[toy] == "Toy Story (1995)"
    train = split_table(ml_plain, "train")
    assert (items["train_count"].to_numpy() == np.bincount(train["item_id"].to_numpy(), minlength=1682)).all()
    assert (dataset.item_counts == items["train_count"].to_numpy()).all()


def test_history_is_recent_train_items_oldest_first(ml100k, tmp_path):
    out = tmp_path / "hist"
    prepare("movielens", ml100k, out, history_max_len=30)
    history = pq.read_table(out / "features" / "user_history.parquet")
    train = split_table(out, "train")
    users, items, times = (train[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    for user in (0, 5, 500, 942):
        mine = np.flatnonzero(users == user)
        ordered = items[mine[np.argsort(times[mine], kind="stable")]]
        assert history["history"][user].as_py() == ordered[-30:].tolist()
    assert max(len(h) for h in history["history"].to_pylist()) == 30
    manifest = prepare("movielens", ml100k, tmp_path / "nohist", history_max_len=0)
    assert "user_history" not in [f["name"] for f in manifest["features"]]
    assert not (tmp_path / "nohist" / "features" / "user_history.parquet").exists()


# ---- other MovieLens layouts --------------------------------------------------------------------


def test_ml1m_layout(tmp_path):
    src = tmp_path / "ml-1m"
    src.mkdir()
    (src / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (src / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    (src / "movies.dat").write_bytes(
        "10::Star Wars: Episode IV (1977)::Action|Sci-Fi\n20::Misérables, Les (1995)::Drama\n".encode("latin-1"))
    manifest = prepare("movielens", src, tmp_path / "out", test_fraction=0.5)
    assert manifest["source"]["layout"] == "ml-1m"
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (2, 2, 3)
    dataset = PreparedDataset.open(tmp_path / "out")
    assert sorted(dataset.item_titles()) == ["Misérables, Les (1995)", "Star Wars: Episode IV (1977)"]
    assert sorted(dataset.raw_ids("user_occupation").tolist()) == [10, 16]
    assert sorted(dataset.raw_ids("user_zip").tolist()) == ["480", "700"]
    assert sorted(dataset.raw_ids("item_genres").tolist()) == ["Action", "Drama", "Sci-Fi"]


def test_ml_csv_layout(tmp_path):
    src = tmp_path / "ml-latest-small"
    src.mkdir()
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
                                     "2,1,0.5,964982224\n")
    (src / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                                    '3,"American President, The (1995)",(no genres listed)\n')
    (src / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
    manifest = prepare("movielens", src, tmp_path / "out", test_fraction=0.5)
    assert manifest["source"]["layout"] == "ml-csv"
    assert [f["name"] for f in manifest["features"]] == ["user_id", "user_history", "item_id", "item_genres",
                                                          "item_year"]
    dataset = PreparedDataset.open(tmp_path / "out")
    items = pq.read_table(tmp_path / "out" / "features" / "items.parquet")
    president = dataset.lookup_index("item_id", 3)
    assert dataset.item_titles()[president] == "American President, The (1995)"
    assert items["item_genres"][president].as_py() == []
    ratings = pa.concat_tables([split_table(tmp_path / "out", s) for s in ("train", "test")])["rating"]
    assert sorted(ratings.to_pylist()) == [0.5, 4.0, 4.5]


# ---- generic sources ----------------------------------------------------------------------------


def _events() -> pa.Table:
    return pa.table({
        "uid": ["u1", "u1", "u2", "u3", "u2", "u1", "u3", "u2"],
        "sku": [10, 11, 10, 12, 11, 12, 10, 12],
        "ts": pa.array([5, 6, 7, 8, 9, 10, 11, 12], pa.int64()),
        "clicked": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        "country": ["de", "de", "fr", None, "fr", "de", "it", "fr"],
        "brand": ["a", "b", "a", "c", "b", "c", "a", "c"],
        "tags": [["x", "y"], ["y"], ["x", "y"], [], ["y"], ["z"], ["x"], ["z"]],
        "price": [1.0, 2.0, 1.0, None, 2.0, 3.0, 1.0, 3.0],
        "device": ["ios", "web", "ios", "web", "ios", "web", "android", "web"],
    })


def test_parquet_source_with_side_and_context_features(tmp_path):
    src = tmp_path / "logs"
    src.mkdir()
    table = _events()
    pq.write_table(table.slice(0, 5), src / "day1.parquet")
    pq.write_table(table.slice(5), src / "day2.parquet")
    out = tmp_path / "out"
    manifest = prepare("parquet", src, out, test_fraction=0.34, columns=dict(
        user="uid", item="sku", time="ts", label="clicked", user_features=["country"], item_features=["brand"],
        item_multi_hot_features=["tags"], item_numeric_features=["price"], context_features=["device"]))
    assert [(f["name"], f["entity"], f["kind"], f["multi_hot"]) for f in manifest["features"]] == [
        ("user_id", "user", "categorical", False), ("user_country", "user", "categorical", False),
        ("user_history", "user", "categorical", True), ("item_id", "item", "categorical", False),
        ("item_brand", "item", "categorical", False), ("item_tags", "item", "categorical", True),
        ("item_price", "item", "numeric", False), ("context_device", "context", "categorical", False),
    ]
    assert manifest["num_interactions"] == 8 and manifest["has_label"]
    dataset = PreparedDataset.open(out)
    assert dataset.raw_ids("user_id").tolist() == ["u1", "u2", "u3"]  # count 3, 3, 2 → ties by raw
    price = next(f for f in manifest["features"] if f["name"] == "item_price")
    assert price["mean"] == pytest.approx(2.0) and price["missing"] == 0
    # u3's last row has country 'it': the last value in source order wins.
    users = pq.read_table(out / "features" / "users.parquet")
    assert dataset.raw_ids("user_country")[users["user_country"][dataset.lookup_index("user_id", "u3")].as_py()] == "it"
    shards = pa.concat_tables([split_table(out, s) for s in ("train", "test")])
    assert shards.column_names == ["user_id", "item_id", "timestamp", "label", "context_device"]
    assert sorted(shards["label"].to_pylist()) == sorted(table["clicked"].to_pylist())


def test_round_trip_through_reader_batches(tmp_path):
    """raw log → prepared → RecBatch (KJT) → raw IDs: every (user, item, label) comes back."""
    src = tmp_path / "events.parquet"
    table = _events()
    pq.write_table(table, src)
    out = tmp_path / "out"
    prepare("parquet", src, out, test_fraction=0.0, columns=dict(
        user="uid", item="sku", time="ts", label="clicked", item_multi_hot_features=["tags"],
        context_features=["device"]))
    dataset = PreparedDataset.open(out)
    from trec.data import InteractionReader

    reader = InteractionReader(dataset, "train", batch_size=8, shuffle=False, prefetch_batches=0)
    (batch,) = list(reader)
    kjt = batch.sparse_features.to_dict()
    users = dataset.raw_ids("user_id")[kjt["user_id"].values().numpy()]
    items = dataset.raw_ids("item_id")[kjt["item_id"].values().numpy()]
    devices = dataset.raw_ids("context_device")[kjt["context_device"].values().numpy()]
    got = sorted(zip(users.tolist(), items.tolist(), batch.labels.tolist(), devices.tolist()))
    want = sorted(zip(table["uid"].to_pylist(), table["sku"].to_pylist(), table["clicked"].to_pylist(),
                      table["device"].to_pylist()))
    assert got == want
    tags = dataset.raw_ids("item_tags")
    for row, item in enumerate(items):
        lengths = kjt["item_tags"].lengths().numpy()
        start = lengths[:row].sum()
        bag = tags[kjt["item_tags"].values().numpy()[start : start + lengths[row]]]
        first = table["tags"][table["sku"].to_pylist().index(item)].as_py()
        last = table["tags"][len(table) - 1 - table["sku"].to_pylist()[::-1].index(item)].as_py()
        assert sorted(bag.tolist()) == sorted(last) or sorted(bag.tolist()) == sorted(first)


def test_csv_source_iso_times_and_separated_multi_hot(tmp_path):
    (tmp_path / "events.csv").write_text(
        "user,item,when,genres,stars\n"
        "a,x,2024-01-01T00:00:00,drama|comedy,4\n"
        "b,x,2024-01-02T00:00:00,drama|comedy,5\n"
        "a,y,2024-01-03T00:00:00,,3.5\n"
    )
    out = tmp_path / "out"
    manifest = prepare("csv", tmp_path / "events.csv", out, test_fraction=0.0, columns=dict(
        user="user", item="item", time="when", rating="stars", item_multi_hot_features=["genres"]))
    assert manifest["num_interactions"] == 3 and manifest["has_rating"]
    train = split_table(out, "train")
    assert sorted(train["timestamp"].to_pylist()) == [1704067200, 1704153600, 1704240000]
    dataset = PreparedDataset.open(out)
    items = pq.read_table(out / "features" / "items.parquet")
    genres = dataset.raw_ids("item_genres")
    assert sorted(genres[items["item_genres"][dataset.lookup_index("item_id", "x")].as_py()]) == ["comedy", "drama"]
    assert items["item_genres"][dataset.lookup_index("item_id", "y")].as_py() == []


def test_duplicates_keep_or_drop_first(tmp_path):
    pq.write_table(pa.table({"user_id": [1, 1, 2, 1, 2], "item_id": [5, 5, 5, 6, 5],
                             "timestamp": [1, 2, 3, 4, 5]}), tmp_path / "d.parquet")
    kept = prepare("parquet", tmp_path / "d.parquet", tmp_path / "keep", test_fraction=0.0)
    assert kept["num_interactions"] == 5 and kept["duplicates"] == "keep"
    dropped = prepare("parquet", tmp_path / "d.parquet", tmp_path / "drop", test_fraction=0.0, duplicates="drop")
    assert dropped["num_interactions"] == 3 and dropped["dropped"]["duplicates"] == 2
    train = split_table(tmp_path / "drop", "train")
    assert sorted(train["timestamp"].to_pylist()) == [1, 3, 4]  # first occurrence of each pair


def test_cli_takes_columns_from_the_config(run_trec, tmp_path):
    pq.write_table(_events(), tmp_path / "events.parquet")
    config = tmp_path / "prep.yaml"
    config.write_text("data:\n  prepare:\n    test_fraction: 0.0\n    columns:\n      user: uid\n      item: sku\n"
                      "      time: ts\n      item_features: [brand]\n")
    run_trec("data", "prepare", "parquet", "--source", tmp_path / "events.parquet", "--out", tmp_path / "out",
             "--config", config, "--context-features", "device", "--quiet")
    names = [f["name"] for f in json.loads((tmp_path / "out" / "manifest.json").read_text())["features"]]
    assert names == ["user_id", "user_history", "item_id", "item_brand", "context_device"]
    info = run_trec("data", "info", tmp_path / "out", "--verify").stdout
    assert "checksums: " in info and "context_device" in info


# ---- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_seeded_power_law_with_topic_structure(tmp_path):
    options = dict(synthetic=dict(users=300, items=200, interactions=20000, side_features=4, topics=8), seed=3,
                   rows_per_shard=4000)
    manifest = prepare("synthetic", None, tmp_path / "a", **options)
    again = prepare("synthetic", None, tmp_path / "b", **options)
    assert manifest["files"] == again["files"]
    assert manifest["num_interactions"] == 20000
    assert len([p for p in manifest["files"] if p.startswith("train/")]) == 4  # 15000 rows in 4000-row shards
    assert [f["name"] for f in manifest["features"]] == [
        "user_id", "user_cat_0", "user_history", "item_id", "item_cat_1", "item_tags_2", "item_num_3"]
    dataset = PreparedDataset.open(tmp_path / "a")
    counts = np.sort(np.bincount(split_table(tmp_path / "a", "train")["item_id"].to_numpy()))[::-1]
    assert counts[:20].sum() > 0.3 * counts.sum()  # the top 10% of items: popularity is heavy-tailed
    # Latent structure: a user's items concentrate on few item_cat values (the topic), unlike random items.
    items = pq.read_table(tmp_path / "a" / "features" / "items.parquet")["item_cat_1"].to_numpy()
    train = split_table(tmp_path / "a", "train")
    users, cats = train["user_id"].to_numpy(), items[train["item_id"].to_numpy()]
    heavy = np.argsort(np.bincount(users))[-20:]
    share = np.mean([np.bincount(cats[users == u]).max() / (users == u).sum() for u in heavy])
    assert share > 0.3
    assert dataset.dense_features[0].name == "item_num_3"
