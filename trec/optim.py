"""Optimizers: a fused sparse optimizer applied inside backward, a dense one for everything else.

Embedding tables are updated by FBGEMM's table-batched kernels during the backward pass
(``apply_optimizer_in_backward`` before sharding), so their gradients are never materialised.
The MLPs and other replicated parameters use a regular torch optimizer (with global-norm
clipping). Both follow the same warm-up/decay schedule, through torchrec's ``WarmupOptimizer``,
whose position is part of the optimizer state and so is checkpointed with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import (
    CombinedOptimizer,
    GradientClipping,
    GradientClippingOptimizer,
    KeyedOptimizerWrapper,
    RowWiseAdagrad,
    WarmupOptimizer,
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
    """Register the fused optimizer on every EmbeddingBagCollection and EmbeddingCollection (call before
    sharding)."""
    kwargs = {"lr": cfg.sparse_lr, "weight_decay": cfg.sparse_weight_decay}
    if cfg.sparse in (SparseOptimizer.rowwise_adagrad, SparseOptimizer.adagrad, SparseOptimizer.adam):
        kwargs["eps"] = cfg.sparse_eps
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            apply_optimizer_in_backward(_SPARSE[cfg.sparse], module.parameters(), kwargs)


def lr_multiplier(cfg: OptimizerConfig, total_steps: int, step: int) -> float:
    """Factor of the base learning rate for the optimizer step after ``step`` completed steps.

    Linear warm-up from 0 over ``warmup_steps``, then constant, linear or cosine decay that reaches
    exactly ``min_lr_ratio`` on the last step (``step == total_steps - 1``) and stays there.
    """
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.decay == LRDecay.none:
        return 1.0
    # Decay spans the steps after warm-up up to the last one; with no room it is already at its end.
    span = total_steps - 1 - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    if cfg.decay == LRDecay.linear:
        return 1.0 + (cfg.min_lr_ratio - 1.0) * progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduledOptimizer(WarmupOptimizer):
    """torchrec's ``WarmupOptimizer`` driven by :func:`lr_multiplier`.

    ``WarmupOptimizer`` keeps its position (steps taken) in the optimizer state, so a checkpoint
    restores the schedule exactly; its stages cannot express a decay that starts after warm-up
    and ends on the last step (its cosine counts from step 0 and its interpolation ends one
    step after the last), so only the per-step factor is replaced here: ``_set_lr`` is the hook
    ``WarmupOptimizer`` calls at construction, after each step and after a checkpoint load
    (torchrec 1.8; ``tests/test_consistency.py`` checks all three paths).
    """

    def __init__(self, optimizer, cfg: OptimizerConfig, total_steps: int, lr: float) -> None:
        # Set before super().__init__, which applies the factor of step 0.
        self._multiplier = lambda step: lr_multiplier(cfg, total_steps, step)
        super().__init__(optimizer, [], lr=lr)

    def _set_lr(self, iter_: int, stage_id: int) -> None:
        lr = self._lr * self._multiplier(iter_)
        for param_group in self.param_groups:
            param_group[self._lr_param] = lr


def build_optimizer(sharded: nn.Module, cfg: OptimizerConfig, total_steps: int) -> CombinedOptimizer:
    """The step-able optimizer of a DMP model: scheduled fused (sparse) + clipped dense parts (no dense
    part for a model made of embedding tables only, as matrix factorization: torch refuses an empty optimizer)."""
    sparse = ("sparse", ScheduledOptimizer(sharded.fused_optimizer, cfg, total_steps, lr=cfg.sparse_lr))
    dense_params = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    if not dense_params:
        return CombinedOptimizer([sparse])
    dense_cls = _DENSE[cfg.dense]
    dense = KeyedOptimizerWrapper(
        dense_params,
        # foreach: each update op runs once over all the parameters, not in a Python loop (same values).
        lambda params: dense_cls(params, lr=cfg.dense_lr, weight_decay=cfg.dense_weight_decay, foreach=True),
    )
    if cfg.grad_clip_norm > 0:
        dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm)
    return CombinedOptimizer(
        [sparse, ("dense", ScheduledOptimizer(dense, cfg, total_steps, lr=cfg.dense_lr))]
    )


def current_learning_rates(optimizer: CombinedOptimizer) -> dict[str, float]:
    """{'sparse': lr, 'dense': lr} as the schedule set them for the next step."""
    return {name: opt.param_groups[0]["lr"] for name, opt in optimizer.optimizers if opt.param_groups}
