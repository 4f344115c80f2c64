"""TorchX side of trec: components (``components.py``, loaded by path) and the restricted Kubernetes scheduler."""
