"""Typed experiment configuration: dataclass sections, loaded from YAML, overridable by dotted keys.

A config is a :class:`TrecConfig` made of one section per concern. Functions receive the
narrowest section they need (``cfg.optimizer``), never the whole config. Files are merged
onto the dataclass defaults with OmegaConf structured configs, so an unknown key, a wrong
type or an invalid choice is rejected with the file and the dotted key named::

    from trec.models import load_config    # adds every registered model's section, model.<name>
    cfg = load_config("configs/movielens_two_tower.yaml", ["optimizer.dense_lr=0.01"])
    save_config(cfg, run_dir / "config.yaml")

Each field's docstring (the string below it) is its documentation; ``trec config show``
prints the resolved values. Where things live: :mod:`~trec.config.sections` (the common
sections), :mod:`~trec.config.prepare` (``data.prepare``), :mod:`~trec.config.types` (choices and
ranges), :mod:`~trec.config.loader` (YAML and overrides), :mod:`~trec.config.validation` (ranges,
checked when the config is built); a model's own section lives in its folder under trec/models/.
"""

from trec.config.loader import (apply_overrides, config_to_dict, config_to_yaml, load_config, packaged_configs,
                                resolve_config_path, save_config)
from trec.config.prepare import ColumnsConfig, Duplicates, IdMapping, PrepareConfig, SplitKind, SyntheticConfig
from trec.config.sections import (CheckpointConfig, ComputeKernel, DataConfig, DenseOptimizer, EvaluationConfig,
                                  Eviction, ExportConfig, Gain, IndexKind, LoggingConfig, LRDecay, ManagedCollisionConfig,
                                  ModelConfig, OptimizerConfig, PipelineKind, Pooling, Remap, ShardingConfig,
                                  ShardingKind, SparseOptimizer, TableConfig, TableShardingConfig, TrainingConfig, TrecConfig, Validation)
from trec.config.types import Choice, Range
from trec.config.validation import validate_config

__all__ = [
    "CheckpointConfig", "Choice", "ColumnsConfig", "ComputeKernel", "DataConfig", "DenseOptimizer", "Duplicates",
    "EvaluationConfig", "Eviction", "ExportConfig", "Gain", "IdMapping", "IndexKind", "LoggingConfig", "LRDecay", "ManagedCollisionConfig", "ModelConfig",
    "OptimizerConfig", "PipelineKind", "Pooling", "PrepareConfig", "Range", "Remap", "ShardingConfig", "ShardingKind",
    "SparseOptimizer", "SplitKind", "SyntheticConfig", "TableConfig", "TableShardingConfig", "TrainingConfig",
    "TrecConfig", "Validation", "apply_overrides", "config_to_dict", "config_to_yaml", "load_config", "packaged_configs",
    "resolve_config_path", "save_config", "validate_config",
]
