"""`trec search`: search a FAISS index for a user."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("search", help="search a FAISS index for a user")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec search' is reserved and not implemented yet (issue 6)")
