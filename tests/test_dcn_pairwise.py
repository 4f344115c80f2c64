"""The DCN ranker's pairwise (RankNet/BPR) click loss: the formula on hand-made scores, and a tiny real run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from training import TINY, run_command, trec_command

from trec.models.dcn.model import pairwise_click_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_loss_is_the_mean_softplus_over_each_users_pairs():
    # user 7: positives 2.0, 0.5 and negatives 1.0, -1.0 (one labelled, one sampled) → 4 pairs;
    # user 3: one positive 0.0, one negative 0.0 → 1 pair; user 5: positive only, user 9: negative
    # only → no pair; the padding row (-1) of user 7 is ignored although its score is huge.
    rows = [(7, 1, 2.0), (3, 0, 0.0), (7, 0, 1.0), (5, 1, 3.0), (9, 0, 4.0), (7, 1, 0.5), (3, 1, 0.0),
            (7, -1, 50.0), (7, 0, -1.0)]
    users, clicks, logits = (torch.tensor(column) for column in zip(*rows))
    loss, pairs = pairwise_click_loss(logits.float(), clicks.float(), users.long())
    expected = [softplus(n - p) for p in (2.0, 0.5) for n in (1.0, -1.0)] + [softplus(0.0)]
    assert pairs.item() == 5
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)


def test_pairwise_loss_matches_a_loop_over_pairs_and_has_gradients():
    generator = torch.Generator().manual_seed(0)
    rows = 300
    users = torch.randint(0, 40, (rows,), generator=generator)
    clicks = torch.randint(-1, 2, (rows,), generator=generator).float()
    logits = torch.randn(rows, generator=generator, requires_grad=True)
    loss, pairs = pairwise_click_loss(logits, clicks, users)
    margins = [logits[n] - logits[p] for p in range(rows) for n in range(rows)
               if users[p] == users[n] and clicks[p] == 1 and clicks[n] == 0]
    assert pairs.item() == len(margins) > 0
    expected = sum(softplus(margin.item()) for margin in margins) / len(margins)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[clicks < 0].abs().sum() == 0 and logits.grad.abs().sum() > 0


def test_no_pair_gives_zero_loss_and_zero_gradients():
    logits = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
    loss, pairs = pairwise_click_loss(logits, torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0, 1, 0]))
    loss.backward()
    assert pairs.item() == 0 and loss.item() == 0.0 and logits.grad.tolist() == [0.0, 0.0, 0.0]


def test_a_tiny_pairwise_run_learns_to_rank(ml100k_prepared, tmp_path):
    run_dir = tmp_path / "pairwise"
    proc = run_command(trec_command(
        1, "train", "--config", "configs/movielens_dcn.yaml", "--data", ml100k_prepared, "--run-dir", run_dir,
        *TINY, "training.max_steps=60", "training.eval_every_steps=60", "logging.log_every_steps=10",
        "logging.tensorboard=false", "model.dcn.loss=pairwise", "model.dcn.eval_negatives=1"))
    losses = [float(loss) for loss in re.findall(r"step \d+/60 loss (\d+\.\d+)", proc.stderr)]
    assert len(losses) == 6, proc.stderr[-3000:]
    assert losses[0] < 0.75 and sum(losses[-2:]) < sum(losses[:2]), losses  # starts near log 2, then falls
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/auc"] > 0.5 and metrics["auc"] > 0.5, metrics


def test_an_unknown_loss_is_refused(ml100k_prepared, tmp_path, capsys):
    from trec.cli import main  # in this process: the config is refused before any model is built

    status = main(["train", "--config", "configs/movielens_dcn.yaml", "--data", str(ml100k_prepared),
                   "--run-dir", str(tmp_path / "r"), "model.dcn.loss=listwise"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "model.dcn.loss" in errors[0], errors
