"""Typed experiment configuration: dataclass sections, loaded from YAML, overridable by dotted keys.

A config is a :class:`TrecConfig` made of one section per concern. Functions receive the
narrowest section they need (``cfg.optimizer``), never the whole config. Files are merged
onto the dataclass defaults with OmegaConf structured configs, so an unknown key, a wrong
type or an invalid choice is rejected with the file and the dotted key named::

    cfg = load_config("configs/movielens_two_tower.yaml", ["optimizer.dense_lr=0.01"])
    save_config(cfg, run_dir / "config.yaml")

Each field's docstring (the string below it) is its documentation; ``trec config show``
prints the resolved values.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from trec.errors import TrecError
from trec.io import atomic_write_text, quote


class Choice(str, Enum):
    """An enumerated option: compares equal to its string value, shown as that value in YAML."""

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class SplitKind(Choice):
    stratified = "stratified"
    """Per user, a seeded random test_fraction of the user's interactions go to test."""
    temporal = "temporal"
    """One global time cut: the latest test_fraction of all interactions go to test."""
    leave_last_n = "leave-last-n"
    """Per user, the last_n most recent interactions go to test."""


class IdMapping(Choice):
    vocab = "vocab"
    """Contiguous indices by descending frequency, plus one out-of-vocabulary index."""
    hash = "hash"
    """A stable 64-bit hash into hash_buckets (for unbounded ID spaces); no vocabulary kept."""


class Duplicates(Choice):
    keep = "keep"
    drop = "drop"


@dataclass
class ColumnsConfig:
    """Column names of a generic interaction log (`parquet` and `csv` sources)."""

    user: str = "user_id"
    """Raw user ID column (integers or strings)."""
    item: str = "item_id"
    """Raw item ID column (integers or strings)."""
    time: str = "timestamp"
    """Event time: integer seconds, or a Parquet/ISO-8601 timestamp; empty = no time (source order)."""
    rating: str = ""
    """Optional explicit rating (a number >= 0), kept beside the label."""
    label: str = ""
    """Optional label in [0, 1]; without it every interaction is a positive (1.0)."""
    user_features: list[str] = field(default_factory=list)
    """Categorical user columns (the value on the user's last row in source order is kept)."""
    user_multi_hot_features: list[str] = field(default_factory=list)
    """Multi-valued user columns: lists, or strings split by multi_hot_separator."""
    user_numeric_features: list[str] = field(default_factory=list)
    item_features: list[str] = field(default_factory=list)
    item_multi_hot_features: list[str] = field(default_factory=list)
    item_numeric_features: list[str] = field(default_factory=list)
    item_title: str = ""
    """Optional display title column of items."""
    context_features: list[str] = field(default_factory=list)
    """Categorical columns that belong to the interaction itself (device, hour, ...)."""
    multi_hot_separator: str = "|"
    csv_delimiter: str = ","
    id_type: str = "auto"
    """CSV only: auto (integers if the first rows are integers, else strings), int or string."""


@dataclass
class SyntheticConfig:
    """Power-law interactions with latent topic preferences (`trec data prepare synthetic`)."""

    users: int = 100_000
    items: int = 20_000
    interactions: int = 1_000_000
    side_features: int = 4
    """Categorical side features, alternating user/item, each correlated with the latent topics."""
    zipf: float = 1.1
    """Exponent of item popularity (rank r has weight 1/r^zipf); users follow zipf/2."""
    topics: int = 32
    """Latent topics; each user prefers one, each item belongs to one."""


@dataclass
class PrepareConfig:
    """Options of `trec data prepare` (each also a command-line flag)."""

    split: SplitKind = SplitKind.stratified
    test_fraction: float = 0.25
    """Share of each user's interactions (stratified) or of all interactions (temporal) in test."""
    val_fraction: float = 0.0
    """Per user, a seeded random share of the train part moved to val (for early stopping)."""
    last_n: int = 1
    """leave-last-n: interactions per user held out for test."""
    seed: int = 42
    id_mapping: IdMapping = IdMapping.vocab
    """Mapping of user_id and item_id."""
    hash_buckets: int = 1 << 20
    """Buckets of hash-mapped user_id/item_id."""
    hash_features: list[str] = field(default_factory=list)
    """Side or context features to hash instead of vocab-map, as NAME:BUCKETS."""
    min_count: int = 1
    """Drop interactions of users/items seen fewer times; rarer side-feature values map to OOV."""
    duplicates: Duplicates = Duplicates.keep
    """drop: keep only the first (in source order) interaction of each (user, item) pair."""
    history_max_len: int = 200
    """Most recent train items kept per user in features/user_history.parquet; 0 = no history."""
    rows_per_shard: int = 1_000_000
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig:
    path: str = ""
    """Prepared dataset directory (the output of `trec data prepare`); `--data DIR` overrides it."""
    batch_size: int = 1024
    """Interactions per rank per training step (the global batch is this times the world size)."""
    eval_batch_size: int = 4096
    """Rows per rank per step when encoding users and items for evaluation and export."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch (seeded by training.seed and the epoch)."""
    prefetch_batches: int = 4
    """Batches a background thread prepares ahead of the training step."""
    history_max_len: int = 100
    """Longest user history (most recent training items) fed as the `user_history` feature; 0 drops it."""
    positive_threshold: float = 0.5
    """A row is a positive when its label is >= this (labels are 0/1 or graded in [0, 1]; a dataset
    prepared without a label column has label 1.0 everywhere). Only positives train the two-tower,
    count as an item's popularity and are relevant in evaluation; the ranker learns click = positive."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """How `trec data prepare` builds a dataset (columns of generic logs, split, ID mapping)."""


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class Pooling(Choice):
    sum = "sum"
    mean = "mean"


@dataclass
class TableConfig:
    """Per-feature override of the embedding table the model builds for that feature."""

    embedding_dim: int | None = None
    """Embedding width; defaults to model.embedding_dim."""
    pooling: Pooling | None = None
    """How a multi-hot bag is reduced; defaults to mean for multi-hot features and sum otherwise."""


class RetrievalLoss(Choice):
    softmax = "softmax"
    """In-batch sampled softmax (plus extra negatives), with logQ correction."""
    bce = "bce"
    """Pointwise binary cross-entropy on positives and sampled negatives (for comparison)."""


class NegativeStrategy(Choice):
    none = "none"
    random = "random"
    popular = "popular"
    hard = "hard"
    mixed = "mixed"


@dataclass
class RetrievalLossConfig:
    kind: RetrievalLoss = RetrievalLoss.softmax
    """Loss of the two-tower task."""
    logq_correction: bool = True
    """Subtract log(sampling probability) from each candidate's logit (Yi et al., 2019)."""
    mask_accidental_hits: bool = True
    """Drop a candidate from a row's negatives when it is that row's positive item."""
    negatives: NegativeStrategy = NegativeStrategy.random
    """Extra negatives beyond the in-batch ones: random (uniform over the catalog), popular (by
    frequency), hard (highest-scored non-positives of the current model), mixed (a blend)."""
    num_negatives: int = 1024
    """Extra candidate items drawn per step (shared by the whole batch)."""
    num_hard_negatives: int = 10
    """For hard/mixed: how many of the highest-scored candidates each row keeps as hard negatives."""
    mix_popular: float = 0.5
    """For mixed: share of the extra candidates drawn by popularity; the rest are uniform."""
    label_weighting: bool = False
    """Weight each positive row's loss by its (graded) label instead of 1; rows below
    data.positive_threshold weigh 0 either way."""


@dataclass
class TwoTowerConfig:
    tower_layers: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden widths of each tower's MLP (torchrec.modules.mlp.MLP)."""
    output_dim: int = 64
    """Width D of the user and item embeddings (B X D)."""
    dense_dim: int = 16
    """Width of the small MLP that maps a tower's numeric features into its input."""
    normalize: bool = True
    """L2-normalise both towers' outputs, so the score is a cosine scaled by 1/temperature."""
    temperature: float = 0.05
    """Softmax temperature (initial value if learned)."""
    learn_temperature: bool = False
    """Learn the temperature (as log 1/T, clamped) instead of fixing it."""
    dropout: float = 0.0
    """Dropout on the towers' input embeddings (regularisation for small datasets)."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)


class Interaction(Choice):
    dcn = "dcn"
    dot = "dot"
    none = "none"


class CrossStructure(Choice):
    stacked = "stacked"
    parallel = "parallel"


@dataclass
class DCNConfig:
    interaction: Interaction = Interaction.dcn
    """Feature interaction: dcn (DCN-v2 cross network), dot (DLRM pairwise dots), none (plain MLP)."""
    structure: CrossStructure = CrossStructure.stacked
    """Stacked: cross network then top MLP; parallel: cross network beside a deep MLP."""
    cross_layers: int = 3
    """Number of cross layers."""
    low_rank: int = 64
    """Rank of each cross layer's weight (W = U V^T)."""
    dense_layers: list[int] = field(default_factory=lambda: [128, 64])
    """Bottom MLP over the numeric features; with interaction dot its last width must equal the
    (common) embedding width."""
    top_layers: list[int] = field(default_factory=lambda: [256, 128])
    """Top (over) MLP widths before the output heads; with structure parallel, the deep MLP
    beside the cross network."""
    dropout: float = 0.0
    """Dropout on the interaction input (the concatenated embeddings), for small datasets."""
    wide_cross: bool = False
    """Add a wide (Wide & Deep) full-rank cross of the user's history with the candidate item to
    the click logit: a table whose row for item i holds one weight per history item j, read at the
    user's history and averaged. It learns item-to-item affinities (as EASE/SLIM do) that pooled
    low-rank embeddings cannot; the table is items X wide_cross_buckets."""
    wide_cross_buckets: int = 0
    """Columns of the wide table; 0 = one per item (exact: I^2 weights, for catalogs up to ~20k
    items), else history items share columns by index modulo this (for large catalogs)."""
    rating_weight: float = 0.0
    """Weight α of the rating head's loss (MSE on positives): L = L_click + α·L_rating; 0 = no
    rating head. Needs a dataset with ratings."""
    negatives_per_positive: int = 4
    """Negative (user, item) rows sampled per training positive, label 0."""
    hard_negative_ratio: float = 0.0
    """Share of those negatives drawn from the user's hard candidates (needs hard_negatives_run);
    the rest are uniform over the catalog. Neither kind is an item the user has in train."""
    hard_negatives_run: str = ""
    """Run directory of a trained two-tower: its top hard_negatives_top_n non-train items per user
    are the hard candidates, mined at the start of training and cached in RUN/hard_negatives.parquet."""
    hard_negatives_top_n: int = 100
    """Hard candidates kept per user (the retriever's highest-scored items not in train)."""
    hard_negatives_skip_top: int = 0
    """Skip the retriever's first S non-train items: the hard candidates are its ranks S+1..S+top_n
    (semi-hard negatives that stay out of the top-S list the ranker will re-rank)."""
    retrieval_weight: float = 0.0
    """Two-stage order of the candidates: ranker click logit + retrieval_weight X the retriever's
    score (the towers' inner product, a cosine for normalised towers); 0 = the ranker alone.
    Choose it on the validation split (`trec evaluate --split val ... --set model.dcn.retrieval_weight=W`)."""
    eval_negatives: int = 4
    """Validation/test: uniform negatives per held-out positive (none of the user's items in any
    split), drawn with eval_seed so every model variant is scored on the same rows."""
    eval_seed: int = 0


class ModelName(Choice):
    two_tower = "two_tower"
    dcn = "dcn"


@dataclass
class ModelConfig:
    name: ModelName = ModelName.two_tower
    """Which model (and task) to build: two_tower (retrieval) or dcn (ranking)."""
    embedding_dim: int = 64
    """Default width of every embedding table."""
    tables: dict[str, TableConfig] = field(default_factory=dict)
    """Per-feature table overrides, keyed by feature name from the dataset manifest."""
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    dcn: DCNConfig = field(default_factory=DCNConfig)


# --------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------


class ShardingKind(Choice):
    table_wise = "table_wise"
    column_wise = "column_wise"
    table_column_wise = "table_column_wise"
    row_wise = "row_wise"
    table_row_wise = "table_row_wise"
    data_parallel = "data_parallel"


class ComputeKernel(Choice):
    fused = "fused"
    dense = "dense"


@dataclass
class TableShardingConfig:
    """Planner constraints for one table (torchrec ParameterConstraints)."""

    sharding_types: list[ShardingKind] = field(default_factory=list)
    """Allowed sharding types for this table; empty = the section default."""
    min_partition: int | None = None
    """Smallest column shard for column-wise sharding."""


@dataclass
class ShardingConfig:
    sharding_types: list[ShardingKind] = field(default_factory=list)
    """Sharding types the planner may choose for every table; empty = all the device supports
    (row-wise kinds need CUDA)."""
    compute_kernel: ComputeKernel = ComputeKernel.fused
    """fused: FBGEMM table-batched kernels with the optimizer applied in backward."""
    tables: dict[str, TableShardingConfig] = field(default_factory=dict)
    """Per-table constraints, keyed by table name (`t_<feature>`)."""
    memory_fraction: float = 0.7
    """Share of each rank's device memory (HBM on CUDA, RAM on CPU) the planner may fill."""
    hbm_cap_gb: float | None = None
    """Per-rank GPU memory cap; default: measured total times memory_fraction."""
    ddr_cap_gb: float | None = None
    """Per-rank host memory cap; default: measured RAM / local ranks times memory_fraction."""


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------


class SparseOptimizer(Choice):
    rowwise_adagrad = "rowwise_adagrad"
    adagrad = "adagrad"
    adam = "adam"
    sgd = "sgd"


class DenseOptimizer(Choice):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"
    adagrad = "adagrad"


class LRDecay(Choice):
    none = "none"
    linear = "linear"
    cosine = "cosine"


@dataclass
class OptimizerConfig:
    sparse: SparseOptimizer = SparseOptimizer.rowwise_adagrad
    """Fused optimizer for embedding tables, applied inside backward by FBGEMM."""
    sparse_lr: float = 0.05
    sparse_weight_decay: float = 0.0
    sparse_eps: float = 1e-8
    dense: DenseOptimizer = DenseOptimizer.adam
    """Optimizer for the MLPs and every other non-embedding parameter."""
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear LR warm-up from 0 over this many steps (both optimizers)."""
    decay: LRDecay = LRDecay.none
    """LR decay after warm-up, down to min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the dense gradients' global norm to this value; 0 disables."""


# --------------------------------------------------------------------------------------------
# training / evaluation / checkpoints / logging / export
# --------------------------------------------------------------------------------------------


class PipelineKind(Choice):
    sparse_dist = "sparse_dist"
    """TrainPipelineSparseDist: input all-to-all of batch i+1 overlaps compute of batch i."""
    plain = "plain"
    """A plain forward/backward/step loop (easier to debug)."""


@dataclass
class TrainingConfig:
    epochs: int = 1
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many steps; 0 = run `epochs` epochs."""
    eval_every_steps: int = 0
    """Evaluate on the validation split every N steps; 0 = at the end of each epoch."""
    early_stopping_metric: str = ""
    """Validation metric (e.g. `ndcg@10`, `auc`) that early stopping and best-model selection
    watch; empty disables both."""
    early_stopping_patience: int = 3
    """Evaluations without improvement before stopping."""
    pipeline: PipelineKind = PipelineKind.sparse_dist
    seed: int = 42
    """Seeds every rank (rank-offset) and the data order."""
    device: str = "auto"
    """auto (cuda+nccl if GPUs exist, else cpu+gloo), cpu or cuda."""


class Gain(Choice):
    binary = "binary"
    """Every positive test item has relevance 1."""
    graded = "graded"
    """A positive test item's relevance is its label: DCG = sum (2^rel - 1) / log2(i + 1)."""


@dataclass
class EvaluationConfig:
    ks: list[int] = field(default_factory=lambda: [10])
    """Cut-offs for the top-K metrics (metrics.json keys such as `ndcg@10`)."""
    exclude_train: bool = True
    """Never recommend an item the user has in the training data (any label: the user has seen it)."""
    max_users: int = 0
    """Evaluate at most this many users (0 = all); for quick validation on large data."""
    popularity_baseline: bool = True
    """Also score the most-popular-items baseline in the same evaluation."""
    gain: Gain = Gain.binary
    """Relevance of a positive test item in NDCG: binary (1) or graded (its label, gain 2^label - 1)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps into RUN/checkpoints/step-N/; 0 = only at the end of training."""
    keep_last: int = 2
    """Keep the newest N complete checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory, if there is one."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under RUN/tb/."""
    log_every_steps: int = 50
    """Scalar logging period (loss, lr, samples/s)."""
    histogram_every_steps: int = 500
    """Embedding-norm histogram period; 0 disables."""
    projector_items: int = 500
    """Item embeddings sent to the TensorBoard projector at the end of training; 0 disables."""
    level: str = "INFO"


class IndexKind(Choice):
    flat = "flat"
    ivf_flat = "ivf_flat"
    ivf_pq = "ivf_pq"
    hnsw = "hnsw"


@dataclass
class ExportConfig:
    index: IndexKind = IndexKind.flat
    """FAISS index kind built over the item embeddings (always inner-product metric): flat (exact),
    ivf_flat, ivf_pq or hnsw."""
    num_shards: int = 0
    """Index shards; 0 = one per rank. Item with index i goes to shard i % num_shards."""
    nlist: int = 0
    """IVF lists (ivf_flat, ivf_pq); 0 = about 4 * sqrt(items), at most train vectors / 39."""
    pq_m: int = 16
    """Product-quantizer sub-vectors (ivf_pq); must divide the embedding width D."""
    pq_nbits: int = 8
    """Bits per PQ sub-vector code (ivf_pq): 2**pq_nbits centroids per sub-quantizer."""
    pq_refine_factor: int = 0
    """ivf_pq: also keep the full vectors and re-rank the best k * F PQ candidates exactly
    (FAISS RFlat, 4*D more bytes per item); 0 = PQ scores only."""
    hnsw_m: int = 32
    """Graph neighbours per node (hnsw)."""
    ef_construction: int = 200
    """Candidate list size while building the HNSW graph: higher is slower to build, better recall."""
    ef_search: int = 128
    """Default HNSW candidate list size at search time (stored in the index; settable when searching)."""
    nprobe: int = 16
    """Default IVF lists visited per query (stored in the index; settable when searching)."""
    train_sample: int = 100_000
    """Vectors (drawn from every rank) that train the shared coarse quantizer / PQ codebooks."""
    seed: int = 0
    """Seeds the choice of the training sample (the same sample whatever the world size)."""
    users: bool = False
    """Also export user embeddings."""


@dataclass
class TrecConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


# Keys that were removed because another section owns the setting: old key → the one to use.
_MOVED_KEYS = {"training.log_every_steps": "logging.log_every_steps"}


def _describe(error: oc_errors.OmegaConfBaseException) -> str:
    """One line for an OmegaConf error: the dotted key and what was wrong with it."""
    key = getattr(error, "full_key", None) or "?"
    first = str(error).splitlines()[0]
    if len(first) > 200:  # OmegaConf quotes the whole bad value
        first = first[:200] + "..."
    if isinstance(error, oc_errors.ConfigKeyError) or "not in" in first:
        match = re.search(r"Did you mean(?: one of)?: (.*?)\??$", first)
        hint = f" (did you mean {match.group(1)}?)" if match else ""
        if key in _MOVED_KEYS:
            hint = f" (did you mean '{_MOVED_KEYS[key]}'?)"
        return f"unknown key '{key}'{hint}"
    return f"key '{key}': {first}"


def _merge(base, layer, where: str):
    try:
        return OmegaConf.merge(base, layer)
    except oc_errors.OmegaConfBaseException as error:
        raise TrecError(f"{where}: {_describe(error)}") from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects), stricter in three ways:

    - no aliases (``*name``): a config is a small tree of literal values, and aliases are how a
      file of a few hundred bytes expands into billions of nodes (or into a cycle) once merged;
    - no duplicate keys: PyYAML keeps the last one silently, so one of two settings would vanish;
    - keys are strings (OmegaConf's dotted keys).
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported in a config: write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {quote(key)} is not a string", key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {quote(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_MAX_CONFIG_BYTES = 1 << 20


def _load_yaml(text: str):
    """Parse ``text`` with :class:`_ConfigLoader`; may raise yaml.YAMLError, ValueError or RecursionError."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise TrecError(f"config file not found: {path}")
    data = path.read_bytes()
    if len(data) > _MAX_CONFIG_BYTES:
        raise TrecError(f"{path}: {len(data):,} bytes is too large for a config (at most {_MAX_CONFIG_BYTES:,})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TrecError(f"{path}:{line}: not UTF-8 text (byte {error.start}); a config is a UTF-8 YAML file") from None
    try:
        content = _load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TrecError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise TrecError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise TrecError(f"{path}: invalid YAML: {str(error).splitlines()[0][:200]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise TrecError(f"{path}: expected a mapping of sections at the top level")
    _refuse_interpolations(content, str(path))
    return content


def _refuse_interpolations(node: object, where: str, key: str = "") -> None:
    """OmegaConf would resolve ``${...}`` (``${oc.env:HOME}`` reads the environment) when the config
    is built, and a run's saved config.yaml would then hold the resolved value (a secret, a home
    directory). A config holds literal values only, so any ``${`` in a string is refused."""
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_interpolations(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for position, value in enumerate(node):
            _refuse_interpolations(value, where, f"{key}[{position}]")
    elif isinstance(node, str) and "${" in node:
        raise TrecError(f"{where}: key '{key}': {quote(node)}: '${{...}}' interpolations are not supported "
                        "(a config holds literal values; write the value itself)")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise TrecError(f"override {quote(text)}: expected KEY=VALUE with a dotted key, e.g. data.batch_size=512")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    except ValueError:  # an integer of more digits than Python converts
        raise TrecError(f"override {quote(text)}: value is not a usable number") from None
    _refuse_interpolations(value, f"override {quote(text)}", key.strip())
    return key.strip(), value


def _override_layer(key: str, value: object) -> dict:
    layer: dict = {}
    node = layer
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrecConfig:
    """Defaults ← YAML file ← `key=value` overrides, validated against the dataclasses.

    Raises TrecError naming the file (or the override) and the dotted key on an unknown key,
    a wrong type or an invalid choice.
    """
    merged = OmegaConf.structured(TrecConfig)
    if path is not None:
        merged = _merge(merged, OmegaConf.create(_read_yaml(Path(path))), str(path))
    for text in overrides:
        key, value = _parse_override(text)
        merged = _merge(merged, OmegaConf.create(_override_layer(key, value)), f"override {quote(text)}")
    try:
        cfg = OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as error:
        raise TrecError(f"{path or 'config'}: {_describe(error)}") from None
    where = str(path) if path is not None else "config"
    validate_config(cfg, f"{where} with overrides" if overrides else where)
    return cfg


# --------------------------------------------------------------------------------------------
# value ranges, checked when the config is built (as torchtitan does), not deep inside a run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """Allowed values of a number: [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) or value is None else f"{value:g}"


_POSITIVE = _Range(1)  # counts and sizes: at least one
_NON_NEGATIVE = _Range(0)  # periods and counts where 0 means "off" or "none"
_FRACTION = _Range(0, 1)
_PROBABILITY_OPEN = _Range(0, 1, high_open=True)  # dropout: 1 would zero every input
_SEED = _Range(0, 2**63 - 1)  # numpy refuses negative seeds

# Dotted key → allowed range. `*` stands for every key of a dict, `[]` for every element of a list;
# None values (optional overrides) are skipped. Every float anywhere must also be finite.
_RANGES: dict[str, _Range] = {
    "data.batch_size": _POSITIVE,
    "data.eval_batch_size": _POSITIVE,
    "data.prefetch_batches": _NON_NEGATIVE,
    "data.history_max_len": _NON_NEGATIVE,
    "data.positive_threshold": _Range(0, 1, low_open=True),
    "data.prepare.test_fraction": _Range(0, 1, high_open=True),
    "data.prepare.val_fraction": _Range(0, 1, high_open=True),
    "data.prepare.last_n": _POSITIVE,
    "data.prepare.seed": _SEED,
    "data.prepare.hash_buckets": _POSITIVE,
    "data.prepare.min_count": _POSITIVE,
    "data.prepare.history_max_len": _NON_NEGATIVE,
    "data.prepare.rows_per_shard": _POSITIVE,
    "data.prepare.synthetic.users": _POSITIVE,
    "data.prepare.synthetic.items": _POSITIVE,
    "data.prepare.synthetic.interactions": _POSITIVE,
    "data.prepare.synthetic.side_features": _NON_NEGATIVE,
    "data.prepare.synthetic.zipf": _Range(0, low_open=True),
    "data.prepare.synthetic.topics": _POSITIVE,
    "model.embedding_dim": _POSITIVE,
    "model.tables.*.embedding_dim": _POSITIVE,
    "model.two_tower.tower_layers[]": _POSITIVE,
    "model.two_tower.output_dim": _POSITIVE,
    "model.two_tower.dense_dim": _POSITIVE,
    "model.two_tower.temperature": _Range(0, low_open=True),
    "model.two_tower.dropout": _PROBABILITY_OPEN,
    "model.two_tower.loss.num_negatives": _NON_NEGATIVE,
    "model.two_tower.loss.num_hard_negatives": _NON_NEGATIVE,
    "model.two_tower.loss.mix_popular": _FRACTION,
    "model.dcn.cross_layers": _NON_NEGATIVE,
    "model.dcn.low_rank": _POSITIVE,
    "model.dcn.dense_layers[]": _POSITIVE,
    "model.dcn.top_layers[]": _POSITIVE,
    "model.dcn.dropout": _PROBABILITY_OPEN,
    "model.dcn.wide_cross_buckets": _NON_NEGATIVE,
    "model.dcn.rating_weight": _NON_NEGATIVE,
    "model.dcn.negatives_per_positive": _NON_NEGATIVE,
    "model.dcn.hard_negative_ratio": _FRACTION,
    "model.dcn.hard_negatives_top_n": _POSITIVE,
    "model.dcn.hard_negatives_skip_top": _NON_NEGATIVE,
    "model.dcn.eval_negatives": _NON_NEGATIVE,
    "model.dcn.eval_seed": _SEED,
    "sharding.tables.*.min_partition": _POSITIVE,
    "sharding.memory_fraction": _Range(0, 1, low_open=True),
    "sharding.hbm_cap_gb": _Range(0, low_open=True),
    "sharding.ddr_cap_gb": _Range(0, low_open=True),
    "optimizer.sparse_lr": _NON_NEGATIVE,
    "optimizer.sparse_weight_decay": _NON_NEGATIVE,
    "optimizer.sparse_eps": _Range(0, low_open=True),
    "optimizer.dense_lr": _NON_NEGATIVE,
    "optimizer.dense_weight_decay": _NON_NEGATIVE,
    "optimizer.warmup_steps": _NON_NEGATIVE,
    "optimizer.min_lr_ratio": _FRACTION,
    "optimizer.grad_clip_norm": _NON_NEGATIVE,
    "training.epochs": _POSITIVE,
    "training.max_steps": _NON_NEGATIVE,
    "training.eval_every_steps": _NON_NEGATIVE,
    "training.early_stopping_patience": _NON_NEGATIVE,
    "training.seed": _SEED,
    "evaluation.ks[]": _POSITIVE,
    "evaluation.max_users": _NON_NEGATIVE,
    "checkpoint.every_steps": _NON_NEGATIVE,
    "checkpoint.keep_last": _NON_NEGATIVE,
    "logging.log_every_steps": _POSITIVE,
    "logging.histogram_every_steps": _NON_NEGATIVE,
    "logging.projector_items": _NON_NEGATIVE,
    "export.num_shards": _NON_NEGATIVE,
    "export.nlist": _NON_NEGATIVE,
    "export.pq_m": _POSITIVE,
    "export.pq_nbits": _Range(1, 16),
    "export.pq_refine_factor": _NON_NEGATIVE,
    "export.hnsw_m": _POSITIVE,
    "export.ef_construction": _POSITIVE,
    "export.ef_search": _POSITIVE,
    "export.nprobe": _POSITIVE,
    "export.train_sample": _POSITIVE,
    "export.seed": _SEED,
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
    for pattern, allowed in _RANGES.items():
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


def config_to_yaml(cfg: TrecConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: TrecConfig) -> dict:
    """Plain nested dict of the config (enums as their string values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def save_config(cfg: TrecConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically), so a run directory records what produced it."""
    atomic_write_text(Path(path), config_to_yaml(cfg))

