"""Evaluation of retrieval (retrieval.py) and ranking models."""
