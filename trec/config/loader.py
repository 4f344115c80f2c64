"""Reading and writing configs: strict safe YAML, dotted overrides, OmegaConf structured merge."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from trec.config.sections import TrecConfig
from trec.config.validation import validate_config
from trec.errors import TrecError
from trec.io import atomic_write_text, quote


_MOVED_KEYS = {"training.log_every_steps": "logging.log_every_steps"}


def _describe(error: oc_errors.OmegaConfBaseException) -> str:
    """One line for an OmegaConf error: the dotted key and what was wrong with it."""
    key = getattr(error, "full_key", None) or "?"
    first = str(error).splitlines()[0]
    if len(first) > 200:  # OmegaConf quotes the whole bad value
        first = first[:200] + "..."
    if isinstance(error, oc_errors.ConfigKeyError) or "not in" in first:
        match = re.search(r"Did you mean(?: one of)?: (.*?)\??$", first)
        hint = f" (did you mean {match.group(1)}?)" if match else ""
        if key in _MOVED_KEYS:
            hint = f" (did you mean '{_MOVED_KEYS[key]}'?)"
        return f"unknown key '{key}'{hint}"
    return f"key '{key}': {first}"


def _merge(base, layer, where: str):
    try:
        return OmegaConf.merge(base, layer)
    except oc_errors.OmegaConfBaseException as error:
        raise TrecError(f"{where}: {_describe(error)}") from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects), stricter in three ways:

    - no aliases (``*name``): a config is a small tree of literal values, and aliases are how a
      file of a few hundred bytes expands into billions of nodes (or into a cycle) once merged;
    - no duplicate keys: PyYAML keeps the last one silently, so one of two settings would vanish;
    - keys are strings (OmegaConf's dotted keys).
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported in a config: write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {quote(key)} is not a string", key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {quote(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_MAX_CONFIG_BYTES = 1 << 20


def _load_yaml(text: str):
    """Parse ``text`` with :class:`_ConfigLoader`; may raise yaml.YAMLError, ValueError or RecursionError."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def packaged_configs() -> dict[str, Path]:
    """The configs trec ships (configs/*.yaml, installed as the package ``trec.configs``) by name."""
    from importlib import resources

    try:
        root = resources.files("trec.configs")
    except ModuleNotFoundError:  # a source tree on PYTHONPATH, not installed: configs/ is beside it
        return {}
    return {entry.name[: -len(".yaml")]: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` when it exists; otherwise the config trec ships under that name, so that an installed trec needs
    no checkout: ``movielens_two_tower``, ``movielens_two_tower.yaml`` and ``configs/movielens_two_tower.yaml``
    all name configs/movielens_two_tower.yaml. Any other path is returned as given (and reported missing)."""
    given = Path(path)
    if given.exists() or given.parent not in (Path("."), Path("configs")):
        return given
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    return packaged_configs().get(name, given)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        shipped = ", ".join(sorted(packaged_configs())) if path.parent in (Path("."), Path("configs")) else ""
        raise TrecError(f"config file not found: {path}" + (f" (trec ships: {shipped})" if shipped else ""))
    data = path.read_bytes()
    if len(data) > _MAX_CONFIG_BYTES:
        raise TrecError(f"{path}: {len(data):,} bytes is too large for a config (at most {_MAX_CONFIG_BYTES:,})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TrecError(f"{path}:{line}: not UTF-8 text (byte {error.start}); a config is a UTF-8 YAML file") from None
    try:
        content = _load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TrecError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise TrecError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise TrecError(f"{path}: invalid YAML: {str(error).splitlines()[0][:200]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise TrecError(f"{path}: expected a mapping of sections at the top level")
    _refuse_interpolations(content, str(path))
    return content


def _refuse_interpolations(node: object, where: str, key: str = "") -> None:
    """OmegaConf would resolve ``${...}`` (``${oc.env:HOME}`` reads the environment) when the config
    is built, and a run's saved config.yaml would then hold the resolved value (a secret, a home
    directory). A config holds literal values only, so any ``${`` in a string is refused."""
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_interpolations(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for position, value in enumerate(node):
            _refuse_interpolations(value, where, f"{key}[{position}]")
    elif isinstance(node, str) and "${" in node:
        raise TrecError(f"{where}: key '{key}': {quote(node)}: '${{...}}' interpolations are not supported "
                        "(a config holds literal values; write the value itself)")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise TrecError(f"override {quote(text)}: expected KEY=VALUE with a dotted key, e.g. data.batch_size=512")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    except ValueError:  # an integer of more digits than Python converts
        raise TrecError(f"override {quote(text)}: value is not a usable number") from None
    _refuse_interpolations(value, f"override {quote(text)}", key.strip())
    return key.strip(), value


def _override_layer(key: str, value: object) -> dict:
    layer: dict = {}
    node = layer
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


def load_config(path: str | os.PathLike | None, overrides: Sequence[str], schema: type[TrecConfig]) -> TrecConfig:
    """Defaults ← YAML file ← `key=value` overrides, validated against the dataclasses of ``schema``.

    ``path`` is a YAML file or the name of a config trec ships (see :func:`resolve_config_path`).

    ``schema`` is :class:`TrecConfig` with a section per registered model under ``model``: use
    :func:`trec.models.load_config`, which passes it. Raises TrecError naming the file (or the
    override) and the dotted key on an unknown key, a wrong type or an invalid choice.
    """
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = resolve_config_path(path)
        merged = _merge(merged, OmegaConf.create(read_yaml(Path(path))), str(path))
    return _build(merged, overrides, str(path) if path is not None else "config")


def apply_overrides(cfg: TrecConfig, overrides: Sequence[str]) -> TrecConfig:
    """A copy of the built config ``cfg`` with the dotted ``overrides`` applied, validated like a loaded one."""
    return _build(OmegaConf.structured(cfg), overrides, "config")


def _build(merged, overrides: Sequence[str], where: str) -> TrecConfig:
    for text in overrides:
        key, value = _parse_override(text)
        merged = _merge(merged, OmegaConf.create(_override_layer(key, value)), f"override {quote(text)}")
    try:
        cfg = OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as error:
        raise TrecError(f"{where}: {_describe(error)}") from None
    validate_config(cfg, f"{where} with overrides" if overrides else where)
    return cfg


def config_to_yaml(cfg: TrecConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: TrecConfig) -> dict:
    """Plain nested dict of the config (enums as their string values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def save_config(cfg: TrecConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically), so a run directory records what produced it."""
    atomic_write_text(Path(path), config_to_yaml(cfg))
