"""Two-stage recommendation: retrieve N candidates with a two-tower run, re-rank them with a ranker.

    with distributed_session(...) as ctx:
        metrics = evaluate_two_stage_runs(RETRIEVAL_RUN, RANKER_RUN, ctx, num_candidates=100)

Both runs are loaded from their best (or newest) checkpoint and sharded with DMP in the same
process group. Candidate generation is pluggable: a :data:`CandidateGenerator` maps a batch of
users to their top-N items; :func:`exact_candidates` scores the whole catalog with the
two-tower, and an approximate one (a FAISS index from ``trec export``) can be passed instead
through ``make_generator``. The same exact generator mines the ranker's hard negatives
(:func:`load_or_mine_hard_candidates`) and serves ``trec recommend``.

Metrics are computed with :class:`trec.metrics.RankingAccumulator`, exactly as retrieval
evaluation does, once for the candidates in retrieval order (``retrieval/``) and once in the
ranker's order (``two_stage/``); ``retrieval/recall@N`` is the recall of the candidate set,
the ceiling of any re-ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from data_pipeline.layout import SPLITS, USER_ID
from trec.data import PreparedDataset, RecBatch, check_indices
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.config import Gain
from trec.evaluation.retrieval import (SCORE_CHUNK_ELEMENTS, csr_pairs, encode_all_items, entity_batches, evaluated_users,
                             graded_truth)
from trec.io import atomic_path
from trec.metrics import RankingAccumulator, topk_gains, topk_hits
from trec.checkpoint import checkpoint_for_inference, read_trainer_state
from trec.runs import TrainedRun, check_index_binding, dataset_fingerprint, load_trained_run, run_config, two_tower_of

logger = logging.getLogger("trec")

CandidateGenerator = Callable[[np.ndarray, RecBatch, int], tuple[torch.Tensor, torch.Tensor]]
"""(users (R,) with -1 padding, their user-encoder batch of R rows, n) → (R X n item indices,
best first; R X n scores, -inf where a user has fewer than n eligible items). Items of the
excluded splits never appear (except with a -inf score). Collective: every rank calls it once per
batch, the same number of times."""

Scorer = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""(users (M,), items (M,)) → (M,) ranker scores. Collective: M is the same on every rank."""

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
# candidate generation
# --------------------------------------------------------------------------------------------


def exact_candidates(retriever: TrainedRun, dataset: PreparedDataset, exclude_splits: Sequence[str],
                     ctx: DistContext) -> tuple[CandidateGenerator, torch.Tensor]:
    """(exact top-N generator over the whole catalog, the ``I X D`` item embeddings it scores).

    The items a user has in ``exclude_splits`` are never candidates.
    """
    tower = two_tower_of(retriever)
    data_cfg = retriever.cfg.data
    items = encode_all_items(tower.item_embeddings, dataset, data_cfg.eval_batch_size, ctx, data_cfg.history_max_len)
    exclusions = dataset.user_items(list(exclude_splits)) if exclude_splits else None
    num_items = dataset.num_items

    @torch.no_grad()
    def generate(users: np.ndarray, batch: RecBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = tower.user_embeddings(batch)
        found, scores = [], []
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(num_items, 1))
        for start in range(0, len(users), chunk):
            rows = users[start : start + chunk]
            block = embeddings[start : start + chunk] @ items.T
            if exclusions is not None:
                # Padding rows (-1) exclude nothing.
                real = np.flatnonzero(rows >= 0)
                positions, values = csr_pairs(exclusions[0], exclusions[1], rows[real])
                block.view(-1)[torch.as_tensor(real[positions] * num_items + values, device=ctx.device)] = -torch.inf
            top = block.topk(min(n, num_items), dim=1)
            found.append(top.indices)
            scores.append(top.values)
        return torch.cat(found), torch.cat(scores)

    return generate, items


def index_candidates(index) -> Callable[..., CandidateGenerator]:
    """``make_generator`` that retrieves through a FAISS export (trec.export.ShardedIndex) of the
    retriever's items instead of scoring the whole catalog."""

    def make(retriever: TrainedRun, dataset: PreparedDataset, exclude_splits: Sequence[str],
             ctx: DistContext) -> CandidateGenerator:
        from trec.evaluation.retrieval import search_excluding

        tower = two_tower_of(retriever)
        check_index_binding(index, retriever)  # vectors of this run, checkpoint, dataset
        exclusions = dataset.user_items(list(exclude_splits)) if exclude_splits else None
        num_items = dataset.num_items

        @torch.no_grad()
        def generate(users: np.ndarray, batch: RecBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            embeddings = tower.user_embeddings(batch)  # collective: every rank encodes its batch
            excluded = None
            if exclusions is not None:
                real = np.flatnonzero(users >= 0)
                positions, values = csr_pairs(exclusions[0], exclusions[1], users[real])
                excluded = torch.as_tensor(np.sort(real[positions] * num_items + values), device=embeddings.device)
            return search_excluding(index, embeddings, excluded, n, num_items)

        return generate

    return make


def user_batches(dataset: PreparedDataset, users: np.ndarray, data_cfg, ctx: DistContext):
    """This rank's slice of ``users`` as user-encoder batches (see trec.evaluation.entity_batches)."""
    return entity_batches(dataset, users, "user", data_cfg.eval_batch_size, ctx, data_cfg.history_max_len)


def rerank(score: Scorer, users: np.ndarray, candidates: torch.Tensor, candidate_scores: torch.Tensor,
           chunk_rows: int, retrieval_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of each row in the two-stage order: (R X n items, R X n two-stage scores).

    The two-stage score is the ranker's plus ``retrieval_weight`` times the retrieval score.
    Rows are scored in chunks of about ``chunk_rows`` (user, item) pairs; the chunk count
    depends only on R and n, so every rank calls the (collective) scorer equally often.
    Candidates with a -inf retrieval score (fillers) stay last.
    """
    rows, n = candidates.shape
    flat_users = np.repeat(users, n)
    flat_items = candidates.reshape(-1).cpu().numpy()
    per_chunk = max(1, chunk_rows // max(n, 1)) * n
    parts = [score(flat_users[start : start + per_chunk], flat_items[start : start + per_chunk])
             for start in range(0, rows * n, per_chunk)]
    scores = (torch.cat(parts).reshape(rows, n).float() if parts else torch.zeros(rows, n)).to(candidates.device)
    filler = torch.isneginf(candidate_scores)
    if retrieval_weight:
        scores = scores + retrieval_weight * candidate_scores.masked_fill(filler, 0.0)
    scores = scores.masked_fill(filler, -torch.inf)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return candidates.gather(1, order), scores.gather(1, order)


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
    users, (truth_offsets, truth_items) = evaluated_users(dataset, split, max_users, seed)
    truth_labels = dataset.user_positive_labels(split)[2] if gain == Gain.graded else None
    retrieval = RankingAccumulator([*ks, num_candidates], num_items, ctx.device)
    two_stage = RankingAccumulator(ks, num_items, ctx.device)
    for selected, batch in user_batches(dataset, users, retriever_data_cfg, ctx):
        candidates, candidate_scores = generate(selected, batch, num_candidates)
        # Padding rows trail each batch: re-rank only as many rows as the fullest rank has.
        live = _max_across_ranks(int((selected >= 0).sum()), ctx)
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
        positions, values = csr_pairs(truth_offsets, truth_items, rows)
        relevant = torch.as_tensor(np.sort(positions * num_items + values), device=ctx.device)
        num_relevant = torch.as_tensor(np.diff(truth_offsets)[rows], device=ctx.device)
        keep = torch.as_tensor(real, device=ctx.device)
        graded = None
        if truth_labels is not None:
            graded = graded_truth(truth_offsets, truth_labels, rows, num_candidates, ctx.device)
        for accumulator, lists in ((retrieval, candidates[keep]), (two_stage, reranked[keep])):
            gains = None if graded is None else topk_gains(lists, relevant, graded[0], num_items)
            accumulator.add(lists, topk_hits(lists, relevant, num_items), num_relevant, item_embeddings,
                            gains, None if graded is None else graded[1])
    metrics = {f"retrieval/{k}": v for k, v in retrieval.compute().items()}
    metrics.update({f"two_stage/{k}": v for k, v in two_stage.compute().items()})
    return metrics


def _max_across_ranks(value: int, ctx: DistContext) -> int:
    if not (dist.is_initialized() and ctx.world_size > 1):
        return value
    tensor = torch.tensor([value], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def evaluate_two_stage_runs(retrieval_dir: Path, ranker_dir: Path, ctx: DistContext, split: str = "test",
                            num_candidates: int = 100, overrides: Sequence[str] = (),
                            make_generator: Callable[..., CandidateGenerator] | None = None) -> dict[str, float]:
    """Load both runs (sharded, same process group) and evaluate them two-stage on ``split``.

    The ranker run's config supplies the dataset, ``evaluation`` (ks, max_users) and the
    exclusions (train and val for test, train otherwise). ``make_generator(retriever, dataset,
    exclude_splits, ctx) -> CandidateGenerator`` replaces exact retrieval (e.g. a FAISS index).
    """
    from trec.trainer import excluded_splits

    ranker = load_trained_run(Path(ranker_dir), ctx, overrides)
    dataset = ranker.dataset
    score = ranker_of(ranker, dataset, ctx)
    if not dataset.has_split(split):
        raise TrecError(f"{dataset.path}: no '{split}' split")
    exclusions = excluded_splits(dataset, split)
    retriever = load_run(Path(retrieval_dir), dataset, ctx)
    if make_generator is None:
        generate, items = exact_candidates(retriever, dataset, exclusions, ctx)
    else:
        generate = make_generator(retriever, dataset, exclusions, ctx)
        data_cfg = retriever.cfg.data
        items = encode_all_items(two_tower_of(retriever).item_embeddings, dataset, data_cfg.eval_batch_size, ctx,
                                 data_cfg.history_max_len)
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
# hard negatives for the ranker
# --------------------------------------------------------------------------------------------


def mine_hard_candidates(retriever: TrainedRun, dataset: PreparedDataset, top_n: int, skip: int,
                         ctx: DistContext) -> tuple[np.ndarray, np.ndarray]:
    """Each user's ``top_n`` highest-scored items that are not in the user's training data, after
    the first ``skip`` of them.

    Returns a CSR (offsets (U+1,), items), identical on every rank (collective: each rank
    retrieves for its slice of the users, the slices are summed across ranks).
    """
    generate, _ = exact_candidates(retriever, dataset, ["train"], ctx)
    users = np.arange(dataset.num_users, dtype=np.int64)
    n = min(skip + top_n, dataset.num_items)
    table = torch.full((dataset.num_users, n), 0, dtype=torch.int64, device=ctx.device)
    valid = torch.zeros((dataset.num_users, n), dtype=torch.int64, device=ctx.device)
    for selected, batch in user_batches(dataset, users, retriever.cfg.data, ctx):
        items, scores = generate(selected, batch, n)
        real = torch.as_tensor(selected >= 0, device=ctx.device)
        rows = torch.as_tensor(selected, device=ctx.device)[real]
        table[rows] = items[real]
        valid[rows] = (~torch.isneginf(scores[real])).long()
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(table)  # each row was filled by exactly one rank
        dist.all_reduce(valid)
    keep = valid.bool().cpu()
    keep[:, :skip] = False
    offsets = np.zeros(dataset.num_users + 1, np.int64)
    np.cumsum(keep.sum(dim=1).numpy(), out=offsets[1:])
    return offsets, table.cpu()[keep].numpy()


def load_or_mine_hard_candidates(cache: Path, retrieval_dir: Path, top_n: int, skip: int, dataset: PreparedDataset,
                                 ctx: DistContext) -> tuple[np.ndarray, np.ndarray]:
    """Hard candidates from ``cache`` if it was mined from ``retrieval_dir``'s current inference
    checkpoint on this dataset with the same ``top_n`` and ``skip``; otherwise mined now with that
    checkpoint and written to ``cache`` (Parquet, atomically, by rank 0). Collective."""
    source = str(Path(retrieval_dir).resolve())
    checkpoint = checkpoint_for_inference(Path(retrieval_dir))
    # Keyed by the retriever's checkpoint and the dataset too: a retrained retriever or a
    # re-prepared dataset must not reuse candidates mined from the old ones.
    settings = {"retrieval_run": source, "top_n": str(top_n), "skip": str(skip),
                "retrieval_checkpoint": f"{checkpoint.name}@{read_trainer_state(checkpoint).step}",
                "dataset_fingerprint": dataset_fingerprint(dataset)}
    cached = _read_hard_candidates(cache, settings, dataset.num_users, dataset.num_items)
    if cached is not None:
        logger.info("hard negatives: reusing %s (mined from %s)", cache, source)
        return cached
    retriever = load_run(Path(retrieval_dir), dataset, ctx)
    offsets, items = mine_hard_candidates(retriever, dataset, top_n, skip, ctx)
    del retriever
    if ctx.is_main:
        _write_hard_candidates(cache, offsets, items, settings)
    barrier()
    logger.info("hard negatives: mined the top %d non-train items (after the first %d) of %d users from %s → %s",
                top_n, skip, dataset.num_users, source, cache)
    return offsets, items


def _write_hard_candidates(path: Path, offsets: np.ndarray, items: np.ndarray, settings: dict[str, str]) -> None:
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()).cast(pa.int32()), pa.array(items, pa.int64()))
    table = pa.table({"user": pa.array(np.arange(len(offsets) - 1), pa.int64()), "items": lists})
    table = table.replace_schema_metadata(settings)
    with atomic_path(path) as tmp:  # readers see the whole file or none
        pq.write_table(table, tmp)


def _read_hard_candidates(path: Path, settings: dict[str, str], num_users: int, num_items: int):
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise TrecError(f"{path}: not a readable hard-negatives cache ({error}); delete it to mine again") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if any(meta.get(key) != value for key, value in settings.items()) or table.num_rows != num_users:
        logger.warning("hard negatives: %s was mined with other settings (%s); mining again", path, meta)
        return None
    if "items" not in table.column_names or not pa.types.is_list(table["items"].type):
        raise TrecError(f"{path}: no list column 'items'; delete it to mine again")
    column = table["items"].combine_chunks()
    check_indices(column.flatten(), 0, num_items, path, "items")  # FBGEMM would clamp a bad index silently
    offsets = column.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], column.flatten().to_numpy().astype(np.int64)


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
    generate, _ = exact_candidates(retriever, dataset, exclude_splits, ctx)
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


# --------------------------------------------------------------------------------------------
# one user, as `trec search` and `trec recommend` serve them
# --------------------------------------------------------------------------------------------


@dataclass
class ServedUser:
    """A raw user ID resolved the one way both single-user commands resolve it."""

    raw: str
    index: int | None
    """The user's row; None for an unknown user (not in the dataset's ID mapping) or one with no
    positive training row (label >= data.positive_threshold): both get the popularity fallback
    (:func:`popular_items`)."""
    exclude_splits: list[str]
    """Splits whose items the user is never recommended: every split of the dataset, or none
    with ``include_seen``."""
    seen: np.ndarray
    """The items of ``exclude_splits`` for this user (sorted, unique; empty for an unknown user)."""


def check_k(k: int, num_items: int) -> None:
    """One line for a -k the catalog cannot fill, before anything sized by k is built."""
    if k < 1:
        raise TrecError(f"-k: expected a positive number, got {k}")
    if k > num_items:
        raise TrecError(f"k={k} exceeds the catalog of {num_items:,} items; use -k {num_items} or less")


def serve_user(dataset: PreparedDataset, raw_user: str, include_seen: bool = False) -> ServedUser:
    """Resolve ``raw_user`` and the items it must not be recommended (see :class:`ServedUser`).

    Seen items are those the dataset records for the user in any split (train, val and test):
    a served user is past the evaluation protocol, so everything they interacted with is known.
    On a hash-mapped dataset the user's row is its bucket, so IDs sharing it share exclusions.
    """
    splits = [] if include_seen else [split for split in SPLITS if dataset.has_split(split)]
    try:
        user = dataset.lookup_index(USER_ID, raw_user)
    except TrecError:
        return ServedUser(str(raw_user), None, splits, np.zeros(0, np.int64))
    seen = np.zeros(0, np.int64)
    if splits:
        offsets, items = dataset.user_items(splits)
        seen = items[offsets[user] : offsets[user + 1]]
    # A user is personalised only with a positive training row: non-positive rows weigh 0 in the
    # retriever's loss, so a user with none has an untrained embedding and no history.
    positives = dataset.user_items(["train"], positives=True)[0]
    known = positives[user + 1] > positives[user]
    return ServedUser(str(raw_user), user if known else None, splits, seen)


def popular_items(dataset: PreparedDataset, k: int, exclude: np.ndarray) -> np.ndarray:
    """The ``k`` items with the most training interactions, most first, none of ``exclude`` (≤ k items)."""
    order = np.argsort(-dataset.item_counts, kind="stable")
    return order[~np.isin(order, exclude)][:k]
