"""Two-tower retrieval (see model.py)."""
