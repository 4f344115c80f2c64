"""DCN-v2 ranking (see model.py)."""
