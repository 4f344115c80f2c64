"""Plain-PyTorch embedding baselines for `trec bench train` (not used by training itself)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor, KeyedTensor

from trec.config import TrecConfig


class PlainEmbeddingBags(nn.Module):
    """A drop-in for an EmbeddingBagCollection made of plain PyTorch modules.

    ``sparse=True``: ``nn.EmbeddingBag(sparse=True)`` (sparse gradients, for SparseAdam);
    ``sparse=False``: ``nn.Embedding`` with a dense gradient and pooling by ``index_add``.
    forward(KJT) → KeyedTensor of R X (sum of widths), like the EBC it replaces.
    """

    def __init__(self, tables, sparse: bool) -> None:
        super().__init__()
        self.names = [table.feature_names[0] for table in tables]
        self.dims = [table.embedding_dim for table in tables]
        self.means = [table.pooling.value == "MEAN" for table in tables]
        self.sparse = sparse
        if sparse:
            self.tables = nn.ModuleList(
                nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode="mean" if mean else "sum", sparse=True)
                for t, mean in zip(tables, self.means))
        else:
            self.tables = nn.ModuleList(nn.Embedding(t.num_embeddings, t.embedding_dim) for t in tables)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = []
        for name, table, mean in zip(self.names, self.tables, self.means):
            jagged = features[name]
            if self.sparse:
                pooled.append(table(jagged.values(), jagged.offsets()[:-1]))
                continue
            lengths = jagged.lengths()
            rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            out = torch.zeros(len(lengths), table.embedding_dim).index_add_(0, rows, table(jagged.values()))
            pooled.append(out / lengths.clamp_min(1)[:, None] if mean else out)
        return KeyedTensor(keys=self.names, length_per_key=self.dims, values=torch.cat(pooled, dim=1))


def baseline_task(cfg: TrecConfig, dataset, sparse: bool) -> nn.Module:
    """trec's two-tower task with its EBCs swapped for plain PyTorch embeddings."""
    from trec.models.two_tower.model import RetrievalTask

    task = RetrievalTask(cfg.model, cfg.model.two_tower, dataset)
    for tower in (task.model.user_tower, task.model.item_tower):
        tower.ebc = PlainEmbeddingBags(tower.ebc.embedding_bag_configs(), sparse)
    return task


def baseline_optimizers(task: nn.Module, sparse: bool) -> list[torch.optim.Optimizer]:
    """(a) SparseAdam for the tables + Adam for the rest; (b) Adam for everything."""
    tables = [p for name, p in task.named_parameters() if ".ebc." in name]
    others = [p for name, p in task.named_parameters() if ".ebc." not in name]
    if sparse:
        return [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(others, lr=1e-3)]
    return [torch.optim.Adam(tables + others, lr=1e-3)]


def training_step(task, optimizers):
    """step(batch): forward, backward and every optimizer of a baseline task (plain PyTorch tables)."""
    def step(batch) -> None:
        loss, _ = task(batch)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step
