"""`trec bench`: benchmarks (data, train, index)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (data, train, index)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec bench' is reserved and not implemented yet (issue 3)")
