"""Online serving: a servable bundle (bundle.py) and the recommender over it (recommender.py).

Serving loads what `trec export` wrote; it never imports the training loop, run loading or
DistributedModelParallel (an import-linter contract in pyproject.toml).
"""

from trec.serving.recommender import Recommender, Settings
from trec.serving.requests import RecommendedItem, RecommendRequest, RecommendResponse, RequestError

__all__ = ["RecommendRequest", "RecommendResponse", "RecommendedItem", "Recommender", "RequestError", "Settings"]
