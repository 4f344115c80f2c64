"""trec: a TorchRec-based training stack for sharded two-tower retrieval and DCN-v2 ranking."""

__version__ = "0.1.0"
