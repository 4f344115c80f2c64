"""The experiment configs, installed as ``trec.configs`` (pyproject.toml) so that ``--config NAME`` finds them
from an installed trec; see :func:`trec.config.resolve_config_path`."""
