"""`trec evaluate`: test metrics of a trained run (also run at the end of `trec train`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trec.commands import add_run_dir_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a run (full-catalog top-K, ranker metrics, FAISS index)",
        description="Evaluate the run's best (or newest) checkpoint on the test split and update RUN/metrics.json.",
    )
    add_run_dir_flag(parser)
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the run's config, e.g. --set evaluation.ks=[10,50]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.checkpoint import checkpoint_for_inference, load_model_weights
    from trec.config import load_config
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.io import atomic_write_json
    from trec.metrics import format_ranking_table
    from trec.models import model_spec
    from trec.trainer import RunDir, build_sharded_task, evaluation_splits

    run_dir = RunDir(Path(args.run_dir))
    if not run_dir.config.is_file():
        raise TrecError(f"{run_dir.config}: not found (is {run_dir.root} a trec run directory?)")
    cfg = load_config(run_dir.config, args.set_overrides)
    checkpoint = checkpoint_for_inference(run_dir.root)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        dataset = PreparedDataset.open(cfg.data.path)
        if not dataset.has_split(args.split):
            raise TrecError(f"{cfg.data.path}: no '{args.split}' split")
        model, task = build_sharded_task(cfg, dataset, ctx, train=False)
        load_model_weights(checkpoint, model)
        model.eval()
        _, test_exclusions = evaluation_splits(dataset)
        exclusions = test_exclusions if args.split == "test" else ["train"]
        metrics = model_spec(cfg.model).evaluate(task, dataset, args.split, exclusions, cfg, ctx)
        if ctx.is_main:
            previous = json.loads(run_dir.metrics.read_text()) if run_dir.metrics.is_file() else {}
            prefix = "" if args.split == "test" else f"{args.split}/"
            atomic_write_json(run_dir.metrics, previous | {prefix + k: v for k, v in metrics.items()}
                              | {"evaluated_checkpoint": str(checkpoint)})
            print(format_ranking_table(metrics, {"model": "", "popularity": "popularity/"}))
            print(f"wrote {run_dir.metrics}")
    return 0
