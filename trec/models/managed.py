"""Managed-collision IDs on the model side: raw user/item IDs → table rows, in front of the sharded tables.

A dataset prepared with ``--id-mapping managed`` feeds the model each ID's ``managed_id`` (a
stable hash of the raw ID into [0, 2**40), :mod:`trec.data.managed`), not a vocabulary index.
:class:`ManagedIds` turns those into rows of tables of ``zch_size`` rows with torchrec's
``MCHManagedCollisionModule`` (one per table, LFU or LRU eviction): IDs claim free rows as they
stream in, and once a table is full the eviction policy decides which ID keeps a row. IDs
without a row share the table's last row (torchrec reserves it).

Why not torchrec's ``ManagedCollisionEmbeddingBagCollection`` through DMP: its sharder offers
only row-wise sharding, which needs CUDA; on CPU the planner finds no plan. So the remapper
here is an ordinary (unsharded) module, replicated on every rank, in front of the table-wise /
column-wise sharded EmbeddingBagCollection. Replicas stay identical because every rank
profiles the same IDs in the same order: in training each call all-gathers the batch's IDs of
every rank (rank order) and updates the state with the global batch; then each rank remaps
its own IDs. DDP never broadcasts buffers (torchrec wraps with ``broadcast_buffers=False``),
and the state is a set of persistent buffers, so it rides in the DCP checkpoint with the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor
from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule

from data_pipeline.layout import ITEM_ID, USER_HISTORY, USER_ID
from trec.config import Eviction, ManagedCollisionConfig, ModelConfig, Remap
from trec.data import FeatureSpec
from trec.data.managed import is_managed
from trec.errors import TrecError

INPUT_HASH_SIZE = 1 << 40
"""Input range of the remapper: the managed IDs the prepare writes (data_pipeline.mapping.MANAGED_ID_BITS)."""


def managed_rows(feature: FeatureSpec, model: ModelConfig) -> int:
    """Rows of a managed feature's table: ``model.tables.NAME.zch_size``, else the dataset's zch_size."""
    override = model.tables.get(feature.vocab_of or feature.name)
    return int(override.zch_size if override and override.zch_size else feature.zch_size)


def refuse_managed(features: Sequence[FeatureSpec], model: ModelConfig) -> None:
    """One line for a model that cannot take managed IDs (only two_tower remaps them)."""
    managed = [f.name for f in features if is_managed(f)]
    if managed:
        raise TrecError(f"model '{model.name}' does not support managed IDs ({', '.join(managed)} prepared with "
                        "--id-mapping managed); use two_tower, or prepare the dataset with --id-mapping vocab or hash")


def _policy(eviction: Eviction):
    return LRU_EvictionPolicy() if eviction == Eviction.lru else LFU_EvictionPolicy()


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ``ids`` (1-D int64, lengths may differ), concatenated in rank order; ``ids`` itself
    without a process group. Collective: every rank must call it the same number of times."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ids
    world = dist.get_world_size()
    device = ids.device if dist.get_backend() != "gloo" else torch.device("cpu")
    length = torch.tensor([ids.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: ids.numel()] = ids.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)]).to(ids.device)


class ManagedIds(nn.Module):
    """Remaps the managed ID keys of a KJT (values in [0, 2**40)) to table rows; other keys pass through.

    Args:
        rows: table name (user_id, item_id) → zch_size.
        features: KJT key → (its table, whether its IDs claim rows). user_history reads the
            item_id table without claiming: a row belongs to an item the model trains on.
        cfg: eviction policy and interval.
    Shapes: forward(KJT of stride R) → KJT of stride R, same keys and lengths.
    """

    def __init__(self, rows: dict[str, int], features: dict[str, tuple[str, bool]],
                 cfg: ManagedCollisionConfig) -> None:
        super().__init__()
        self.mch = nn.ModuleDict({
            table: MCHManagedCollisionModule(zch_size=size, device=torch.device("cpu"),
                                             eviction_policy=_policy(cfg.eviction),
                                             eviction_interval=cfg.eviction_interval,
                                             input_hash_size=INPUT_HASH_SIZE, name=table)
            for table, size in rows.items()
        })
        self.features = dict(features)
        self.register_load_state_dict_post_hook(_forget_progress)

    def forward(self, features: KeyedJaggedTensor, claim_rows: int | None = None) -> KeyedJaggedTensor:
        """``claim_rows``: in training, only the IDs of the first ``claim_rows`` rows (default all)
        are recorded: a batch's labelled rows are traffic, its sampled negatives are not (uniform
        negatives would churn an LRU table and inflate rare items' LFU counts)."""
        keys = features.keys()
        offsets = [0, *torch.tensor(features.length_per_key()).cumsum(0).tolist()]
        segments = {key: slice(offsets[i], offsets[i + 1]) for i, key in enumerate(keys)}
        values = features.values()
        if self.training:
            lengths = features.lengths().view(len(keys), -1)[:, :claim_rows].sum(dim=1).tolist()
            self.profile({key: values[offsets[i] : offsets[i] + lengths[i]]
                          for i, key in enumerate(keys) if key in self.features})
        remapped = values.clone()
        for key in keys:
            if key in self.features:
                remapped[segments[key]] = self.rows(key, values[segments[key]])
        return KeyedJaggedTensor(keys=keys, values=remapped, lengths=features.lengths(),
                                 weights=features.weights_or_none(), stride=features.stride())

    @torch.no_grad()
    def profile(self, local: dict[str, torch.Tensor]) -> None:
        """Record this step's IDs of every rank in each table's state (new IDs claim rows)."""
        for table, module in self.mch.items():
            claiming = [ids for key, ids in local.items() if self.features[key] == (table, True)]
            ids = gather_ids(torch.cat(claiming) if claiming else torch.zeros(0, dtype=torch.int64))
            if ids.numel():
                _fit_history(module, ids)
                module.profile({table: JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})

    @torch.no_grad()
    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """Table rows of managed ``ids`` of KJT key ``key`` (the shared last row for IDs without one)."""
        table = self.features[key][0]
        jagged = {table: JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))}
        return self.mch[table].remap(jagged)[table].values()

    def resident(self, table: str) -> torch.Tensor:
        """The managed IDs that hold a row of ``table`` now (sorted; the reserved last row excluded)."""
        raw = self.mch[table]._mch_sorted_raw_ids
        return raw[raw != torch.iinfo(torch.int64).max]


class ModuloIds(ManagedIds):
    """The baseline at equal table size: row = managed ID % zch_size, no state (as ``--id-mapping
    hash`` maps raw IDs, but on the same dataset and split as the managed run it is compared with)."""

    def __init__(self, rows: dict[str, int], features: dict[str, tuple[str, bool]],
                 cfg: ManagedCollisionConfig) -> None:
        nn.Module.__init__(self)
        self.sizes = dict(rows)
        self.features = dict(features)

    def profile(self, local: dict[str, torch.Tensor]) -> None:
        pass  # stateless

    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        return ids % self.sizes[self.features[key][0]]


def _forget_progress(module: ManagedIds, incompatible_keys) -> None:
    """After a load, each MCH module re-reads its step from the loaded ``_current_iter_tensor``
    (torchrec caches it in a Python int on the first profile and never re-reads it)."""
    for mch in module.mch.values():
        mch._current_iter, mch._current_history_buffer_offset = -1, 0


def _fit_history(module: MCHManagedCollisionModule, ids: torch.Tensor) -> None:
    """Grow the module's history buffer to hold ``eviction_interval`` steps of ``ids``.

    torchrec sizes it once from the first batch it profiles (x 1.25) and silently drops the IDs
    of any larger batch; a global batch varies with the ranks' batches (the last one is short).
    Grown only between evictions, when the buffer holds nothing yet.
    """
    needed = ids.numel() * module._eviction_interval
    if module._input_history_buffer_size < needed and module._current_history_buffer_offset == 0:
        doubled = ids.repeat(2)
        module._init_history_buffers({"ids": JaggedTensor(values=doubled, lengths=torch.tensor([doubled.numel()]))})


def build_managed_ids(features: Sequence[FeatureSpec], model: ModelConfig) -> ManagedIds | None:
    """The remapper for the dataset's managed user_id/item_id (and user_history), or None without any."""
    managed = {f.name: f for f in features if is_managed(f)}
    if not managed:
        return None
    rows = {name: managed_rows(managed[name], model) for name in (USER_ID, ITEM_ID) if name in managed}
    keys = {name: (name, True) for name in rows}
    if USER_HISTORY in managed and ITEM_ID in rows:
        keys[USER_HISTORY] = (ITEM_ID, False)
    cls = ModuloIds if model.managed_collision.remap == Remap.modulo else ManagedIds
    return cls(rows, keys, model.managed_collision)
