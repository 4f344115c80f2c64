"""Evaluation: retrieval (retrieval.py: full-catalog top-K) and ranking (ranking.py: click metrics of a
ranker), the protocol's splits (protocol.py), the top-k sources both rank through (topk.py: exact,
popularity, FAISS index), candidate generation and hard-negative mining (candidates.py), and one
served user (served.py)."""
