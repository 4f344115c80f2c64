"""`trec train`: train a model (two-tower or DCN-v2) on sharded embeddings."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (two-tower or DCN-v2) on sharded embeddings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec train' is reserved and not implemented yet (issue 4)")
