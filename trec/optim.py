"""Optimizers: a fused sparse optimizer applied inside backward, a dense one for everything else.

Embedding tables are updated by FBGEMM's table-batched kernels during the backward pass
(``apply_optimizer_in_backward`` before sharding), so their gradients are never materialised.
The MLPs and other replicated parameters use a regular torch optimizer (with global-norm
clipping). Both follow the same warm-up/decay schedule, through torchrec's ``WarmupOptimizer``,
whose position is part of the optimizer state and so is checkpointed with it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.optim import (
    CombinedOptimizer,
    GradientClipping,
    GradientClippingOptimizer,
    KeyedOptimizerWrapper,
    RowWiseAdagrad,
    WarmupOptimizer,
    WarmupPolicy,
    WarmupStage,
)
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trec.config import DenseOptimizer, LRDecay, OptimizerConfig, SparseOptimizer

_SPARSE = {
    SparseOptimizer.rowwise_adagrad: RowWiseAdagrad,
    SparseOptimizer.adagrad: torch.optim.Adagrad,
    SparseOptimizer.adam: torch.optim.Adam,
    SparseOptimizer.sgd: torch.optim.SGD,
}

_DENSE = {
    DenseOptimizer.adam: torch.optim.Adam,
    DenseOptimizer.adamw: torch.optim.AdamW,
    DenseOptimizer.sgd: torch.optim.SGD,
    DenseOptimizer.adagrad: torch.optim.Adagrad,
}


def attach_sparse_optimizer(model: nn.Module, cfg: OptimizerConfig) -> None:
    """Register the fused optimizer on every EmbeddingBagCollection (call before sharding)."""
    kwargs = {"lr": cfg.sparse_lr, "weight_decay": cfg.sparse_weight_decay}
    if cfg.sparse in (SparseOptimizer.rowwise_adagrad, SparseOptimizer.adagrad, SparseOptimizer.adam):
        kwargs["eps"] = cfg.sparse_eps
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(_SPARSE[cfg.sparse], module.parameters(), kwargs)


def _schedule(cfg: OptimizerConfig, total_steps: int) -> list[WarmupStage]:
    """Linear warm-up from 0, then constant, linear or cosine decay to ``min_lr_ratio``."""
    stages = []
    if cfg.warmup_steps > 0:
        stages.append(WarmupStage(policy=WarmupPolicy.LINEAR, max_iters=cfg.warmup_steps, value=0.0))
    end = max(total_steps, cfg.warmup_steps + 1)
    if cfg.decay == LRDecay.linear:
        stages.append(
            WarmupStage(
                policy=WarmupPolicy.INTERPOLATE,
                max_iters=end,
                value=1.0,
                end_value=cfg.min_lr_ratio,
                start_interpolating_iters=cfg.warmup_steps,
            )
        )
    elif cfg.decay == LRDecay.cosine:
        # One half-period of SGDR over the whole run is a plain cosine decay to min_lr_ratio.
        stages.append(
            WarmupStage(
                policy=WarmupPolicy.COSINE_ANNEALING_WARM_RESTARTS,
                max_iters=end,
                value=cfg.min_lr_ratio,
                sgdr_period=2 * end,
            )
        )
    return stages


def build_optimizer(sharded: nn.Module, cfg: OptimizerConfig, total_steps: int) -> CombinedOptimizer:
    """The step-able optimizer of a DMP model: scheduled fused (sparse) + clipped dense parts."""
    dense_params = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    dense_cls = _DENSE[cfg.dense]
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: dense_cls(params, lr=cfg.dense_lr, weight_decay=cfg.dense_weight_decay),
    )
    if cfg.grad_clip_norm > 0:
        dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm)
    stages = _schedule(cfg, total_steps)
    return CombinedOptimizer(
        [
            ("sparse", WarmupOptimizer(sharded.fused_optimizer, stages, lr=cfg.sparse_lr)),
            ("dense", WarmupOptimizer(dense, stages, lr=cfg.dense_lr)),
        ]
    )


def current_learning_rates(optimizer: CombinedOptimizer) -> dict[str, float]:
    """{'sparse': lr, 'dense': lr} as the schedule set them for the next step."""
    return {name: opt.param_groups[0]["lr"] for name, opt in optimizer.optimizers if opt.param_groups}
