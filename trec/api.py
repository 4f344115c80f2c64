"""The Python API: what ``import trec`` gives, for a script or a notebook (README "Python API").

    import trec

    cfg = trec.load_config("movielens_two_tower", ["training.max_steps=200"])  # a file, or a config trec ships
    outcome = trec.train(cfg, "data/ml100k", "runs/tt")     # TrainOutcome: .status, .step, .metrics (test)
    manifest = trec.export("runs/tt", "exports/tt")         # sharded FAISS index + servable bundle
    metrics = trec.evaluate("runs/tt", index="exports/tt")  # exact and index/... metrics, also in metrics.json
    recommender = trec.Recommender.load("exports/tt")       # what `trec serve` answers with

``train``, ``evaluate`` (here) and ``export`` (:func:`trec.export.encode.export_trained_run`) are the
`trec` commands of the same name without their printing: the commands call them. Each runs in this
process as a group of one, or collectively when the script runs under torchrun (every rank calls
it; rank 0 writes the files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from trec.errors import TrecError

if TYPE_CHECKING:
    from trec.config import TrecConfig
    from trec.export import ShardedIndex
    from trec.trainer import TrainOutcome

PathLike = Union[str, os.PathLike]


def training_config(config: TrecConfig | PathLike | None, data: PathLike | None, run_dir: PathLike,
                    overrides: Sequence[str] = ()) -> TrecConfig:
    """What a run trains with: ``config`` with ``overrides``, and ``data`` (a prepared dataset) as ``data.path``.

    ``config`` is a :class:`~trec.config.TrecConfig`, a YAML file or the name of a config trec ships
    (``movielens_two_tower``); None takes the run's own config.yaml, to resume or extend the run.
    ``data.path`` is made absolute, so that the run's config.yaml finds the data from any directory.
    """
    from trec.config import TrecConfig, apply_overrides
    from trec.models import load_config

    run_dir = Path(run_dir)
    if isinstance(config, TrecConfig):
        source, cfg = "config", apply_overrides(config, overrides)
    else:
        source = config or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
        if source is None:
            raise TrecError(f"no --config given and {run_dir / 'config.yaml'} does not exist")
        cfg = load_config(source, overrides)
    if data:
        cfg.data.path = str(data)
    if not cfg.data.path:
        raise TrecError(f"{source}: data.path is empty; pass --data DIR (a prepared dataset)")
    cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg


def train(config: TrecConfig | PathLike | None, data: PathLike | None, run_dir: PathLike,
          overrides: Sequence[str] = ()) -> TrainOutcome:
    """Train into ``run_dir`` (`trec train`): resume from its newest complete checkpoint if it has one, then
    evaluate on the test split and write RUN/metrics.json.

    ``config``, ``data`` and ``overrides`` as in :func:`training_config`. Returns the
    :class:`~trec.trainer.TrainOutcome`: ``status`` is ``trained``, ``finished`` (the run had already
    finished: nothing trained) or ``stopped`` (SIGTERM: checkpointed, resumable); ``metrics`` holds the
    test metrics (``ndcg@10``, ...).
    """
    from trec.distributed import distributed_session
    from trec.trainer import train as train_run

    cfg = training_config(config, data, run_dir, overrides)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        return train_run(cfg, Path(run_dir), ctx)


def open_index(path: PathLike, nprobe: int | None = None, ef_search: int | None = None) -> ShardedIndex:
    """The FAISS export at ``path`` (``trec export --out``), searched with ``nprobe`` IVF lists / an HNSW
    candidate list of ``ef_search`` where given (default: the export's own)."""
    from trec.export import ShardedIndex

    index = ShardedIndex.load(path)
    # `is not None`: 0 and negatives reach the setters, which refuse them (0 is not "the default").
    if nprobe is not None:
        index.nprobe = nprobe
    if ef_search is not None:
        index.ef_search = ef_search
    return index


def evaluate(run_dir: PathLike, split: str = "test", *, index: ShardedIndex | PathLike | None = None,
             ranker_run_dir: PathLike | None = None, candidates: int = 100,
             overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate the run's best (or newest) checkpoint on ``split`` (`trec evaluate`); returns the metrics and
    merges them into RUN/metrics.json (test metrics under their plain keys, another split's as ``SPLIT/...``).

    Args:
        run_dir: a trained run (``trec train --run-dir``).
        split: the split to evaluate.
        index: a FAISS export of the run (a directory, or an index from :func:`open_index`): ``index/...``
            metrics beside the exact ones, and the index's ANN recall@K against exact search.
        ranker_run_dir: two-stage: ``run_dir`` (a two-tower) retrieves ``candidates`` items per user through
            ``index`` (exact search without it) and this ranker run re-ranks them; ``retrieval/...`` and
            ``two_stage/...`` metrics go into the ranker's metrics.json.
        candidates: two-stage: items retrieved per user.
        overrides: dotted keys applied to the run's config (the ranker's, for two-stage).
    """
    if isinstance(index, (str, os.PathLike)):
        index = open_index(index)
    if ranker_run_dir is not None:
        return _evaluate_two_stage(Path(run_dir), Path(ranker_run_dir), split, candidates, overrides, index)
    from trec.distributed import distributed_session
    from trec.evaluation.protocol import excluded_splits
    from trec.models import EvaluationRequest, model_spec
    from trec.runs import check_index_binding, load_trained_run, retriever_of_run, run_config

    cfg = run_config(Path(run_dir), overrides)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        loaded = load_trained_run(Path(run_dir), ctx, overrides)
        if not loaded.dataset.has_split(split):
            raise TrecError(f"{cfg.data.path}: no '{split}' split")
        exclusions = excluded_splits(loaded.dataset, split)
        if index is not None:
            retriever_of_run(loaded)
            check_index_binding(index, loaded)
        request = EvaluationRequest(split, exclusions, cfg.evaluation, cfg.data, cfg.training.seed, index)
        metrics = model_spec(cfg.model.name).evaluate(loaded.task, loaded.dataset, request, ctx)
        if ctx.is_main:
            loaded.run.merge_metrics(metrics | {"evaluated_checkpoint": str(loaded.checkpoint)}, split_prefix(split))
    return metrics


def split_prefix(split: str) -> str:
    """Test metrics keep the plain keys (``ndcg@10``); other splits' are prefixed (``val/ndcg@10``)."""
    return "" if split == "test" else f"{split}/"


def _evaluate_two_stage(run_dir: Path, ranker_run_dir: Path, split: str, candidates: int, overrides: Sequence[str],
                        index: ShardedIndex | None) -> dict[str, float]:
    """Retrieve with ``run_dir``, re-rank with ``ranker_run_dir``, write both rows to the ranker's metrics.json."""
    from trec.distributed import distributed_session
    from trec.runs import RunDir, run_config
    from trec.two_stage import evaluate_two_stage_runs

    if candidates < 1:
        raise TrecError(f"--candidates: expected a positive number, got {candidates}")
    ranker_dir = RunDir(ranker_run_dir)
    cfg = run_config(ranker_dir.root, overrides)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        metrics = evaluate_two_stage_runs(run_dir, ranker_dir.root, ctx, split, candidates, list(overrides), index)
        if index is not None:
            metrics["two_stage/index"] = str(Path(index.root).resolve())
        if ctx.is_main:
            ranker_dir.merge_metrics(metrics, split_prefix(split))
    return metrics
