"""`trec bench data` (issue 3)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise TrecError("'trec bench data' is not implemented yet (issue 3)")
