"""The config sections every run has (data, model, sharding, optimizer, training, evaluation,
checkpoint, logging, export). A model's own section (``model.<name>``) lives in its folder under
trec/models/ and is added to :class:`ModelConfig` by :func:`trec.models.config_schema`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trec.config.prepare import PrepareConfig
from trec.config.types import Choice


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
# model (the sections common to every model)
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
    zch_size: int | None = None
    """Managed ID features (--id-mapping managed) only: rows of the table, i.e. the managed-collision
    remapper's output range; defaults to the dataset's zch_size."""


class Eviction(Choice):
    lfu = "lfu"
    """Least frequently used: a full table admits a new ID only when it is seen more often than the rarest."""
    lru = "lru"
    """Least recently used: a full table gives the row of the longest-unseen ID to a new one."""


class Remap(Choice):
    mch = "mch"
    """torchrec's MCHManagedCollisionModule: IDs claim rows, the eviction policy decides when full."""
    modulo = "modulo"
    """Baseline: row = ID % zch_size (plain hashing at the same table size, for comparisons)."""


@dataclass
class ManagedCollisionConfig:
    """The managed-collision remapper of managed user_id/item_id (torchrec's MCHManagedCollisionModule)."""

    remap: Remap = Remap.mch
    eviction: Eviction = Eviction.lfu
    eviction_interval: int = 1
    """Training steps between row assignments; 1: new IDs claim rows in the step they first appear
    (and the state a checkpoint holds is complete: nothing is pending in a history buffer)."""


@dataclass
class ModelConfig:
    """What every model shares; each registered model adds its own section, ``model.<name>``."""

    name: str = "two_tower"
    """Which model (and task) to build: a registered model name (two_tower, dcn, mf, ...)."""
    embedding_dim: int = 64
    """Default width of every embedding table."""
    tables: dict[str, TableConfig] = field(default_factory=dict)
    """Per-feature table overrides, keyed by feature name from the dataset manifest."""
    managed_collision: ManagedCollisionConfig = field(default_factory=ManagedCollisionConfig)
    """How managed user_id/item_id (--id-mapping managed) are remapped to table rows."""

    def section(self) -> object:
        """The chosen model's own section, ``model.<name>`` (None for a model without one)."""
        return getattr(self, str(self.name), None)


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


class Validation(Choice):
    auto = "auto"
    """The dataset's `val` split if it has one; without it, a validation set carved from each user's
    train rows chooses the number of steps (early stopping), then the model is refit on the whole
    train split for that many steps scaled to its size (needs training.early_stopping_metric)."""
    split = "split"
    """Only the dataset's `val` split; without it, train every step and keep the last weights."""


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
    validation: Validation = Validation.auto
    """Where early stopping validates: auto (carve a validation set when the dataset has no `val`
    split, then refit) or split (the `val` split only)."""
    validation_fraction: float = 0.1
    """Share of each user's train rows carved out as validation by `validation: auto`."""
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
