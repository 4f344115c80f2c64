"""`trec recommend`: titled recommendations for one user (two-stage)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("recommend", help="titled recommendations for one user (two-stage)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec recommend' is reserved and not implemented yet (issue 5)")
