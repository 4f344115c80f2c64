"""Managed-collision IDs (--id-mapping managed): the prepare, the replicated remapper (new IDs claim
rows, eviction when full, identical replicas on 2 ranks), and a 2-rank two-tower run end to end:
checkpoint/resume restores the remapper exactly, export lists raw item IDs, search by raw user ID."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

import trec
from training import CONFIG, model_weights, run_command, torchrun_command

from trec.config import Eviction, ManagedCollisionConfig, PrepareConfig, SyntheticConfig
from trec.errors import TrecError

MCH = "model.managed_ids.mch."


def _remapper(rows: int, eviction: Eviction):
    from trec.models.managed import ManagedIds

    remapper = ManagedIds({"item_id": rows}, {"item_id": ("item_id", True)}, ManagedCollisionConfig(eviction))
    return remapper.train()


def _step(remapper, *ids: int) -> list[int]:
    """One training step over ``ids``: their rows after the remapper has seen them."""
    values = torch.tensor(ids, dtype=torch.int64)
    out = remapper(KeyedJaggedTensor(keys=["item_id"], values=values, lengths=torch.ones(len(ids), dtype=torch.int32)))
    return out.values().tolist()


def _rows(remapper, *ids: int) -> list[int]:
    return remapper.rows("item_id", torch.tensor(ids, dtype=torch.int64)).tolist()


@pytest.mark.parametrize("eviction", [Eviction.lru, Eviction.lfu])
def test_new_ids_claim_rows_and_a_full_table_evicts(eviction):
    big = 10**11  # raw-ID hashes live in [0, 2**40): far beyond any table
    remapper = _remapper(4, eviction)  # 3 usable rows: torchrec keeps the last one for IDs without a row
    first = _step(remapper, big + 1, big + 2, big + 3)
    assert sorted(first) == sorted(set(first)) and all(0 <= row < 3 for row in first)
    assert _step(remapper, big + 2, big + 3, big + 2, big + 3) == first[1:] * 2  # residents keep their rows
    # Full: a new ID seen 3 times beats big+1 (least recent, and least frequent: once), and takes its row.
    assert _step(remapper, big + 4, big + 4, big + 4) == [first[0]] * 3
    remapper.eval()
    assert _rows(remapper, big + 1, big + 2, big + 3, big + 4) == [3, first[1], first[2], first[0]]


def test_lfu_keeps_frequent_ids_against_a_one_off_newcomer():
    remapper = _remapper(3, Eviction.lfu)
    rows = _step(remapper, 5, 6, 6)
    assert _step(remapper, 7) == [2]  # seen once, as rarely as 5: the resident wins the tie, 7 gets the shared row
    remapper.eval()
    assert _rows(remapper, 5, 6, 7) == [rows[0], rows[1], 2]


def test_only_the_labelled_rows_claim_rows():
    remapper = _remapper(4, Eviction.lru)
    kjt = KeyedJaggedTensor(keys=["item_id"], values=torch.tensor([21, 22, 23]),
                            lengths=torch.ones(3, dtype=torch.int32))
    rows = remapper(kjt, claim_rows=1).values().tolist()  # row 0 labelled; rows 1-2: sampled negatives
    assert rows[1:] == [3, 3] and rows[0] < 3
    assert int((remapper.resident("item_id") < 2**40).sum()) == 1


def test_eval_mode_never_changes_the_state():
    remapper = _remapper(4, Eviction.lru)
    _step(remapper, 11, 12)
    before = {key: value.clone() for key, value in remapper.state_dict().items()}
    remapper.eval()
    assert _step(remapper, 13, 14) == [3, 3]  # unseen IDs: the shared row, and nothing claimed
    assert all(torch.equal(before[key], value) for key, value in remapper.state_dict().items())


@pytest.mark.dist
def test_replicas_stay_identical_across_ranks(torchrun, tmp_path):
    torchrun(2, "tests/workers/managed_ids.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert len(set(ranks[0]["rows"]) - {7}) == 7  # 12 IDs seen, 7 usable rows: all claimed


def _prepare(out, id_mapping="managed"):
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.synthetic import SyntheticSource

    options = PrepareConfig(id_mapping=id_mapping, zch_size=64, history_max_len=20, val_fraction=0.1,
                            synthetic=SyntheticConfig(users=200, items=300, interactions=4000, side_features=2))
    return prepare_dataset(SyntheticSource(options.synthetic, seed=options.seed), out, options)


def test_prepare_managed_keeps_catalog_indices_and_writes_raw_id_hashes(tmp_path):
    from data_pipeline.mapping import managed_ids
    from trec.data import PreparedDataset

    manifest = _prepare(tmp_path / "ds")
    assert manifest["id_mapping"] == {"kind": "managed", "min_count": 1, "zch_size": 64, "input_hash_size": 2**40}
    dataset = PreparedDataset.open(tmp_path / "ds")
    item = dataset.feature("item_id")
    assert (item.mapping, item.cardinality, item.zch_size) == ("managed", dataset.num_items, 64)
    mapping = pq.read_table(tmp_path / "ds" / item.mapping_file)
    assert np.array_equal(mapping["managed_id"].to_numpy(), managed_ids(mapping["raw"].combine_chunks()))
    batch = dataset.build_batch(np.array([0, 1]), np.array([2, -1]), np.ones(2, np.float32))
    ids = batch.sparse_features["item_id"].values().numpy()
    assert ids.tolist() == [mapping["managed_id"][2].as_py()] and 0 <= ids[0] < 2**40
    from trec.config import ModelConfig
    from trec.models.managed import refuse_managed
    with pytest.raises(TrecError, match="model 'mf' does not support managed IDs"):
        refuse_managed(dataset.sparse_features, ModelConfig(name="mf"))


def _train(run_dir, data, *extra):
    return run_command([*torchrun_command(2), "-m", "trec", "train", "--config", CONFIG, "--data", str(data),
                        "--run-dir", str(run_dir), "training.max_steps=4", "checkpoint.every_steps=2",
                        "checkpoint.keep_last=3", "training.eval_every_steps=0", "training.validation=split",
                        "data.batch_size=128", "model.two_tower.loss.num_negatives=64",
                        "model.two_tower.tower_layers=[32]",
                        "evaluation.ks=[10]", "model.managed_collision.eviction=lru", *extra])


@pytest.mark.dist
def test_two_rank_training_resume_export_and_raw_id_search(tmp_path):
    _prepare(tmp_path / "ds")
    run = tmp_path / "run"
    _train(run, tmp_path / "ds")
    final = model_weights(run / "checkpoints" / "step-4")
    assert int(final[MCH + "item_id._current_iter_tensor"]) == 4
    resident = final[MCH + "item_id._mch_sorted_raw_ids"]
    assert 0 < int((resident < 2**40).sum()) <= 63  # rows claimed, within the 64-row table

    # Resume from step 2 in a copy: the remapper must continue from its checkpointed state, so step 4
    # ends identical (a remapper restarted empty would have counted 2 steps and assigned other rows).
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    _train(resumed, tmp_path / "ds")
    again = model_weights(resumed / "checkpoints" / "step-4")
    for key in (k for k in final if k.startswith(MCH)):
        assert torch.equal(final[key], again[key]), key

    export = tmp_path / "export"
    trec.export(run, export)  # in this process (one rank): the tables are re-sharded on load
    mapping = pq.read_table(tmp_path / "ds" / "mappings" / "item_id.parquet")
    exported = pq.read_table(export / "index" / "ids.parquet")
    assert sorted(exported["raw_id"].to_pylist()) == sorted(mapping["raw"].to_pylist())  # raw IDs, every item

    users = pq.read_table(tmp_path / "ds" / "mappings" / "user_id.parquet")
    user = users["raw"][0].as_py()
    found = json.loads(run_command([sys.executable, "-m", "trec", "search", "--index", str(export), "--run-dir",
                                    str(run), "--user", str(user), "-k", "10", "--json"]).stdout)
    items = [int(entry["item"]) for entry in found["items"]]
    assert len(items) == 10 and set(items) <= set(mapping["raw"].to_pylist())
    seen = _seen_raw_items(tmp_path / "ds", users["index"][0].as_py(), mapping)
    assert seen and not seen & set(items)  # exclusions by catalog item, whatever rows the IDs share

    from trec.serving import Recommender, RecommendRequest  # the bundle remaps too: same answer as search
    served = Recommender.load(export).recommend(RecommendRequest(user_id=user, k=10))
    assert [int(item.item_id) for item in served.items] == items


def test_modulo_baseline_is_stateless_hashing():
    from trec.config import Remap
    from trec.models.managed import ModuloIds

    remapper = ModuloIds({"item_id": 7}, {"item_id": ("item_id", True)}, ManagedCollisionConfig(remap=Remap.modulo))
    assert _step(remapper.train(), 10, 17, 24) == [3, 3, 3] and not remapper.state_dict()


def _seen_raw_items(root, user_index: int, mapping) -> set[int]:
    raw = mapping["raw"].to_numpy()[np.argsort(mapping["index"].to_numpy())]
    seen = set()
    for split in ("train", "test"):
        for path in sorted((root / split).glob("*.parquet")):
            table = pq.read_table(path, columns=["user_id", "item_id"])
            rows = table["user_id"].to_numpy() == user_index
            seen |= set(raw[table["item_id"].to_numpy()[rows]].tolist())
    return seen


def test_ease_scores_a_managed_dataset_as_its_vocab_twin(tmp_path):
    """EASE keys its user rows by catalog index; a managed dataset's batches carry ID hashes, mapped back."""
    from trec.config import DataConfig, EvaluationConfig
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.evaluation.ease import evaluate_ease

    _prepare(tmp_path / "managed")
    _prepare(tmp_path / "vocab", id_mapping="vocab")
    metrics = {}
    with distributed_session(seed=0, log_level="WARNING") as ctx:
        for kind in ("managed", "vocab"):
            dataset = PreparedDataset.open(tmp_path / kind)
            metrics[kind] = evaluate_ease(dataset, "test", ["train", "val"], EvaluationConfig(ks=[10]),
                                          DataConfig(), ctx, seed=0, grid=[100.0])
    assert metrics["managed"]["ndcg@10"] > 0
    assert metrics["managed"]["ndcg@10"] == pytest.approx(metrics["vocab"]["ndcg@10"])
