"""The `trec` command line (also `python -m trec`).

Sub-commands live one per module in :mod:`trec.commands`; this file only assembles them and
turns a :class:`~trec.errors.TrecError` into one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from trec import __version__
from trec.errors import TrecError

# Order is the order `trec --help` lists them in.
_COMMAND_MODULES = (
    "env",
    "config_cmd",
    "data",
    "train",
    "evaluate",
    "export",
    "search",
    "recommend",
    "bench",
)

_DESCRIPTION = """\
trec: train sharded two-tower retrieval and DCN-v2 ranking models with TorchRec,
and export item embeddings into a sharded FAISS index.

typical flow:
  trec data prepare movielens --source ../shared/datasets/ml-100k --out data/ml100k
  torchx run -s local_cwd ./launchers/components.py:train -j 1x2 -- \\
      --config configs/movielens_two_tower.yaml --data data/ml100k --run-dir runs/tt
  trec export --run-dir runs/tt --out exports/tt
  trec search --index exports/tt --run-dir runs/tt --user 42 -k 10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trec", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"trec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"trec.commands.{name}").register(subparsers)
    return parser


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank{os.environ.get('RANK', '0')}] " if world > 1 else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrecError as error:
        print(f"{_rank_prefix()}error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
