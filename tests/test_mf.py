"""Matrix factorization (model.name: mf): the BPR loss, label weighting, the encoders on padded
batches, and a real one-process run through train → evaluate → export → search."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from training import TINY, run_command, trec_command

from trec.models import load_config

MF_CONFIG = "configs/movielens_mf.yaml"


def test_reading_an_mf_config_does_not_import_torchrec():
    code = ("import sys; from trec.models import load_config; cfg = load_config(None, ['model.name=mf']); "
            "print(cfg.model.mf.loss, 'torchrec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["bpr", "False"]


def test_config_ranges_are_checked_when_built():
    from trec.errors import TrecError

    with pytest.raises(TrecError, match="model.mf.num_negatives"):
        load_config(None, ["model.name=mf", "model.mf.num_negatives=0"])


def test_bpr_loss_matches_a_hand_computation():
    from trec.models.mf.model import bpr_loss

    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # B = 2
    items = torch.tensor([[2.0, 0.0], [0.0, 1.0],  # the rows' positives (items 10, 11)
                          [1.0, 1.0], [0.0, 0.0], [0.0, 3.0]])  # N = 3 sampled items (12, 11, 13)
    candidate_items = torch.tensor([10, 11, 12, 11, 13])

    def nll(x: float) -> float:  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    # row 0: s_pos = 2, s_neg = 1, 0, 0; row 1: s_pos = 2, s_neg = 2, (0: its own item 11, masked), 6
    row0 = (nll(2 - 1) + nll(2 - 0) + nll(2 - 0)) / 3
    row1 = (nll(2 - 2) + nll(2 - 6)) / 2
    loss = bpr_loss(user, items, candidate_items, torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    unmasked = bpr_loss(user, items, candidate_items, torch.tensor([1.0, 1.0]), mask_hits=False)
    assert unmasked.item() == pytest.approx((row0 + (nll(0) + nll(2) + nll(-4)) / 3) / 2, rel=1e-6)


def test_non_positive_rows_weigh_nothing():
    from trec.models.mf.model import bpr_loss, l2_penalty

    torch.manual_seed(0)
    user, items, candidate_items = torch.randn(3, 4), torch.randn(3 + 5, 4), torch.arange(8)
    weights = torch.tensor([1.0, 0.0, 1.0])
    loss, penalty = bpr_loss(user, items, candidate_items, weights), l2_penalty(user, items, weights)
    changed_user, changed_items = user.clone(), items.clone()
    changed_user[1], changed_items[1] = 100.0, -100.0  # the non-positive row's user and item
    assert bpr_loss(changed_user, changed_items, candidate_items, weights).item() == pytest.approx(loss.item())
    assert l2_penalty(changed_user, changed_items, weights).item() == pytest.approx(penalty.item())
    kept = [0, 2]
    alone = bpr_loss(user[kept], torch.cat([items[kept], items[3:]]), torch.cat([candidate_items[kept],
                     candidate_items[3:]]), torch.ones(2))
    assert loss.item() == pytest.approx(alone.item())
    assert bpr_loss(user, items, candidate_items, torch.zeros(3)).item() == 0.0  # no positive: no NaN


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mf") / "synthetic"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", out, "--users", "200", "--items", "120",
                             "--interactions", "6000", "--val-fraction", "0.1", "--quiet"))
    return out


def test_encoders_give_one_row_per_batch_row_and_zeros_for_padding(tiny_data):
    from torchrec import EmbeddingCollection, KeyedJaggedTensor

    from trec.data import PreparedDataset, RecBatch
    from trec.models.mf.model import MatrixFactorization

    cfg = load_config(None, ["model.name=mf", "model.embedding_dim=8"])
    model = MatrixFactorization(cfg.model, PreparedDataset.open(tiny_data))
    # Materialised here instead of by DistributedModelParallel.
    model.embeddings = EmbeddingCollection(tables=model.embeddings.embedding_configs(), device=torch.device("cpu"))
    tables = {name: module.weight for name, module in model.embeddings.embeddings.items()}
    # Rows: (user 3, item 5), (user 7, item 1), item-only (item 9), padding.
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"], values=torch.tensor([3, 7, 5, 1, 9]),
        lengths=torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.int32))
    batch = RecBatch(dense_features=torch.zeros(4, 0), sparse_features=kjt, labels=torch.ones(2),
                     ratings=torch.zeros(2))
    with torch.no_grad():
        users, users_2, items = model.encode_users(batch), model.encode_users(batch, 2), model.encode_items(batch)
    assert users.shape == (4, 8) and users_2.shape == (2, 8) and items.shape == (4, 8)
    assert torch.equal(users[:2], tables["user_id"][[3, 7]]) and torch.equal(users_2, users[:2])
    assert torch.equal(users[2:], torch.zeros(2, 8))
    assert torch.equal(items[:3], tables["item_id"][[5, 1, 9]]) and torch.equal(items[3], torch.zeros(8))
    assert model.normalized is False


def test_mf_trains_evaluates_exports_and_searches(tiny_data, tmp_path):
    run_dir, export = tmp_path / "run", tmp_path / "export"
    for loss in ("bpr", "softmax"):  # the default loss, and the config's
        run_command(trec_command(1, "train", "--config", MF_CONFIG, "--data", tiny_data, "--run-dir",
                                 run_dir / loss, "training.max_steps=12", *TINY, f"model.mf.loss={loss}",
                                 "model.mf.l2=0.001", "model.mf.num_negatives=32", "data.batch_size=256"))
        metrics = json.loads((run_dir / loss / "metrics.json").read_text())
        assert 0.0 <= metrics["ndcg@10"] <= 1.0 and metrics["step"] == 12
    run_command(trec_command(1, "export", "--run-dir", run_dir / "softmax", "--out", export,
                             "--set", "export.index=flat"))
    user = pq.read_table(tiny_data / "mappings" / "user_id.parquet").column("raw")[0].as_py()
    found = run_command(trec_command(1, "search", "--index", export, "--run-dir", run_dir / "softmax",
                                     "--user", user, "-k", "5"))
    assert f"user {user}: top 5 of 120 items" in found.stdout
    assert len([line for line in found.stdout.splitlines() if line.strip()[:2].rstrip(".").isdigit()]) == 5


@pytest.mark.dist
def test_two_ranks_validate_mid_run_through_the_sparse_dist_pipeline(tiny_data, tmp_path):
    """An EmbeddingCollection model validated mid-run on 2 ranks: re-attaching TrainPipelineSparseDist after
    evaluation must not redo the in-flight batch's input dist (gloo failed with all-to-all size mismatches),
    and the projector after an early stop (a batch still in flight) must run on the detached model, not on
    the pipeline's lookups of that batch. A learning rate of 0 makes early stopping certain at step 4."""
    run_dir = tmp_path / "run"
    proc = run_command(trec_command(2, "train", "--config", MF_CONFIG, "--data", tiny_data, "--run-dir", run_dir,
                                    "training.max_steps=12", "training.eval_every_steps=2", *TINY,
                                    "training.early_stopping_patience=1", "optimizer.sparse_lr=0",
                                    "data.batch_size=128", "model.mf.num_negatives=32", "logging.projector_items=20"),
                       check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["step"]) == (2, 4), metrics  # stopped early, batches in flight
    assert list((run_dir / "tb").rglob("projector_config.pbtxt")), "no projector written"
