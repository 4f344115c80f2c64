"""`trec data`: prepare datasets (trec data prepare SOURCE ...)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets (trec data prepare SOURCE ...)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec data' is reserved and not implemented yet (issue 3)")
