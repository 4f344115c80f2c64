"""`trec train`: train a model on sharded embeddings (run it under torchrun/torchx for several ranks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trec.commands import add_config_flags, add_data_flag, add_run_dir_flag, config_overrides

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


def resolve_config(args: argparse.Namespace, run_dir: Path):
    """--config (or the run's saved config.yaml) + overrides, with --data as data.path."""
    from trec.models import load_config
    from trec.errors import TrecError

    source = args.config or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
    if source is None:
        raise TrecError(f"no --config given and {run_dir / 'config.yaml'} does not exist")
    cfg = load_config(source, config_overrides(args))
    if getattr(args, "data", None):
        cfg.data.path = args.data
    if not cfg.data.path:
        raise TrecError(f"{source}: data.path is empty; pass --data DIR (a prepared dataset)")
    # Absolute, so that the run's config.yaml still finds the data from any working directory.
    cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg


def run(args: argparse.Namespace) -> int:
    from trec.distributed import distributed_session
    from trec.metrics import format_metrics
    from trec.trainer import train

    run_dir = Path(args.run_dir)
    cfg = resolve_config(args, run_dir)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        outcome = train(cfg, run_dir, ctx)
        if ctx.is_main and outcome.status == "finished":
            print(f"run already finished at step {outcome.step} ({outcome.reason}); nothing to train "
                  f"(its metrics: {run_dir / 'metrics.json'})")
        elif ctx.is_main and outcome.status == "stopped":
            print(f"{outcome.reason}: stopped at step {outcome.step} with a checkpoint; run the same command to "
                  "resume", file=sys.stderr)
        elif ctx.is_main:
            print(format_metrics(outcome.metrics))
            print(f"wrote {run_dir / 'metrics.json'}")
    return STOPPED_EXIT if outcome.status == "stopped" else 0
