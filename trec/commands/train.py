"""`trec train`: train a model on sharded embeddings (run it under torchrun/torchx for several ranks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trec.commands import add_config_flags, add_data_flag, add_run_dir_flag, config_overrides, is_main_process

STOPPED_EXIT = 143
"""Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, as a shell
reports a terminated process): not success, so `make` stops and torchelastic restarts the group
(which resumes) where restarts are left."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (two-tower or DCN-v2) on sharded embeddings",
        description="Train into --run-dir, resuming from its newest complete checkpoint if it has one, "
        "then evaluate on the test split and write RUN/metrics.json. Without --config, the run's own "
        "config.yaml is used (to resume or extend a run). Resuming refuses a config that changes the "
        "model's shapes or the training's meaning, and a dataset other than the run's; a finished run "
        "(final step reached or early-stopped) trains nothing. On SIGTERM, training saves a checkpoint "
        f"at the next step boundary and exits with status {STOPPED_EXIT}; the same command resumes it.",
    )
    add_config_flags(parser)
    add_data_flag(parser)
    add_run_dir_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.api import train, training_config

    run_dir = Path(args.run_dir)
    cfg = training_config(args.config, getattr(args, "data", None), run_dir, config_overrides(args))
    outcome = train(cfg, None, run_dir)
    if is_main_process():
        report(outcome, run_dir)
    return STOPPED_EXIT if outcome.status == "stopped" else 0


def report(outcome, run_dir: Path) -> None:
    """What rank 0 prints about a :class:`~trec.trainer.TrainOutcome`."""
    from trec.metrics import format_metrics

    if outcome.status == "finished":
        print(f"run already finished at step {outcome.step} ({outcome.reason}); nothing to train "
              f"(its metrics: {run_dir / 'metrics.json'})")
    elif outcome.status == "stopped":
        print(f"{outcome.reason}: stopped at step {outcome.step} with a checkpoint; run the same command to "
              "resume", file=sys.stderr)
    else:
        print(format_metrics(outcome.metrics))
        print(f"wrote {run_dir / 'metrics.json'}")
