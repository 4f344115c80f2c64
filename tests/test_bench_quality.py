"""EASE against a direct numpy reference, its λ selection and catalog limit, and `trec bench quality` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trec.data import Csr, pair_key
from trec.errors import TrecError
from trec.evaluation import ease


def _reference_b(x: np.ndarray, lam: float) -> np.ndarray:
    """Steck 2019, Algorithm 1, in float64."""
    g = x.T @ x + lam * np.eye(x.shape[1])
    p = np.linalg.inv(g)
    b = p / (-np.diag(p))
    np.fill_diagonal(b, 0.0)
    return b


def _clustered(users: int, items: int, seed: int) -> Csr:
    """Users who like one of four item groups (plus noise): an item-item model has something to learn."""
    rng = np.random.default_rng(seed)
    keys = []
    for u in range(users):
        group = np.arange(u % 4, items, 4)
        liked = rng.choice(group, size=len(group) // 2, replace=False)
        noise = rng.choice(items, size=3, replace=False)
        keys.extend(pair_key(u, np.unique(np.concatenate([liked, noise])), items))
    return Csr.from_keys(np.unique(np.array(keys, np.int64)), users, items)


def test_ease_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 25)) < 0.3).astype(np.float32)
    b = ease.ease_weights(torch.from_numpy(x), 10.0)
    assert torch.all(b.diagonal() == 0)
    np.testing.assert_allclose(b.numpy(), _reference_b(x.astype(np.float64), 10.0), atol=1e-5)


def _reference_ndcg(b: np.ndarray, x: np.ndarray, held: Csr, excluded: Csr, k: int) -> float:
    """Binary NDCG@k over the users with a held-out item, the excluded items never ranked."""
    values = []
    for u in np.flatnonzero(held.lengths > 0):
        scores = x[u] @ b
        scores[excluded.row(u)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        gains = np.isin(top, held.row(u)).astype(float)
        ideal = np.sum(1.0 / np.log2(np.arange(2, min(len(held.row(u)), k) + 2)))
        values.append(np.sum(gains / np.log2(np.arange(2, k + 2))) / ideal)
    return float(np.mean(values))


def test_lambda_selection_picks_the_best_validation_ndcg():
    items = 48
    positives = _clustered(60, items, seed=1)
    grid = (0.5, 5.0, 50.0, 5000.0)
    chosen, scores = ease.choose_lambda(positives, positives, items, seed=3, grid=grid)
    fit, held = ease.carve_validation(positives, items, seed=3)
    assert held.lengths.sum() > 0 and np.all(fit.lengths >= 1)
    x = ease.binary_matrix(fit, items).numpy().astype(np.float64)
    expected = {lam: _reference_ndcg(_reference_b(x, lam), x, held, fit, 10) for lam in grid}
    assert scores == pytest.approx(expected, abs=1e-6)
    assert len(set(np.round(list(expected.values()), 6))) > 1  # the grid values are told apart
    assert chosen == max(expected, key=expected.get)


def test_carving_holds_out_about_a_tenth_and_keeps_one():
    positives = Csr.from_keys(np.array([0, 1, 120, 121, 122] + list(range(240, 260)), np.int64), 3, 120)
    fit, held = ease.carve_validation(positives, 120, seed=0)
    assert list(held.lengths) == [1, 1, 2] and list(fit.lengths) == [1, 2, 18]


def test_a_catalog_above_the_limit_is_refused():
    with pytest.raises(TrecError, match="30,001 items, above the limit of 30,000"):
        ease.check_catalog(30_001)
    with pytest.raises(TrecError, match="30,001 items"):
        ease.ease_weights(torch.zeros(2, 30_001), 100.0)


def test_bench_quality_popularity_and_ease(run_trec, tmp_path):
    data, out = tmp_path / "tiny", tmp_path / "quality.json"
    run_trec("data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "120",
             "--interactions", "6000", "--quiet")
    proc = run_trec("bench", "quality", "--data", data, "--methods", "popularity,ease", "--json", out)
    assert "ndcg@10" in proc.stdout and "ease" in proc.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "quality" and report["machine"] and report["date"]
    rows = {row["method"]: row for row in report["runs"]}
    assert set(rows) == {"popularity", "ease"} and all(row["seed"] == 42 for row in rows.values())
    for row in rows.values():
        for column in ("precision@10", "recall@10", "ndcg@10", "map@10", "coverage@10", "train_seconds"):
            assert 0.0 <= row[column] and (column == "train_seconds" or row[column] <= 1.0)
    assert rows["ease"]["lambda"] in ease.LAMBDA_GRID
    assert rows["ease"]["ndcg@10"] > rows["popularity"]["ndcg@10"]
    assert rows["ease"]["coverage@10"] > rows["popularity"]["coverage@10"]
    assert [entry["method"] for entry in report["summary"]] == ["popularity", "ease"]


def test_leave_last_one_out_reports_the_hit_rate_and_refuses_other_splits(run_trec, tmp_path, capsys):
    from trec.cli import main

    loo, stratified, out = tmp_path / "loo", tmp_path / "stratified", tmp_path / "loo.json"
    for data, split in ((loo, ["--split", "leave-last-n", "--last-n", "1"]), (stratified, [])):
        run_trec("data", "prepare", "synthetic", "--out", data, "--users", "150", "--items", "100",
                 "--interactions", "4000", "--quiet", *split)
    assert main(["bench", "quality", "--data", str(loo), "--protocol", "leave-last-one-out", "--methods",
                 "popularity,ease", "--json", str(out)]) == 0
    assert "recall@10 = hit rate@10" in capsys.readouterr().out
    rows = json.loads(out.read_text())["runs"]
    assert all(row["hit_rate@10"] == row["recall@10"] for row in rows) and len(rows) == 2
    assert main(["bench", "quality", "--data", str(stratified), "--protocol", "leave-last-one-out", "--methods",
                 "popularity"]) == 2
    assert "needs one test item per user" in capsys.readouterr().err
