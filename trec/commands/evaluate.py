"""`trec evaluate`: evaluate a run (full-catalog top-K, ranker metrics, FAISS index)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a run (full-catalog top-K, ranker metrics, FAISS index)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec evaluate' is reserved and not implemented yet (issue 4)")
