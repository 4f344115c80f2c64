"""Benchmarks behind `trec bench`: one module per benchmark, each with ``add_arguments`` and ``run``."""
