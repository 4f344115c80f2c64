"""`trec export`: export embeddings into a sharded FAISS index."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export embeddings into a sharded FAISS index")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec export' is reserved and not implemented yet (issue 6)")
