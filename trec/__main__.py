"""`python -m trec` is the `trec` command."""

from trec.cli import main

raise SystemExit(main())
