"""Two-stage recommendation: retrieve N candidates with a retrieval run, re-rank them with a ranker.

    with distributed_session(...) as ctx:
        metrics = evaluate_two_stage_runs(RETRIEVAL_RUN, RANKER_RUN, ctx, num_candidates=100)

Both runs are loaded from their best (or newest) checkpoint and sharded with DMP in the same
process group. Candidates come from a :data:`~trec.evaluation.candidates.CandidateGenerator`
(:func:`retrieval_candidates`): the retriever's user encoder ranked through a top-k source,
exact over the whole catalog or a FAISS index from ``trec export``. The same exact generator
serves ``trec recommend``; the ranker's hard negatives are mined by
:mod:`trec.evaluation.candidates`.

Metrics are computed with :class:`trec.metrics.RankingAccumulator`, exactly as retrieval
evaluation does, once for the candidates in retrieval order (``retrieval/``) and once in the
ranker's order (``two_stage/``); ``retrieval/recall@N`` is the recall of the candidate set,
the ceiling of any re-ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trec.config import Gain
from trec.data import PreparedDataset
from trec.distributed import DistContext, dist_max
from trec.errors import TrecError
from trec.evaluation.candidates import CandidateGenerator, Scorer, rerank, retrieve_candidates, user_batches
from trec.evaluation.protocol import excluded_splits
from trec.evaluation.retrieval import encode_all_items, evaluated_users, graded_truth
from trec.evaluation.topk import exact_topk, index_topk
from trec.metrics import RankingAccumulator, topk_gains, topk_hits
from trec.runs import TrainedRun, check_index_binding, load_trained_run, retriever_of_run, run_config

# --------------------------------------------------------------------------------------------
# loading runs
# --------------------------------------------------------------------------------------------


def load_run(run_dir: Path, dataset: PreparedDataset, ctx: DistContext, overrides: Sequence[str] = ()) -> TrainedRun:
    """:func:`trec.runs.load_trained_run`, checked to be trained on ``dataset`` (the same prepared
    files, and the fingerprint its run.json records), since both stages share item and user
    indices (collective)."""
    cfg = run_config(Path(run_dir), overrides)
    check_same_dataset(Path(cfg.data.path), dataset, Path(run_dir) / "config.yaml")
    return load_trained_run(Path(run_dir), ctx, overrides, dataset)


def check_same_dataset(path: Path, dataset: PreparedDataset, where: Path) -> None:
    """TrecError unless the prepared dataset at ``path`` is ``dataset`` or a copy of its files."""
    if path.resolve() == dataset.path.resolve():
        return
    other = PreparedDataset.open(path)
    digest = {name: entry.get("sha256") for name, entry in other.manifest["files"].items()}
    ours = {name: entry.get("sha256") for name, entry in dataset.manifest["files"].items()}
    if digest != ours:
        raise TrecError(f"{where}: data.path {other.path} is not the dataset {dataset.path} (different files); "
                        "both stages must be trained on the same prepared dataset")


def ranker_of(run: TrainedRun, dataset: PreparedDataset, ctx: DistContext) -> Scorer:
    """The click-logit scorer of a loaded ranker run (TrecError for any other model)."""
    from trec.models.dcn.model import RankingTask, ranker_scorer

    if not isinstance(run.task, RankingTask):
        raise TrecError(f"{run.run.root}: a dcn (ranker) run is needed (model.name is '{run.cfg.model.name}')")
    return ranker_scorer(run.task, dataset, run.cfg.data.history_max_len, ctx.device)


# --------------------------------------------------------------------------------------------
# candidates and re-ranking
# --------------------------------------------------------------------------------------------


def retrieval_candidates(retriever: TrainedRun, dataset: PreparedDataset, exclude_splits: Sequence[str],
                         ctx: DistContext, index=None) -> tuple[CandidateGenerator, torch.Tensor]:
    """(top-N generator of a loaded retrieval run, the ``I X D`` item embeddings of its item encoder).

    Exact search over the whole catalog, or through ``index`` (a :class:`trec.export.ShardedIndex`,
    refused unless it holds this run's vectors). The items a user has in ``exclude_splits`` are
    never candidates.
    """
    encoders = retriever_of_run(retriever)
    if index is not None:
        check_index_binding(index, retriever)  # vectors of this run, checkpoint, dataset
    data_cfg = retriever.cfg.data
    items = encode_all_items(encoders.encode_items, dataset, data_cfg.eval_batch_size, ctx, data_cfg.history_max_len)
    topk = exact_topk(items) if index is None else index_topk(index, dataset.num_items)
    exclusions = dataset.user_items(list(exclude_splits)) if exclude_splits else None
    return retrieve_candidates(encoders.encode_users, topk, exclusions, dataset.num_items), items


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_two_stage(generate: CandidateGenerator, score: Scorer, dataset: PreparedDataset, split: str,
                       ks: Sequence[int], num_candidates: int, retriever_data_cfg,
                       ranker_batch_rows: int, ctx: DistContext, item_embeddings: torch.Tensor | None = None,
                       max_users: int = 0, seed: int = 0, retrieval_weight: float = 0.0,
                       gain: Gain = Gain.binary) -> dict[str, float]:
    """Retrieval-only and two-stage top-K metrics on ``split`` (collective).

    Args:
        generate: candidate generator (it leaves out the items of the splits before ``split``).
        score: the ranker's scorer.
        ks: cut-offs (each <= num_candidates); ``retrieval/`` also gets num_candidates itself.
        retriever_data_cfg: the retrieval run's ``data`` section (user batches, history length).
        item_embeddings: ``I X D`` for the diversity metric (the retriever's item tower), or None.
        retrieval_weight: weight of the retrieval score in the two-stage order (see :func:`rerank`).
        gain: evaluation.gain; graded NDCG as in :func:`trec.evaluation.evaluate_retrieval`.
    Returns:
        {"retrieval/ndcg@10": ..., "two_stage/ndcg@10": ..., ...}.
    """
    num_items = dataset.num_items
    if not ks or max(ks) > num_candidates or num_candidates > num_items:
        raise TrecError(f"--candidates {num_candidates} must be >= every evaluation.ks value ({list(ks)}) "
                        f"and <= the catalog's {num_items} items")
    users, truth = evaluated_users(dataset, split, max_users, seed)
    truth_labels = dataset.user_positive_labels(split)[1] if gain == Gain.graded else None
    retrieval = RankingAccumulator([*ks, num_candidates], num_items, ctx.device)
    two_stage = RankingAccumulator(ks, num_items, ctx.device)
    for selected, batch in user_batches(dataset, users, retriever_data_cfg, ctx):
        candidates, candidate_scores = generate(selected, batch, num_candidates)
        # Padding rows trail each batch: re-rank only as many rows as the fullest rank has.
        live = dist_max(int((selected >= 0).sum()))
        selected, candidates, candidate_scores = selected[:live], candidates[:live], candidate_scores[:live]
        reranked, reranked_scores = rerank(score, selected, candidates, candidate_scores, ranker_batch_rows,
                                           retrieval_weight)
        # A filler (-inf: an excluded item when fewer than n remain) is no recommendation.
        candidates = candidates.masked_fill(torch.isneginf(candidate_scores), -1)
        reranked = reranked.masked_fill(torch.isneginf(reranked_scores), -1)
        real = np.flatnonzero(selected >= 0)
        rows = selected[real]
        if len(rows) == 0:
            continue
        relevant = torch.as_tensor(truth.keys(rows, num_items), device=ctx.device)
        num_relevant = torch.as_tensor(truth.lengths[rows], device=ctx.device)
        keep = torch.as_tensor(real, device=ctx.device)
        graded = None
        if truth_labels is not None:
            graded = graded_truth(truth, truth_labels, rows, num_candidates, ctx.device)
        for accumulator, lists in ((retrieval, candidates[keep]), (two_stage, reranked[keep])):
            gains = None if graded is None else topk_gains(lists, relevant, graded[0], num_items)
            accumulator.add(lists, topk_hits(lists, relevant, num_items), num_relevant, item_embeddings,
                            gains, None if graded is None else graded[1])
    metrics = {f"retrieval/{k}": v for k, v in retrieval.compute().items()}
    metrics.update({f"two_stage/{k}": v for k, v in two_stage.compute().items()})
    return metrics


def evaluate_two_stage_runs(retrieval_dir: Path, ranker_dir: Path, ctx: DistContext, split: str = "test",
                            num_candidates: int = 100, overrides: Sequence[str] = (), index=None) -> dict[str, float]:
    """Load both runs (sharded, same process group) and evaluate them two-stage on ``split``.

    The ranker run's config supplies the dataset, ``evaluation`` (ks, max_users) and the
    exclusions (train and val for test, train otherwise). With ``index`` (a FAISS export of the
    retrieval run, :class:`trec.export.ShardedIndex`) candidates are retrieved through it instead
    of exact search.
    """
    ranker = load_trained_run(Path(ranker_dir), ctx, overrides)
    dataset = ranker.dataset
    score = ranker_of(ranker, dataset, ctx)
    if not dataset.has_split(split):
        raise TrecError(f"{dataset.path}: no '{split}' split")
    exclusions = excluded_splits(dataset, split)
    retriever = load_run(Path(retrieval_dir), dataset, ctx)
    generate, items = retrieval_candidates(retriever, dataset, exclusions, ctx, index)
    evaluation, weight = ranker.cfg.evaluation, ranker.cfg.model.dcn.retrieval_weight
    metrics = evaluate_two_stage(
        generate, score, dataset, split, evaluation.ks, num_candidates,
        retriever.cfg.data, ranker.cfg.data.eval_batch_size, ctx, items, evaluation.max_users, ranker.cfg.training.seed,
        weight, evaluation.gain,
    )
    return metrics | {
        "two_stage/retrieval_weight": weight,
        "two_stage/retrieval_run": str(retriever.run.root),
        "two_stage/retrieval_checkpoint": str(retriever.checkpoint),
        "two_stage/ranker_checkpoint": str(ranker.checkpoint),
        "two_stage/candidates": num_candidates,
        "two_stage/split": split,
    }


# --------------------------------------------------------------------------------------------
# one user's recommendations
# --------------------------------------------------------------------------------------------


@dataclass
class Recommendation:
    item: int
    retrieval_rank: int
    """1-based position in the retriever's list."""
    retrieval_score: float
    ranker_score: float | None
    """The two-stage score (ranker logit, plus the weighted retrieval score if so configured)."""


@torch.no_grad()
def recommend_for_user(user: int, retriever: TrainedRun, score: Scorer | None, dataset: PreparedDataset,
                       exclude_splits: Sequence[str], k: int, num_candidates: int, ctx: DistContext,
                       retrieval_weight: float = 0.0) -> list[Recommendation]:
    """Top ``k`` items for one user index: exact retrieval of ``num_candidates``, re-ranked by
    ``score`` (plus ``retrieval_weight`` X the retrieval score) when given (collective)."""
    generate, _ = retrieval_candidates(retriever, dataset, exclude_splits, ctx)
    n = max(num_candidates, k)
    result: list[Recommendation] = []
    for selected, batch in user_batches(dataset, np.array([user], np.int64), retriever.cfg.data, ctx):
        candidates, candidate_scores = generate(selected, batch, n)
        if score is not None:
            reranked, ranker_scores = rerank(score, selected, candidates, candidate_scores, 4096, retrieval_weight)
        mine = np.flatnonzero(selected == user)
        if len(mine) == 0:
            continue
        row = int(mine[0])
        retrieved = candidates[row].tolist()
        position = {item: index for index, item in enumerate(retrieved)}
        order = reranked[row].tolist() if score is not None else retrieved
        for index, item in enumerate(order[:k]):
            if torch.isneginf(candidate_scores[row, position[item]]):
                break
            result.append(Recommendation(item, position[item] + 1, candidate_scores[row, position[item]].item(),
                                         ranker_scores[row, index].item() if score is not None else None))
    return result
