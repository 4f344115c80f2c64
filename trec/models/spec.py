"""The model contract: what a model gives the one training loop, and the registry that finds it.

A model is a package (one folder under trec/models/, or anywhere for an out-of-tree model) that
defines ``SPEC``, a :class:`ModelSpec`, and owns its config section (``model.<name>``, a
dataclass). Everything else (trainer, export, evaluation, TensorBoard, CLI) works on the
*roles* a model's task plays, never on a model's name or config section:

- every task is a :class:`Task`: ``forward(batch) -> (loss, outputs)``, optionally with an
  ``augment`` reader hook (negative sampling, :data:`trec.data.Augment`);
- a task that retrieves exposes a :class:`Retriever` as ``task.retriever``: it encodes users
  and items into one space, so it can be evaluated over the whole catalog, exported into a FAISS
  index, searched and projected in TensorBoard.

Looking a model up imports its package only then (as torchtitan's ``get_train_spec``), and a
package imports torchrec only when its task is built: reading a config stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, make_dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from trec.config import Choice, ModelConfig, TrecConfig
from trec.config import load_config as _load_config
from trec.errors import TrecError

if TYPE_CHECKING:
    import os
    from typing import Sequence

    import torch
    from torch import nn

    from trec.config import DataConfig, EvaluationConfig
    from trec.data import PreparedDataset, RecBatch
    from trec.distributed import DistContext


class Task(Protocol):
    """What the training loop runs: ``forward(batch) -> (loss, outputs)``.

    ``outputs`` holds detached tensors: ``loss`` (0-d, logged as train/loss), other 0-d tensors
    (logged as scalars) and 1-d ones (logged as TensorBoard histograms, e.g. embedding norms);
    per-row click ``logits`` and ``labels`` (1, 0, or -1 for padding) add train/auc and train/ne.
    Optional attributes: ``augment`` (a reader hook that adds rows to each batch) and
    ``retriever`` (a :class:`Retriever`).
    """

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@runtime_checkable
class Retriever(Protocol):
    """Users and items encoded into one D-dimensional space; score = inner product.

    Both encoders take a :class:`~trec.data.RecBatch` on the model's device (rows with the
    entity index -1 are padding; their output rows are ignored) and may run collective
    embedding lookups: every rank calls them the same number of times.
    """

    normalized: bool
    """True when both encoders L2-normalise (the score is a cosine)."""

    def encode_users(self, batch: RecBatch, rows: int | None = None) -> torch.Tensor:
        """``rows X D`` embeddings of the batch's first ``rows`` users (default all R rows)."""
        ...

    def encode_items(self, batch: RecBatch) -> torch.Tensor:
        """``R X D`` embeddings of every row's item."""
        ...


def retriever_of(task: object) -> Retriever | None:
    """The task's :class:`Retriever`, or None for a task that does not retrieve."""
    retriever = getattr(task, "retriever", None)
    return retriever if isinstance(retriever, Retriever) else None


@dataclass(frozen=True)
class EvaluationRequest:
    """What a model's evaluation is asked for (the narrow config sections it may read)."""

    split: str
    exclude_splits: list[str]
    """Splits whose items are never recommended to their user when ranking for ``split``."""
    evaluation: EvaluationConfig
    data: DataConfig
    """For the encoders' batch size and history length."""
    seed: int
    """Seeds the sample of users when ``evaluation.max_users`` limits them (training.seed)."""
    index: Any = None
    """A :class:`trec.export.ShardedIndex` of the run's items, also ranked through (retrievers)."""


@dataclass(frozen=True)
class RetrieverRun:
    """Another trained retrieval run, as a setup hook receives it from a :data:`RetrieverLoader`."""

    source: dict[str, str]
    """What identifies its vectors (run directory, checkpoint@step, dataset fingerprint): a cache key,
    known without loading the model."""
    data: DataConfig
    """The run's own data section (its encoders' batch size and history length)."""
    load: Callable[[], Retriever]
    """Build the run's model and load its checkpoint (collective); returns its retriever."""


RetrieverLoader = Callable[["Path", "PreparedDataset"], RetrieverRun]
"""(run directory, dataset) → that trained run (refused if trained on another dataset); see
:func:`trec.runs.retriever_run`."""


@dataclass(frozen=True)
class SetupContext:
    """What a model's setup hook receives: the run it starts and how to load another one."""

    dataset: PreparedDataset
    ctx: DistContext
    run_dir: Path
    load_retriever: RetrieverLoader
    """Loads another trained run's retriever (e.g. to mine hard negatives), checked against ``dataset``."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, config section, task builder, evaluation and setup."""

    name: str
    config: type
    """The dataclass of the model's section, ``model.<name>`` (it may declare ``RANGES``)."""
    build_task: Callable[[ModelConfig, Any, PreparedDataset], nn.Module]
    """(common model section, the model's own section, dataset) → task (tables on the meta device)."""
    evaluate: Callable[[nn.Module, PreparedDataset, EvaluationRequest, DistContext], dict[str, float]]
    """(unwrapped sharded task in eval mode, dataset, request, ctx) → flat metrics (collective)."""
    default_metric: str
    """Metric for best-model selection when training.early_stopping_metric is empty."""
    setup: Callable[[nn.Module, SetupContext], None] | None = None
    """(task, context) → None: collective, after sharding and before the first training batch is
    read; runs again on resume."""


# Built-in models: name → the package that defines its SPEC. Adding a model is one line here (or
# register_model() for a model outside trec).
_BUILTIN = {
    "two_tower": "trec.models.two_tower",
    "dcn": "trec.models.dcn",
    "mf": "trec.models.mf",
}
_registered: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Make ``spec`` available as ``model.name: <spec.name>`` (call before loading a config)."""
    if spec.name in _BUILTIN or spec.name in _registered:
        raise TrecError(f"model '{spec.name}' is already registered")
    _registered[spec.name] = spec
    config_schema.cache_clear()


def model_names() -> list[str]:
    return [*_BUILTIN, *_registered]


def model_spec(name: str) -> ModelSpec:
    """The spec of model ``name`` (its package is imported now, not before)."""
    name = str(name)
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise TrecError(f"model.name: '{name}' is not available (choose from: {', '.join(model_names())})")
    spec = importlib.import_module(_BUILTIN[name]).SPEC
    if spec.name != name:
        raise TrecError(f"{_BUILTIN[name]}.SPEC is named '{spec.name}', registered as '{name}'")
    return spec


@lru_cache(maxsize=None)
def config_schema() -> type[TrecConfig]:
    """:class:`TrecConfig` whose ``model`` section has one field per registered model (its config
    dataclass, ``model.<name>``) and whose ``model.name`` is one of their names."""
    specs = [model_spec(name) for name in model_names()]
    names = Choice("ModelName", [(spec.name, spec.name) for spec in specs])
    model_fields = [("name", names, field(default=names(specs[0].name)))]
    model_fields += [(spec.name, spec.config, field(default_factory=spec.config)) for spec in specs]
    model = make_dataclass("ModelConfig", model_fields, bases=(ModelConfig,))
    return make_dataclass("TrecConfig", [("model", model, field(default_factory=model))], bases=(TrecConfig,))


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrecConfig:
    """:func:`trec.config.load_config` with every registered model's section (see :func:`config_schema`)."""
    return _load_config(path, overrides, config_schema())


def default_config() -> TrecConfig:
    """The defaults of every section (what an empty config file gives)."""
    return config_schema()()


def evaluate_retriever(task: nn.Module, dataset: PreparedDataset, request: EvaluationRequest,
                       ctx: DistContext) -> dict[str, float]:
    """The evaluation of every retrieval model: full-catalog top-K of ``task.retriever`` on the
    split (and through ``request.index`` when given); see :func:`trec.evaluation.retrieval.evaluate_retrieval`."""
    from trec.evaluation.retrieval import encode_all_items, evaluate_retrieval

    retriever = retriever_of(task)
    data = request.data
    items = encode_all_items(retriever.encode_items, dataset, data.eval_batch_size, ctx, data.history_max_len)
    return evaluate_retrieval(retriever.encode_users, items, dataset, request.split, request.exclude_splits,
                              request.evaluation, data, ctx, request.seed, index=request.index)
