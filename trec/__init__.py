"""trec: a TorchRec-based training stack for sharded two-tower retrieval and DCN-v2 ranking.

The Python API (README "Python API"; :mod:`trec.api`)::

    import trec

    cfg = trec.load_config("movielens_two_tower", ["training.max_steps=200"])
    outcome = trec.train(cfg, "data/ml100k", "runs/tt")     # outcome.metrics: the test metrics
    trec.export("runs/tt", "exports/tt")                    # FAISS index + servable bundle
    metrics = trec.evaluate("runs/tt", index="exports/tt")
    recommender = trec.Recommender.load("exports/tt")

Each name is imported on first use (PEP 562), so ``import trec`` (and ``trec --help``) loads no torch.
"""

import importlib
import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse throughput (measured 50x on a 2-core machine)
# as soon as another process, or trec's own prefetch thread, wants a core. Sleeping waiters
# cost nothing measurable here. Must be set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name → the module that defines it. `export` is the package trec.export itself, which is callable
# (trec/export/__init__.py): a function of that name would be replaced by the package once imported.
_API = {
    "load_config": "trec.models",
    "train": "trec.api",
    "evaluate": "trec.api",
    "Recommender": "trec.serving",
    "RecommendRequest": "trec.serving",
}

__all__ = ["Recommender", "RecommendRequest", "__version__", "evaluate", "export", "load_config", "train"]


def __getattr__(name: str):
    if name == "export":
        return importlib.import_module("trec.export")
    if name not in _API:
        raise AttributeError(f"module 'trec' has no attribute '{name}'")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
