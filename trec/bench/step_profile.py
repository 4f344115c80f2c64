"""Where a training step's time goes: torch.profiler events sorted into table kernels, dense math
and the plumbing around them (`trec bench train --profile`).

Every profiled event's *self* time goes to exactly one part, decided by the event and the scopes
above it (torchrec names its stages: ``## start_sparse_data_dist ##``, ``[output_dist]_...``):

- **table kernels**: FBGEMM's lookup and fused backward + update kernels, and what they call;
- **dense math**: the MLPs, logits, loss and their backward, and the dense optimizer's arithmetic,
  the work the plain-PyTorch baselines do too;
- the rest is plumbing: **input dist** (splitting the KJT per table, all-to-all, pipelining),
  **lookup glue** (offsets, bounds checks, dtype casts before a kernel), **output dist**
  (all-to-all back, permuting pooled embeddings to the model's key order), **DDP** (gradient
  all-reduce, reducer hooks, gradient accumulation), **optimizer bookkeeping** (wrappers,
  schedule, zero_grad), **copies and regrouping** (cat, slice, casts outside the math) and
  **Python** (interpreter time of the model, torchrec and the pipeline).
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Callable

TABLES, DENSE = "table kernels", "dense math"
PLUMBING = ("input dist", "lookup glue", "output dist", "DDP", "optimizer bookkeeping", "copies and regrouping",
            "Python")
PARTS = (TABLES, DENSE, *PLUMBING)

_TABLE_KERNEL = re.compile(r"split_embedding_(codegen_forward_\w*cpu|backward_codegen_\w*cpu)")
# torchrec's scope names → part (the nearest scope wins)
_SCOPES = (
    (re.compile(r"sparse_data_dist|copy_batch_to_gpu|assemble_KJT|\[splits_dist\]|\[input_dist\]|all2all_data|"
                r"KJT\w*Awaitable|SplitsAllToAll|KJTAllToAll|permute_2D_sparse"), "input dist"),
    (re.compile(r"\[output_dist\]|EmbeddingBagCollectionAwaitable|permute_pooled_embs|PermutePooledEmbs"), "output dist"),
    (re.compile(r"c10d::allreduce|reducer::|AccumulateGrad"), "DDP"),
    (re.compile(r"#Adam\.step|#AdamW\.step|#SGD\.step|#Adagrad\.step"), "dense optimizer"),
    (re.compile(r"zero_grad|Optimizer\.step|## optimizer"), "optimizer bookkeeping"),
    (re.compile(r"^\[lookup\]"), "lookup glue"),
)
_MATH_OPS = {
    "mm", "addmm", "bmm", "matmul", "linear", "relu", "clamp_min", "clamp", "threshold_backward", "_log_softmax",
    "_log_softmax_backward_data", "log_softmax", "cross_entropy_loss", "nll_loss_forward", "nll_loss_backward",
    "nll_loss_nd", "nll_loss", "masked_fill_", "masked_fill", "eq", "ne", "ge", "le", "gt", "lt", "bitwise_and",
    "__and__", "bitwise_not", "any", "eye", "div", "div_", "mul", "mul_", "sum", "neg", "linalg_vector_norm", "norm",
    "index", "log", "exp", "sqrt", "add", "add_", "sub", "rsub", "addcmul_", "addcdiv_", "lerp_", "sigmoid",
    "binary_cross_entropy_with_logits", "softplus", "fill_diagonal_", "topk", "dropout", "arange", "mean", "pow",
    "sigmoid_backward", "where", "tanh", "index_select", "embedding_dense_backward",
}


def _part_of(chain: list[str]) -> str:
    """The part of an event from its name and its ancestors' names (``chain``: the event first)."""
    if any(_TABLE_KERNEL.search(name) for name in chain):
        return TABLES
    for name in chain:
        for pattern, part in _SCOPES:
            if pattern.search(name):
                if part == "dense optimizer":  # its arithmetic is the baselines' too; its Python is not
                    return DENSE if chain[0].startswith("aten::") else "optimizer bookkeeping"
                return part
    backward = next((name for name in chain if name.startswith("autograd::engine::evaluate_function: ")), None)
    if backward is not None:
        node = backward.split(": ", 1)[1]
        op = re.sub(r"Backward\d*$", "", node).lower()
        math = op in {o.replace("_", "") for o in _MATH_OPS} or op in ("logsoftmax", "nllloss", "maskedfill",
                                                                        "linalgvectornorm", "clampmin", "t", "expand",
                                                                        "unsqueeze", "view", "transpose")
        return DENSE if math else "copies and regrouping"
    aten = [name for name in chain if name.startswith("aten::")]
    if not aten:
        return "Python"
    outermost = aten[-1].removeprefix("aten::")
    return DENSE if outermost in _MATH_OPS else "copies and regrouping"


def split_events(events) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds of self time and number of events per part over ``events`` (torch.profiler
    FunctionEvents)."""
    totals, counts = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0)
    for event in events:
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        part = _part_of(chain)
        totals[part] += event.self_cpu_time_total
        counts[part] += 1
    return totals, counts


def profile_step(step: Callable[[], None], steps: int) -> dict:
    """Profile ``steps`` calls of ``step`` (already warmed up): ms per step of each part.

    The profiler records wall time, which other jobs on a shared machine inflate, so each part's
    share of the profile is scaled to the CPU time of ``steps`` unprofiled calls timed first
    (``ms``, ``cpu_ms_per_step``). The profiler also costs about the same per recorded event, which
    inflates the parts made of many small operations (the plumbing) most: ``ms_less_profiler``
    charges the profiled steps' extra CPU time to the parts by their event counts instead (an
    estimate, as noisy as the difference of two timings).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    started = time.process_time()
    for _ in range(steps):
        step()
    cpu_ms = (time.process_time() - started) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.process_time()
        for _ in range(steps):
            with record_function("## step ##"):  # its self time: Python outside every other event
                step()
        profiled_ms = (time.process_time() - started) * 1e3 / steps
    totals, counts = split_events(prof.events())
    wall_ms = sum(totals.values()) / 1e3 / steps or 1.0
    shares = {part: totals[part] / 1e3 / steps / wall_ms for part in PARTS}
    per_event = max(profiled_ms - cpu_ms, 0.0) / max(sum(counts.values()) / steps, 1)
    kept = {part: max(shares[part] * profiled_ms - counts[part] / steps * per_event, 0.0) for part in PARTS}
    scale = cpu_ms / (sum(kept.values()) or 1.0)
    return {"cpu_ms_per_step": cpu_ms, "profiled_cpu_ms_per_step": profiled_ms,
            "events_per_step": sum(counts.values()) / steps,
            "ms": {part: shares[part] * cpu_ms for part in PARTS},
            "ms_less_profiler": {part: kept[part] * scale for part in PARTS}}


def profile_pipeline(pipeline, batches: list, steps: int, warmup: int = 3) -> dict:
    """:func:`profile_step` of ``pipeline.progress`` over ``batches`` (reused in a cycle), after ``warmup`` steps."""
    cycle = itertools.cycle(batches)
    for _ in range(warmup):
        pipeline.progress(cycle)
    return profile_step(lambda: pipeline.progress(cycle), steps)


def profile_table(profiles: dict[str, dict]) -> str:
    """A markdown table of ms per step by part, one column per profile (``{column name: profile}``)."""
    names = list(profiles)
    lines = ["| part of the step | " + " | ".join(f"{name} ms" for name in names) + " |",
             "| --- |" + " ---: |" * len(names)]

    def row(label: str, value: Callable[[dict], float]) -> None:
        lines.append(f"| {label} | " + " | ".join(f"{value(profiles[name]):.1f}" for name in names) + " |")

    for part in PARTS:
        row(part, lambda p, part=part: p["ms"][part])
    row("**plumbing** (all but table kernels and dense math)", lambda p: sum(p["ms"][x] for x in PLUMBING))
    row("plumbing less the profiler's cost per event (estimate)",
        lambda p: sum(p["ms_less_profiler"][x] for x in PLUMBING))
    row("step (process CPU time, unprofiled)", lambda p: p["cpu_ms_per_step"])
    return "\n".join(lines)
