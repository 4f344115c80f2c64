"""`python -m trec` is the `trec` command."""

from trec.cli import run_cli

run_cli()
