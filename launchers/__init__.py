"""TorchX side of trec: components (``components.py``, loaded by path from a checkout or as ``trec.NAME`` through
the ``torchx.components`` entry points of an installed trec) and the restricted Kubernetes scheduler."""
