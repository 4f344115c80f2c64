"""Config loading: defaults, YAML, dotted overrides, and one-line errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trec.config import (
    LRDecay,
    PipelineKind,
    ShardingKind,
    TrecConfig,
    config_to_dict,
    save_config,
)
from trec.models import load_config
from trec.errors import TrecError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, TrecConfig)
    assert cfg.training.pipeline == PipelineKind.sparse_dist
    assert cfg.evaluation.ks == [10]


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 256\noptimizer:\n  decay: cosine\n")
    cfg = load_config(path, ["data.batch_size=128", "sharding.sharding_types=[table_wise, column_wise]"])
    assert cfg.data.batch_size == 128
    assert cfg.optimizer.decay == LRDecay.cosine
    assert cfg.sharding.sharding_types == [ShardingKind.table_wise, ShardingKind.column_wise]
    assert cfg.data.eval_batch_size == 4096  # untouched default


def test_per_table_sections_are_typed(tmp_path):
    path = write(tmp_path, "model:\n  tables:\n    item_id: {embedding_dim: 32}\n")
    cfg = load_config(path)
    assert cfg.model.tables["item_id"].embedding_dim == 32


def test_misspelled_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "data:\n  batch_sise: 3\n")
    with pytest.raises(TrecError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key 'data.batch_sise'")
    assert "batch_size" in message
    assert "\n" not in message


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trainig:\n  epochs: 3\n")
    with pytest.raises(TrecError, match=r"unknown key 'trainig' \(did you mean 'training'\?\)"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "training:\n  epochs: many\n")
    with pytest.raises(TrecError, match=r"exp.yaml: key 'training.epochs': Value 'many' .*Integer"):
        load_config(path)


def test_invalid_choice_lists_choices(tmp_path):
    with pytest.raises(TrecError, match=r"override 'optimizer.sparse=adamm': key 'optimizer.sparse': "
                                        r"Invalid value 'adamm', expected one of \[rowwise_adagrad"):
        load_config(None, ["optimizer.sparse=adamm"])


def test_misspelled_override_key():
    with pytest.raises(TrecError, match=r"override 'model.two_tower.temprature=0.1': unknown key "
                                        r"'model.two_tower.temprature' \(did you mean 'temperature'"):
        load_config(None, ["model.two_tower.temprature=0.1"])


def test_override_without_equals():
    with pytest.raises(TrecError, match="expected KEY=VALUE"):
        load_config(None, ["data.batch_size"])


def test_missing_file(tmp_path):
    with pytest.raises(TrecError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 3\n  ks: [1\n")
    with pytest.raises(TrecError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(TrecError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["training.epochs=7", "model.name=dcn", "evaluation.ks=[5, 10]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not list((tmp_path / "run").glob(".*tmp"))  # written atomically, no temp file left


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)
