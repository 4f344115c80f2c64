"""Model registry: each model name maps to its task builder and its evaluation.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, outputs)``; it may carry
an ``augment`` reader hook (negative sampling). A model may also register a ``setup`` step that
the loop runs once after sharding (e.g. the ranker mines hard negatives with a trained
retriever). The one training loop (trec.trainer) runs any task; models differ only by what is
registered here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from trec.config import ModelConfig
from trec.errors import TrecError


@dataclass(frozen=True)
class ModelSpec:
    build_task: Callable[..., nn.Module]
    """(ModelConfig, PreparedDataset) → task module (embedding tables on the meta device)."""
    evaluate: Callable[..., dict[str, float]]
    """(task, dataset, split, exclude_splits, TrecConfig, DistContext) → metrics."""
    default_metric: str
    """Metric used for early stopping when training.early_stopping_metric is empty."""
    setup: Callable[..., None] | None = None
    """(task, TrecConfig, dataset, DistContext, run_dir) → None: collective, after sharding and
    before the first training batch is read; runs again on resume."""


def _registry() -> dict[str, ModelSpec]:
    # Imported lazily: building the parser or reading a config must not import torchrec models.
    from trec.models.dcn.model import build_dcn_task, evaluate_dcn, setup_dcn
    from trec.models.two_tower.model import build_two_tower_task, evaluate_two_tower

    return {
        "two_tower": ModelSpec(build_two_tower_task, evaluate_two_tower, "ndcg@10"),
        "dcn": ModelSpec(build_dcn_task, evaluate_dcn, "auc", setup=setup_dcn),
    }


def model_spec(cfg: ModelConfig) -> ModelSpec:
    registry = _registry()
    name = str(cfg.name)
    if name not in registry:
        raise TrecError(f"model.name: '{name}' is not available (choose from: {', '.join(registry)})")
    return registry[name]
