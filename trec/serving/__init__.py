"""Online serving: a servable bundle (bundle.py) and the recommender over it (recommender.py).

Serving loads what `trec export` wrote; it never imports the training loop, run loading or
DistributedModelParallel (an import-linter contract in pyproject.toml).
"""
