"""The DCN-v2 ranker end to end on MovieLens 100K: 2-rank training with hard negatives mined from a
two-tower run, kill and resume, two-stage evaluation (CLI, and against a brute-force computation),
and `trec recommend`.

A small two-tower run (1 rank) and one uninterrupted 2-rank ranker run are shared by the tests.
Training is deterministic on CPU, so a resumed ranker must end with bit-identical weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training import kill_after_checkpoint, model_weights, resumed_step, run_command, trec_command


pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 30
WEIGHT = 5.0  # retrieval_weight of the blended two-stage order in the brute-force check
TWO_TOWER = [
    "training.max_steps=20", "training.eval_every_steps=1000", "data.batch_size=512", "evaluation.ks=[10]",
    "checkpoint.every_steps=0", "logging.projector_items=0", "logging.tensorboard=false",
]


def ranker_overrides(retriever: Path) -> list[str]:
    return [
        f"training.max_steps={STEPS}", "training.eval_every_steps=15", "checkpoint.every_steps=5",
        "checkpoint.keep_last=2", "logging.log_every_steps=5", "data.batch_size=256",
        "model.dcn.rating_weight=0.1", "model.dcn.hard_negative_ratio=0.5", "model.dcn.hard_negatives_top_n=20",
        "model.dcn.eval_negatives=1",
        f"model.dcn.hard_negatives_run={retriever}", "logging.histogram_every_steps=0",
    ]


def ranker_command(run_dir: Path, data: Path, retriever: Path) -> list[str]:
    return trec_command(2, "train", "--config", "configs/movielens_dcn.yaml", "--data", data, "--run-dir", run_dir,
                        *ranker_overrides(retriever))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, ml100k_prepared) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "two_tower"
    run_command(trec_command(1, "train", "--config", "configs/movielens_two_tower.yaml", "--data", ml100k_prepared,
                             "--run-dir", run_dir, *TWO_TOWER))
    return run_dir


@pytest.fixture(scope="module")
def ranker(tmp_path_factory, ml100k_prepared, retriever) -> Path:
    """An uninterrupted 2-rank ranker run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("runs") / "dcn"
    proc = run_command(ranker_command(run_dir, ml100k_prepared, retriever))
    assert "hard negatives: mined the top 20 non-train items" in proc.stderr
    return run_dir


def test_ranker_run_writes_click_metrics_checkpoints_and_tensorboard(ranker):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((ranker / "metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert 0.5 < metrics["auc"] <= 1.0 and 0.0 < metrics["hard_auc"] <= 1.0
    assert metrics["logloss"] > 0 and metrics["ne"] > 0 and metrics["calibration"] > 0
    assert 0 < metrics["rating_mse"] < 4  # the rating head starts at the mean rating
    assert "val/auc" in metrics  # the default early-stopping metric of the ranker
    assert sorted(p.name for p in (ranker / "checkpoints").iterdir()) == ["best", "step-25", "step-30"]
    assert (ranker / "hard_negatives.parquet").is_file()
    events = EventAccumulator(str(ranker / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/auc")] == [15, 30]
    assert [e.step for e in events.Scalars("test/rating_mse")] == [metrics["best_step"]]  # the checkpoint's step


def test_ranker_resumes_after_kill_with_identical_weights(ranker, retriever, ml100k_prepared, tmp_path):
    run_dir = tmp_path / "killed"
    interrupted_at = kill_after_checkpoint(ranker_command(run_dir, ml100k_prepared, retriever), run_dir)
    assert interrupted_at is not None and interrupted_at.name != f"step-{STEPS}", "the kill came too late"

    resumed = run_command(ranker_command(run_dir, ml100k_prepared, retriever))
    assert resumed_step(resumed.stderr, run_dir) == int(interrupted_at.name.removeprefix("step-"))  # that checkpoint
    assert "hard negatives: reusing" in resumed.stderr  # the cache is part of the run, not mined again
    final, reference = run_dir / "checkpoints" / f"step-{STEPS}", ranker / "checkpoints" / f"step-{STEPS}"
    ours, theirs = model_weights(final), model_weights(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:  # any repeated or skipped batch, or other negatives, would change the weights
        assert torch.equal(ours[key], theirs[key]), key
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, ranker))
    assert metrics["auc"] == expected["auc"] and metrics["hard_auc"] == expected["hard_auc"]


def test_two_stage_evaluate_writes_both_rows(ranker, retriever, run_trec, tmp_path):
    import shutil

    ranker_copy = tmp_path / "dcn"
    shutil.copytree(ranker, ranker_copy)
    proc = run_trec("evaluate", "--run-dir", retriever, "--ranker-run-dir", ranker_copy, "--candidates", "20")
    assert "two_stage" in proc.stdout and "retrieval" in proc.stdout
    metrics = json.loads((ranker_copy / "metrics.json").read_text())
    assert metrics["auc"] == json.loads((ranker / "metrics.json").read_text())["auc"]  # earlier keys are kept
    for name in ("ndcg@10", "recall@10", "map@10", "mrr@10", "coverage@10", "diversity@10"):
        assert 0 <= metrics[f"two_stage/{name}"] <= 1 and 0 <= metrics[f"retrieval/{name}"] <= 1
    assert metrics["two_stage/users"] == metrics["retrieval/users"] == 943
    assert metrics["two_stage/candidates"] == 20 and 0 < metrics["retrieval/recall@20"] < 1
    # Retrieval-only is the two-tower's own evaluation (same exclusions), whatever re-ranks it.
    own = json.loads((retriever / "metrics.json").read_text())
    assert metrics["retrieval/ndcg@10"] == pytest.approx(own["ndcg@10"], abs=1e-6)


def test_two_stage_through_a_flat_index_equals_exact_retrieval(ranker, retriever, run_trec, tmp_path):
    import shutil

    run_trec("export", "--run-dir", retriever, "--out", tmp_path / "export")
    results = {}
    for name, extra in (("exact", []), ("index", ["--index", tmp_path / "export"])):
        copy = tmp_path / name
        shutil.copytree(ranker, copy)
        run_trec("evaluate", "--run-dir", retriever, "--ranker-run-dir", copy, "--candidates", "20", *extra)
        results[name] = json.loads((copy / "metrics.json").read_text())
    assert results["index"]["two_stage/index"] == str((tmp_path / "export").resolve())
    for key in ("retrieval/ndcg@10", "retrieval/recall@20", "two_stage/ndcg@10", "two_stage/map@10"):
        assert results["index"][key] == pytest.approx(results["exact"][key], abs=1e-6), key


def test_recommend_prints_titles_and_labels_the_popularity_fallback(ranker, retriever, run_trec):
    known = run_trec("recommend", "--run-dir", retriever, "--ranker-run-dir", ranker, "--user", "196", "-k", "5")
    lines = known.stdout.splitlines()
    assert "re-ranked by the ranker" in lines[0] and len(lines) == 2 + 5
    assert any("(19" in line for line in lines[2:])  # MovieLens titles carry their year
    unknown = run_trec("recommend", "--run-dir", retriever, "--ranker-run-dir", ranker, "--user", "999999", "-k", "3")
    assert "unknown" in unknown.stdout and "popularity fallback" in unknown.stdout
    assert "Star Wars (1977)" in unknown.stdout  # the most rated movie of ML-100K


def _hand_metrics(lists: list[list[int]], relevant: list[set[int]], k: int) -> dict[str, float]:
    totals = dict.fromkeys(("precision", "recall", "ndcg", "map", "mrr", "hit"), 0.0)
    for ranked, truth in zip(lists, relevant):
        hits = [item in truth for item in ranked[:k]]
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(truth), k)))
        found = sum(hits)
        totals["precision"] += found / k
        totals["recall"] += found / len(truth)
        totals["ndcg"] += sum(1 / math.log2(i + 2) for i, hit in enumerate(hits) if hit) / ideal
        totals["map"] += sum(sum(hits[: i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit) / min(len(truth), k)
        totals["mrr"] += 1 / (hits.index(True) + 1) if found else 0.0
        totals["hit"] += float(found > 0)
    return {f"{name}@{k}": value / len(lists) for name, value in totals.items()}


def test_two_stage_matches_brute_force(ranker, retriever, ml100k_prepared):
    """evaluate_two_stage against candidates, ranker scores and metrics computed here from the same models."""
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.two_stage import evaluate_two_stage, load_run, ranker_of, retrieval_candidates

    n, k = 20, 10
    with distributed_session(0, log_level="WARNING") as ctx:
        dataset = PreparedDataset.open(ml100k_prepared)
        two_tower, dcn = load_run(retriever, dataset, ctx), load_run(ranker, dataset, ctx)
        excluded = ["train", "val"]
        generate, items = retrieval_candidates(two_tower, dataset, excluded, ctx)
        score = ranker_of(dcn, dataset, ctx)
        metrics = evaluate_two_stage(generate, score, dataset, "test", [k], n, two_tower.cfg.data, 1000,
                                     ctx, items)
        blended = evaluate_two_stage(generate, score, dataset, "test", [k], n, two_tower.cfg.data, 1000,
                                     ctx, items, retrieval_weight=WEIGHT)

        with torch.no_grad():
            users = np.arange(dataset.num_users)
            none = np.full(dataset.num_items, -1)
            item_batch = dataset.build_batch(none, np.arange(dataset.num_items), np.zeros(0))
            user_batch = dataset.build_batch(users, np.full(len(users), -1), np.zeros(0),
                                             history_max_len=two_tower.cfg.data.history_max_len)
            scores = two_tower.task.retriever.encode_users(user_batch) @ two_tower.task.retriever.encode_items(item_batch).T
            seen = dataset.user_items(excluded)
            test = dataset.user_items(["test"])
            candidates = []
            for user in users:
                row = scores[user].clone()
                row[seen.row(user)] = -torch.inf
                candidates.append(torch.argsort(row, descending=True, stable=True)[:n].numpy())
            candidates = np.stack(candidates)
            retrieval_scores = scores.gather(1, torch.as_tensor(candidates)).numpy()
            pairs = dataset.build_batch(np.repeat(users, n), candidates.reshape(-1), np.zeros(len(users) * n),
                                        history_max_len=dcn.cfg.data.history_max_len)
            ranker_scores = dcn.task.model(pairs)[0].reshape(len(users), n).numpy()
        evaluated = [u for u in users if len(test.row(u))]
        relevant = [set(test.row(u).tolist()) for u in evaluated]
        retrieval_lists = [candidates[u].tolist() for u in evaluated]
        reranked = [candidates[u][np.argsort(-ranker_scores[u], kind="stable")].tolist() for u in evaluated]
        two_stage = ranker_scores + WEIGHT * retrieval_scores
        reranked_blend = [candidates[u][np.argsort(-two_stage[u], kind="stable")].tolist() for u in evaluated]
        expected = {f"retrieval/{key}": value for key, value in _hand_metrics(retrieval_lists, relevant, k).items()}
        expected |= {f"two_stage/{key}": value for key, value in _hand_metrics(reranked, relevant, k).items()}
        expected["retrieval/recall@20"] = _hand_metrics(retrieval_lists, relevant, n)["recall@20"]
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        for key, value in _hand_metrics(reranked_blend, relevant, k).items():
            assert blended[f"two_stage/{key}"] == pytest.approx(value, abs=1e-6), key
        assert metrics["two_stage/ndcg@10"] != metrics["retrieval/ndcg@10"]  # the ranker did re-order
