"""Labels mean what they say: a click log where about half the rows are label 0.

The log is MovieLens 100K's u.data with label = 1 when the rating is >= 4, else 0 (55 % of the
rows are positives), prepared with `trec data prepare parquet --label-col label`. Positives are
rows with label >= data.positive_threshold (0.5); the others must not train the retriever, count
as popularity, be relevant in evaluation, sit in the user history, or be clicks for the ranker.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from training import run_command, trec_command

from trec.config import DataConfig, EvaluationConfig, ModelConfig
from trec.models.dcn.config import DCNConfig
from trec.models.two_tower.config import TwoTowerConfig
from trec.data import Csr, PreparedDataset
from trec.distributed import DistContext
from trec.losses import sampled_softmax_loss

CPU = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")


def _prepare(source, out, *extra: str) -> None:
    run_command([sys.executable, "-m", "trec", "data", "prepare", "parquet", "--source", str(source), "--out", str(out),
                 "--label-col", "label", "--quiet", *extra], timeout=600)


@pytest.fixture(scope="module")
def clicks(ml100k, tmp_path_factory):
    """ML-100K as a click log (label = rating >= 4), prepared with the benchmark split."""
    root = tmp_path_factory.mktemp("clicks")
    data = np.loadtxt(ml100k / "u.data", dtype=np.int64)
    log = pa.table({"user_id": data[:, 0], "item_id": data[:, 1], "timestamp": data[:, 3],
                    "label": (data[:, 2] >= 4).astype(np.float32)})
    pq.write_table(log, root / "clicks.parquet")
    _prepare(root / "clicks.parquet", root / "prepared", "--val-fraction", "0.1")
    return root / "prepared"


def _split(dataset: PreparedDataset, split: str) -> dict[str, np.ndarray]:
    table = dataset.read_split(split, ["user_id", "item_id", "label"])
    return {name: table[name].to_numpy() for name in table.column_names}


def _materialise(task: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Tables are built on the meta device for DMP; give them real random weights to run unsharded."""
    from torchrec import EmbeddingBagCollection

    torch.manual_seed(seed)
    for module in task.modules():
        if isinstance(module, EmbeddingBagCollection):
            module.to_empty(device="cpu")
            for parameter in module.parameters():
                torch.nn.init.normal_(parameter, std=0.5)
    return task.eval()


# --------------------------------------------------------------------------------------------
# counts and history
# --------------------------------------------------------------------------------------------


def test_item_counts_count_positive_train_rows_only(clicks):
    dataset = PreparedDataset.open(clicks)
    train = _split(dataset, "train")
    positive = train["label"] >= 0.5
    assert 0.4 < positive.mean() < 0.7  # a real mix of clicks and non-clicks
    expected = np.bincount(train["item_id"][positive], minlength=dataset.num_items)
    assert np.array_equal(dataset.item_counts, expected)  # logQ, popular negatives, popularity baseline
    assert dataset.item_train_rows.sum() == len(positive)  # every row, as features/items.parquet says


def test_user_history_holds_positive_train_rows_only(clicks):
    # The user_history feature lists what a user liked in training, never a label-0 row's item.
    dataset = PreparedDataset.open(clicks)
    train = _split(dataset, "train")
    positive = train["label"] >= 0.5
    history = pq.read_table(clicks / "features" / "user_history.parquet")
    liked = set(zip(train["user_id"][positive].tolist(), train["item_id"][positive].tolist()))
    pairs = [(user, item) for user, items in zip(history["user_id"].to_pylist(), history["history"].to_pylist())
             for item in items]
    assert pairs and all(pair in liked for pair in pairs)


# --------------------------------------------------------------------------------------------
# the retrieval loss
# --------------------------------------------------------------------------------------------


def _retrieval_task(dataset: PreparedDataset, **loss):
    from trec.models.two_tower.model import RetrievalTask

    cfg = TwoTowerConfig(tower_layers=[16], output_dim=8)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return _materialise(RetrievalTask(ModelConfig(name="two_tower", embedding_dim=8), cfg, dataset))


def test_retrieval_loss_ignores_label_zero_rows(clicks):
    dataset = PreparedDataset.open(clicks)
    task = _retrieval_task(dataset)
    users, items = np.array([0, 1, 2, 3, 4, 5]), np.array([10, 20, 30, 40, 50, 60])
    labels = np.array([1, 0, 1, 1, 0, 1], np.float32)

    def loss(users, items, labels) -> float:
        with torch.no_grad():
            return task(dataset.build_batch(users, items, labels, history_max_len=20))[0].item()

    base = loss(users, items, labels)
    # A label-0 row's user and item (its item would be everyone's in-batch candidate) change nothing ...
    other = loss(np.array([0, 7, 2, 3, 4, 5]), np.array([10, 99, 30, 40, 50, 60]), labels)
    assert other == pytest.approx(base, abs=1e-6)
    assert loss(users, np.array([10, 20, 30, 40, 77, 60]), labels) == pytest.approx(base, abs=1e-6)
    # ... while a positive row's item does, and the same row as a positive does too.
    assert loss(users, np.array([10, 20, 30, 88, 50, 60]), labels) != pytest.approx(base, abs=1e-4)
    ones = np.ones(6, np.float32)
    assert loss(np.array([0, 7, 2, 3, 4, 5]), np.array([10, 99, 30, 40, 50, 60]), ones) != pytest.approx(
        loss(users, items, ones), abs=1e-4)


def test_graded_labels_weight_the_loss_when_asked(clicks):
    # Two rows, two candidates: hand-computed softmax cross-entropies weighted by the labels.
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    logits = user @ candidates.T  # row i's positive is candidate i
    ce = [-torch.log_softmax(logits[i], 0)[i].item() for i in range(2)]
    weights = torch.tensor([1.0, 0.6])
    weighted = sampled_softmax_loss(user, candidates, torch.tensor([3, 4]), 1.0, row_weights=weights)
    assert weighted.item() == pytest.approx((1.0 * ce[0] + 0.6 * ce[1]) / 1.6, rel=1e-6)
    # A row of weight 0 is no candidate for the other: row 0 then only has its own positive.
    alone = sampled_softmax_loss(user, candidates, torch.tensor([3, 4]), 1.0, row_weights=torch.tensor([1.0, 0.0]))
    assert alone.item() == pytest.approx(0.0, abs=1e-6)

    # Through the task: label_weighting uses the graded label as the row's weight, else 1.
    dataset = PreparedDataset.open(clicks)
    graded = torch.tensor([1.0, 0.7, 0.3, 0.5])
    assert _retrieval_task(dataset).row_weights(graded).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert _retrieval_task(dataset, label_weighting=True).row_weights(graded).tolist() == pytest.approx(
        [1.0, 0.7, 0.0, 0.5])


# --------------------------------------------------------------------------------------------
# retrieval evaluation: relevance and graded gain on a hand-made case
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two users; leave-last-3 split (the last 3 rows by time are test), graded labels.

    user 1: train 10 (1), 11 (0), 12 (1); test 13 (1), 14 (0), 15 (0.6)
    user 2: train 10 (1), 13 (1), 16 (0), 16 (0); test 11 (0), 12 (0), 14 (0): no positive test row
    """
    root = tmp_path_factory.mktemp("tiny")
    rows = [(1, 10, 1, 1.0), (1, 11, 2, 0.0), (1, 12, 3, 1.0), (1, 13, 4, 1.0), (1, 14, 5, 0.0), (1, 15, 6, 0.6),
            (2, 10, 1, 1.0), (2, 13, 2, 1.0), (2, 16, 3, 0.0), (2, 16, 4, 0.0),
            (2, 11, 5, 0.0), (2, 12, 6, 0.0), (2, 14, 7, 0.0)]
    users, items, times, labels = zip(*rows)
    pq.write_table(pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(times),
                             "label": pa.array(labels, pa.float32())}), root / "log.parquet")
    _prepare(root / "log.parquet", root / "prepared", "--split", "leave-last-n", "--last-n", "3")
    return PreparedDataset.open(root / "prepared")


def _scores_encoder(dataset: PreparedDataset, scores_by_raw: dict[int, dict[int, float]]):
    """(user encoder, identity item table): user u's embedding is its score for every item."""
    table = torch.zeros(dataset.num_users, dataset.num_items)
    for user, scores in scores_by_raw.items():
        for item, score in scores.items():
            table[dataset.lookup_index("user_id", user), dataset.lookup_index("item_id", item)] = score

    def encode(batch):
        ids = batch.sparse_features["user_id"]
        out = torch.zeros(ids.lengths().shape[0], dataset.num_items)
        out[ids.lengths() > 0] = table[ids.values()]
        return out

    return encode, torch.eye(dataset.num_items)


def _evaluate(dataset, graded: bool) -> dict[str, float]:
    from trec.evaluation.retrieval import evaluate_retrieval

    # user 1 ranks 14 (label 0) first, then 15 (0.6), then the train items (excluded), then 13 (1.0).
    encode, items = _scores_encoder(dataset, {1: {14: 9, 15: 8, 11: 7, 10: 6, 12: 5, 13: 4, 16: 3},
                                              2: {14: 9, 11: 8, 12: 7}})
    cfg = EvaluationConfig(ks=[3])
    if graded:
        from trec.config import Gain

        cfg.gain = Gain.graded
    return evaluate_retrieval(encode, items, dataset, "test", ["train"], cfg, DataConfig(), CPU)


def test_retrieval_evaluation_counts_positive_test_rows_as_relevant(tiny):
    metrics = _evaluate(tiny, graded=False)
    # Only user 1 has a positive test row; user 2 (three label-0 test rows) is not evaluated.
    assert metrics["users"] == 1
    # user 1's list after excluding every train item (label 0 too: 11 was seen): 14, 15, 13.
    # Relevant = {13, 15}: hits 0 1 1.
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    ideal = 1 + 1 / math.log2(3)
    assert metrics["ndcg@3"] == pytest.approx(dcg / ideal)
    assert metrics["precision@3"] == pytest.approx(2 / 3) and metrics["recall@3"] == pytest.approx(1.0)
    assert metrics["mrr@3"] == pytest.approx(1 / 2)
    # Popularity = positive train rows: 10 (2), 12 (1), 13 (1); 16's two label-0 rows count 0, so for
    # user 1 (10, 11, 12 excluded) the popular list starts with 13, a relevant item.
    assert metrics["popularity/mrr@3"] == pytest.approx(1.0)


def test_graded_gain_is_two_to_the_label_minus_one(tiny):
    metrics = _evaluate(tiny, graded=True)
    g15, g13 = 2**0.6 - 1, 2**1.0 - 1
    dcg = g15 / math.log2(3) + g13 / math.log2(4)  # positions 2 and 3: DCG = sum (2^rel - 1) / log2(i + 1)
    ideal = g13 / math.log2(2) + g15 / math.log2(3)  # the user's labels sorted: 1.0, 0.6
    assert metrics["ndcg@3"] == pytest.approx(dcg / ideal)
    assert metrics["precision@3"] == pytest.approx(2 / 3)  # the other metrics stay binary


# --------------------------------------------------------------------------------------------
# the ranker
# --------------------------------------------------------------------------------------------


def test_ranker_held_out_rows_carry_the_real_labels(clicks):
    from trec.evaluation.ranking import held_out_rows

    dataset = PreparedDataset.open(clicks)
    test = _split(dataset, "test")
    clicks_ = (test["label"] >= 0.5).astype(np.float32)
    users, items, labels, _ = held_out_rows(dataset, "test", 2, 1)
    rows = len(test["label"])
    # The held-out rows first, label-0 ones as negatives; then 2 sampled negatives per positive only.
    assert np.array_equal(labels[:rows], clicks_) and clicks_.sum() < rows
    assert len(users) == rows + 2 * int(clicks_.sum())
    assert np.array_equal(users[rows:], np.repeat(test["user_id"][clicks_ > 0], 2)) and not labels[rows:].any()


def test_ranker_trains_label_zero_rows_as_negatives_without_sampled_negatives(clicks):
    from trec.models.dcn.model import RankingTask

    dataset = PreparedDataset.open(clicks)
    cfg = DCNConfig(dense_layers=[8], top_layers=[8], low_rank=4, negatives_per_positive=2)
    task = _materialise(RankingTask(ModelConfig(name="dcn", embedding_dim=8), cfg, dataset))
    users, items = np.array([0, 1, 2]), np.array([10, 20, 30])
    rows = task.augment(users, items, np.array([1.0, 0.0, 1.0], np.float32), np.zeros(3, np.float32),
                        np.random.default_rng(0))
    # The label-0 row is a negative; only the two positives get their 2 sampled negatives each (the
    # label-0 row's sampled rows are padding, label -1, that keeps the batch shape and weighs nothing).
    assert rows[2].tolist() == [1, 0, 1, 0, 0, -1, -1, 0, 0]

    def loss(items) -> float:
        with torch.no_grad():
            return task(dataset.build_batch(rows[0], items, rows[2], rows[3], history_max_len=20))[0].item()

    base = loss(rows[1])
    padded = rows[1].copy()
    padded[5:7] = [99, 98]
    assert loss(padded) == pytest.approx(base, abs=1e-6)
    negative = rows[1].copy()
    negative[1] = 97  # the label-0 row itself is trained on
    assert loss(negative) != pytest.approx(base, abs=1e-5)


# --------------------------------------------------------------------------------------------
# a real run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_run_reports_metrics_on_positives(clicks, tmp_path):
    run_dir = tmp_path / "run"
    run_command(trec_command(1, "train", "--config", "configs/movielens_two_tower.yaml", "--data", clicks,
                             "--run-dir", run_dir, "training.max_steps=6", "data.batch_size=512",
                             "checkpoint.every_steps=0", "logging.tensorboard=false"), timeout=600)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6

    dataset = PreparedDataset.open(clicks)
    test = _split(dataset, "test")
    positive = test["label"] >= 0.5
    evaluated = np.unique(test["user_id"][positive])
    assert metrics["users"] == len(evaluated) < dataset.num_users  # users with a positive test row only

    # The popularity baseline by hand: positive train counts, every train and val item excluded,
    # relevance = the user's positive test items.
    seen = {}
    for split in ("train", "val"):
        rows = _split(dataset, split)
        for user, item in zip(rows["user_id"].tolist(), rows["item_id"].tolist()):
            seen.setdefault(user, set()).add(item)
    train = _split(dataset, "train")
    counts = np.bincount(train["item_id"][train["label"] >= 0.5], minlength=dataset.num_items)
    scores = torch.as_tensor(counts, dtype=torch.float32).expand(len(evaluated), -1).clone()
    for row, user in enumerate(evaluated.tolist()):
        scores[row, sorted(seen.get(user, ()))] = -torch.inf
    top = scores.topk(20, dim=1).indices.numpy()[:, :10]  # ties break as in trec's one top-max(ks) pass
    ndcgs = []
    for row, user in enumerate(evaluated.tolist()):
        relevant = set(test["item_id"][positive & (test["user_id"] == user)].tolist())
        dcg = sum(1 / math.log2(i + 2) for i, item in enumerate(top[row]) if item in relevant)
        ndcgs.append(dcg / sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10))))
    assert metrics["popularity/ndcg@10"] == pytest.approx(np.mean(ndcgs), abs=1e-6)


def test_two_stage_evaluation_honours_graded_gain(tiny):
    """evaluation.gain = graded reaches two-stage evaluation too: its ndcg is the graded one, not a binary
    NDCG reported under the same name (stub stages: the retriever and the ranker of _evaluate's scores)."""
    from trec.config import Gain
    from trec.two_stage import evaluate_two_stage

    dataset = tiny
    index = {raw: dataset.lookup_index("item_id", raw) for raw in (13, 14, 15)}

    def generate(users, batch, n):
        # user 1's candidates after its train items are excluded: 14 (label 0), 15 (0.6), 13 (1.0).
        top = torch.as_tensor([index[14], index[15], index[13]])[:n]
        return top.expand(len(users), -1), torch.arange(n, 0, -1, dtype=torch.float32).expand(len(users), -1)

    def score(users, items):  # the ranker keeps the retriever's order
        order = {index[14]: 3.0, index[15]: 2.0, index[13]: 1.0}
        return torch.as_tensor([order.get(int(item), 0.0) for item in items])

    def ndcg(gain):
        metrics = evaluate_two_stage(generate, score, dataset, "test", [3], 3, DataConfig(), 64, CPU, gain=gain)
        assert metrics["two_stage/users"] == 1
        return metrics["two_stage/ndcg@3"], metrics["retrieval/ndcg@3"]

    g15, g13 = 2**0.6 - 1, 2**1.0 - 1
    graded = (g15 / math.log2(3) + g13 / math.log2(4)) / (g13 + g15 / math.log2(3))
    binary = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg(Gain.binary) == pytest.approx((binary, binary))
    assert ndcg(Gain.graded) == pytest.approx((graded, graded))


def test_a_user_with_no_positive_training_row_gets_the_popularity_fallback(tmp_path):
    """Its training rows weigh 0 in the retriever's loss: its user embedding never trained, and search
    or recommend would serve noise as a personalised list. user 2: only label-0 rows in train."""
    from trec.evaluation.served import serve_user

    rows = [(1, 10, 1, 1.0), (1, 11, 2, 1.0), (1, 12, 3, 1.0), (2, 10, 1, 0.0), (2, 11, 2, 0.0), (2, 12, 3, 1.0)]
    users, items, times, labels = zip(*rows)
    pq.write_table(pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(times),
                             "label": pa.array(labels, pa.float32())}), tmp_path / "log.parquet")
    _prepare(tmp_path / "log.parquet", tmp_path / "prepared", "--split", "leave-last-n", "--last-n", "1")
    dataset = PreparedDataset.open(tmp_path / "prepared")
    assert serve_user(dataset, "1").index == dataset.lookup_index("user_id", 1)
    shown_only = serve_user(dataset, "2")
    assert shown_only.index is None  # the fallback, not the untrained embedding
    assert sorted(shown_only.seen.tolist()) == sorted(dataset.lookup_index("item_id", i) for i in (10, 11, 12))


def test_hard_auc_rows_are_the_positives_against_their_hard_candidates_only(clicks):
    """hard_auc is how well the ranker orders the retriever's candidates: the held-out label-0 rows
    (real negatives, already in auc) must not be among its negatives."""
    from trec.evaluation.ranking import held_out_rows

    dataset = PreparedDataset.open(clicks)
    test = _split(dataset, "test")
    positive = test["label"] >= 0.5
    no_candidates = Csr(np.zeros(dataset.num_users + 1, np.int64), np.zeros(0, np.int64))  # falls back to uniform
    users, items, labels, _ = held_out_rows(dataset, "test", 2, 1, no_candidates)
    count = int(positive.sum())
    assert len(users) == 3 * count and labels[:count].all() and not labels[count:].any()
    assert np.array_equal(items[:count], test["item_id"][positive])


def test_an_excluded_item_is_never_listed_even_when_fewer_than_k_remain():
    """Exclude seen whatever the label: an item shown to the user in train (label 0) and clicked in test
    is excluded, so it can be no hit, not even as a filler of a list longer than what remains."""
    from trec.evaluation.topk import score_topk
    from trec.metrics import topk_hits

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    top = score_topk(scores, torch.tensor([0, 1]), 4)[0]  # the user has seen items 0 and 1
    assert top.tolist() == [[2, 3, -1, -1]]
    assert not topk_hits(top, torch.tensor([1]), 4).any()  # item 1 is a positive test row, but was seen


def test_two_stage_fillers_are_not_recommendations(tiny):
    """Candidates with a -inf retrieval score (the exact generator's excluded items when fewer than n
    remain) count neither as hits nor towards coverage, in retrieval/ and two_stage/ alike."""
    from trec.two_stage import evaluate_two_stage

    dataset = tiny
    listed = [dataset.lookup_index("item_id", raw) for raw in (15, 13, 14, 10)]  # 10: seen in train

    def generate(users, batch, n):
        scores = torch.tensor([3.0, 2.0, 1.0, -torch.inf])
        return torch.as_tensor(listed).expand(len(users), -1), scores.expand(len(users), -1)

    def score(users, items):
        return torch.zeros(len(items))

    metrics = evaluate_two_stage(generate, score, dataset, "test", [4], 4, DataConfig(), 64, CPU)
    assert metrics["retrieval/coverage@4"] == pytest.approx(3 / dataset.num_items)
    assert metrics["two_stage/coverage@4"] == pytest.approx(3 / dataset.num_items)
