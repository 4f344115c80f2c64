"""Value ranges, checked when the config is built (as torchtitan does), not deep inside a run."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass

from trec.config.prepare import ColumnsConfig
from trec.config.sections import TrecConfig
from trec.config.types import FRACTION, NON_NEGATIVE, POSITIVE, SEED, Range
from trec.errors import TrecError
from trec.io import quote


# Dotted key → allowed range. `*` stands for every key of a dict, `[]` for every element of a list;
# None values (optional overrides) are skipped. Every float anywhere must also be finite.
_RANGES: dict[str, Range] = {
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.prefetch_batches": NON_NEGATIVE,
    "data.history_max_len": NON_NEGATIVE,
    "data.positive_threshold": Range(0, 1, low_open=True),
    "data.prepare.test_fraction": Range(0, 1, high_open=True),
    "data.prepare.val_fraction": Range(0, 1, high_open=True),
    "data.prepare.last_n": POSITIVE,
    "data.prepare.seed": SEED,
    "data.prepare.hash_buckets": POSITIVE,
    "data.prepare.zch_size": Range(2),
    "data.prepare.min_count": POSITIVE,
    "data.prepare.history_max_len": NON_NEGATIVE,
    "data.prepare.rows_per_shard": POSITIVE,
    "data.prepare.synthetic.users": POSITIVE,
    "data.prepare.synthetic.items": POSITIVE,
    "data.prepare.synthetic.interactions": POSITIVE,
    "data.prepare.synthetic.side_features": NON_NEGATIVE,
    "data.prepare.synthetic.zipf": Range(0, low_open=True),
    "data.prepare.synthetic.topics": POSITIVE,
    "model.embedding_dim": POSITIVE,
    "model.tables.*.embedding_dim": POSITIVE,
    "model.tables.*.zch_size": Range(2),
    "model.managed_collision.eviction_interval": POSITIVE,
    "sharding.tables.*.min_partition": POSITIVE,
    "sharding.memory_fraction": Range(0, 1, low_open=True),
    "sharding.hbm_cap_gb": Range(0, low_open=True),
    "sharding.ddr_cap_gb": Range(0, low_open=True),
    "optimizer.sparse_lr": NON_NEGATIVE,
    "optimizer.sparse_weight_decay": NON_NEGATIVE,
    "optimizer.sparse_eps": Range(0, low_open=True),
    "optimizer.dense_lr": NON_NEGATIVE,
    "optimizer.dense_weight_decay": NON_NEGATIVE,
    "optimizer.warmup_steps": NON_NEGATIVE,
    "optimizer.min_lr_ratio": FRACTION,
    "optimizer.grad_clip_norm": NON_NEGATIVE,
    "training.epochs": POSITIVE,
    "training.max_steps": NON_NEGATIVE,
    "training.eval_every_steps": NON_NEGATIVE,
    "training.early_stopping_patience": NON_NEGATIVE,
    "training.validation_fraction": Range(0, 1, low_open=True, high_open=True),
    "training.seed": SEED,
    "evaluation.ks[]": POSITIVE,
    "evaluation.max_users": NON_NEGATIVE,
    "checkpoint.every_steps": NON_NEGATIVE,
    "checkpoint.keep_last": NON_NEGATIVE,
    "logging.log_every_steps": POSITIVE,
    "logging.histogram_every_steps": NON_NEGATIVE,
    "logging.projector_items": NON_NEGATIVE,
    "export.num_shards": NON_NEGATIVE,
    "export.nlist": NON_NEGATIVE,
    "export.pq_m": POSITIVE,
    "export.pq_nbits": Range(1, 16),
    "export.pq_refine_factor": NON_NEGATIVE,
    "export.hnsw_m": POSITIVE,
    "export.ef_construction": POSITIVE,
    "export.ef_search": POSITIVE,
    "export.nprobe": POSITIVE,
    "export.train_sample": POSITIVE,
    "export.seed": SEED,
}

# Text options with a fixed set of values that are plain strings in the dataclasses.
_TEXT_CHOICES: dict[str, tuple[str, ...]] = {
    "data.prepare.columns.id_type": ("auto", "int", "string"),
    "training.device": ("auto", "cpu", "cuda"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}


def validate_config(cfg: TrecConfig, where: str = "config") -> None:
    """Refuse (TrecError naming ``where`` and the dotted key) a value outside its range.

    Called by :func:`load_config` once the file and the overrides are merged, so a bad value
    stops the command before any data is opened or any process group is formed.
    """
    for key, value in _floats(cfg, ""):
        if not math.isfinite(value):
            raise TrecError(f"{where}: key '{key}' must be a finite number, got {value}")
    for pattern, allowed in range_rules(cfg):
        for key, value in _lookup(cfg, pattern.split("."), ""):
            if value is not None and not allowed.accepts(value):
                raise TrecError(f"{where}: key '{key}' must be {allowed.describe()}, got {value}")
    for key, choices in _TEXT_CHOICES.items():
        value = _lookup_one(cfg, key)
        if (value.upper() if key == "logging.level" else value) not in choices:
            raise TrecError(f"{where}: key '{key}' must be one of {', '.join(choices)}, got {quote(value)}")
    if not cfg.evaluation.ks:
        raise TrecError(f"{where}: key 'evaluation.ks' must list at least one cut-off, e.g. [10]")
    _validate_separators(cfg.data.prepare.columns, where)


def range_rules(cfg: TrecConfig) -> list[tuple[str, Range]]:
    """(dotted key pattern, range) of every rule: those of the common sections (:data:`_RANGES`) and
    those a model section declares beside its fields (``RANGES``, keys relative to the section)."""
    rules = list(_RANGES.items())
    for name in _model_sections(cfg.model):
        section = getattr(cfg.model, name)
        rules += [(f"model.{name}.{key}", allowed) for key, allowed in getattr(section, "RANGES", {}).items()]
    return rules


def _model_sections(model: object) -> list[str]:
    """Names of the model sections (dataclass fields of ``model`` that are themselves dataclasses)."""
    return [spec.name for spec in fields(model) if is_dataclass(getattr(model, spec.name))]


def _validate_separators(columns: ColumnsConfig, where: str) -> None:
    delimiter = columns.csv_delimiter
    if len(delimiter) != 1 or delimiter in '\r\n"':
        hint = " (for a tab, pass a real tab character, e.g. --delimiter $'\\t')" if delimiter == "\\t" else ""
        raise TrecError(f"{where}: key 'data.prepare.columns.csv_delimiter' must be one character other than a "
                        f"quote or a line break, got {quote(delimiter)}{hint}")
    separator = columns.multi_hot_separator
    if not separator or "\n" in separator or "\r" in separator:
        raise TrecError(f"{where}: key 'data.prepare.columns.multi_hot_separator' must be non-empty text without "
                        f"line breaks, got {quote(separator)}")


def _lookup(node: object, parts: list[str], prefix: str):
    """(dotted key, value) pairs of ``parts`` under ``node``, expanding `*` (dict keys) and `name[]` (list items)."""
    if not parts:
        yield prefix, node
        return
    part, rest = parts[0], parts[1:]
    if part == "*":
        for name, child in node.items():
            yield from _lookup(child, rest, f"{prefix}.{name}")
        return
    name = part.removesuffix("[]")
    child, key = getattr(node, name), f"{prefix}.{name}" if prefix else name
    if part.endswith("[]"):
        for position, item in enumerate(child):
            yield from _lookup(item, rest, f"{key}[{position}]")
    else:
        yield from _lookup(child, rest, key)


def _lookup_one(cfg: TrecConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _floats(node: object, prefix: str):
    """(dotted key, value) of every float in the config tree (dataclasses, dicts, lists)."""
    if isinstance(node, float):
        yield prefix, node
    elif is_dataclass(node):
        for spec in fields(node):
            yield from _floats(getattr(node, spec.name), f"{prefix}.{spec.name}" if prefix else spec.name)
    elif isinstance(node, dict):
        for name, child in node.items():
            yield from _floats(child, f"{prefix}.{name}")
    elif isinstance(node, list):
        for position, child in enumerate(node):
            yield from _floats(child, f"{prefix}[{position}]")
