"""Files trec reads back cannot run code or smuggle bad numbers in (issue 12, item 1).

Checkpoint metadata is unpickled with an allow-list of DCP's own classes; trainer state, export
and dataset manifests are type-checked field by field; paths in manifests stay inside their
directory; FAISS shard ids and the indices of a prepared dataset are range-checked, since
FBGEMM only logs an out-of-range index and looks up row 0 instead.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from training import CONFIG, OVERRIDES, run_command, train_command, trec_command

from trec.checkpoint import (
    SafeFileSystemReader,
    checkpoint_for_inference,
    complete_checkpoints,
    load_checkpoint,
    read_trainer_state,
)
from trec.data import InteractionReader, PreparedDataset
from trec.errors import TrecError
from trec.io import sha256_file


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a planted file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_error_line(proc) -> str:
    """The refusal of a CLI run: exit 2, no traceback, exactly one ``error:`` line (returned)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # Found anywhere on a line: a progress bar (tqdm, on stderr) may precede it without a newline.
    errors = re.findall(r"(?:^|\W)(error: [^\r\n]*)", proc.stderr)
    assert len(errors) == 1, output[-3000:]
    return errors[0]


# --------------------------------------------------------------------------------------------
# a real 2-rank run and its export
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ml100k_prepared) -> Path:
    """A 2-rank two-tower run of 6 steps on ML-100K (checkpoints step-3, step-6, best)."""
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    run_command(train_command(run_dir, ml100k_prepared, "training.max_steps=6", "checkpoint.every_steps=3",
                              "training.eval_every_steps=6"))
    return run_dir


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe-export") / "export"
    run_command(trec_command(1, "export", "--run-dir", tiny_run, "--out", out))
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def plant(checkpoint: Path, marker: Path) -> None:
    """Rewrite ``checkpoint/.metadata`` as the real metadata carrying a payload in ``planner_data``.

    The result is still a loadable checkpoint for plain ``pickle.load``: the payload runs and
    nothing else looks wrong.
    """
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    metadata.planner_data["planted"] = _Payload(marker)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata, protocol=4))


# --------------------------------------------------------------------------------------------
# checkpoint metadata: nothing runs
# --------------------------------------------------------------------------------------------


def test_planted_metadata_payload_does_not_run_on_evaluate(run_copy, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "pwned"
    for checkpoint in [*complete_checkpoints(run_copy / "checkpoints"), run_copy / "checkpoints" / "best"]:
        plant(checkpoint, marker)
    # The planted file is live: torch's own reader runs it.
    FileSystemReader(checkpoint).read_metadata()
    assert marker.exists()
    marker.unlink()

    proc = run_command(trec_command(1, "evaluate", "--run-dir", run_copy), check=False)
    assert not marker.exists(), "code planted in .metadata ran"
    line = one_error_line(proc)
    assert line.startswith(f"error: {checkpoint_for_inference(run_copy) / '.metadata'}: refused to load global "
                           f"'{os.system.__module__}.system' (not a checkpoint metadata class"), line


def test_planted_metadata_payload_does_not_run_on_resume(run_copy, ml100k_prepared, tmp_path):
    marker = tmp_path / "pwned"
    latest = complete_checkpoints(run_copy / "checkpoints")[-1]
    plant(latest, marker)
    proc = run_command(trec_command(1, "train", "--config", CONFIG, "--data", ml100k_prepared,
                                    "--run-dir", run_copy, *OVERRIDES, "training.max_steps=9"), check=False)
    assert not marker.exists(), "code planted in .metadata ran"
    line = one_error_line(proc)
    assert f"{latest / '.metadata'}: refused to load global" in line


def test_truncated_metadata_is_one_line(run_copy):
    best = checkpoint_for_inference(run_copy)
    data = (best / ".metadata").read_bytes()
    (best / ".metadata").write_bytes(data[: len(data) // 2])
    line = one_error_line(run_command(trec_command(1, "evaluate", "--run-dir", run_copy), check=False))
    assert line.startswith(f"error: {best / '.metadata'}: not readable checkpoint metadata ("), line


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_truncated_checkpoint_data_is_refused(run_copy, damage):
    """DCP reads only the byte ranges a load needs: a .distcp cut short (or gone) is refused up front
    from the sizes .metadata records, not loaded in part (evaluate and export once succeeded)."""
    best = checkpoint_for_inference(run_copy)
    data = best / "__1_0.distcp"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    with pytest.raises(TrecError) as info:
        SafeFileSystemReader(best).read_metadata()
    expected = "truncated (" if damage == "truncate" else "cannot be read ("
    assert str(info.value).startswith(f"{data}: {expected}") and "\n" not in str(info.value), str(info.value)


def test_checkpoint_still_loads_whole(tiny_run):
    """The safe reader reads exactly what DCP wrote: every tensor of the run, unchanged."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    best = checkpoint_for_inference(tiny_run)
    reference = _load_state_dict_from_keys(checkpoint_id=str(best))["model"]
    loaded = {"model": {name: torch.zeros_like(tensor) for name, tensor in reference.items()}}
    load_checkpoint(loaded, best)
    assert loaded["model"].keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded["model"][name], tensor), name


def test_planted_bytes_entry_does_not_run(tmp_path):
    """Non-tensor entries of the .distcp files load with weights_only: DCP's default planner would run them."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint"
    dcp.save({"weights": torch.ones(3), "extra": _Payload(marker)}, checkpoint_id=str(checkpoint), no_dist=True)
    assert not marker.exists()
    state = {"weights": torch.zeros(3), "extra": None}
    with pytest.raises(TrecError, match=r"cannot be loaded \(checkpoint entry 'extra': refused or unreadable"):
        load_checkpoint(state, checkpoint)
    assert not marker.exists(), "code planted in a .distcp entry ran"


# --------------------------------------------------------------------------------------------
# trainer state: every field type-checked
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"step": "10"}, "field 'step' must be an integer >= 0, got '10'"),
    ({"step": -4}, "field 'step' must be an integer >= 0, got -4"),
    ({"epoch": 1.5}, "field 'epoch' must be an integer >= 0, got 1.5"),
    ({"world_size": 0}, "field 'world_size' must be an integer >= 1, got 0"),
    ({"complete": 1}, "field 'complete' must be true or false, got 1"),
    ({"best_metric": float("nan")}, "field 'best_metric' must be a finite number or null, got nan"),
    ({"samples": True}, "field 'samples' must be an integer >= 0, got True"),
    ({"planted": 1}, "unknown field 'planted'"),
    ({"step": None}, "field 'step' must be an integer >= 0, got None"),
])
def test_trainer_state_fields_are_type_checked(tmp_path, change, message):
    state = {"step": 10, "epoch": 0, "batch_in_epoch": 10, "samples": 5120, "best_metric": 0.1, "best_step": 10,
             "evals_without_improvement": 0, "world_size": 2, "complete": True}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state | change))
    with pytest.raises(TrecError) as info:
        read_trainer_state(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'trainer_state.json'}: {message}"), str(info.value)


def test_trainer_state_without_step_is_refused(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"epoch": 0, "world_size": 1, "complete": True}))
    with pytest.raises(TrecError, match="trainer_state.json: missing field 'step'$"):
        read_trainer_state(tmp_path)


# --------------------------------------------------------------------------------------------
# export manifest: paths stay inside, fields type-checked, shard ids range-checked
# --------------------------------------------------------------------------------------------


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def index_refusal(root: Path) -> str:
    from trec.export import ShardedIndex

    with pytest.raises(TrecError) as info:
        ShardedIndex.load(root)
    return str(info.value)


def _move_shard(manifest: dict, name: str) -> None:
    manifest["checksums"][name] = manifest["checksums"].pop(manifest["shard_files"][0])
    manifest["shard_files"][0] = name


@pytest.mark.parametrize("name, message", [
    ("../outside.faiss", "path '../outside.faiss' leaves the directory (absolute or '..')"),
    ("ABSOLUTE", "leaves the directory (absolute or '..')"),
])
def test_manifest_paths_outside_the_export_are_refused(export_copy, name, message):
    outside = export_copy.parent / "outside.faiss"
    shutil.copy(export_copy / "index/shard-0.faiss", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    edit_manifest(export_copy, lambda m: _move_shard(m, name))
    assert index_refusal(export_copy).endswith(message)


def test_manifest_symlink_out_of_the_export_is_refused(export_copy):
    """A listed file that is a symlink out of the directory, though its bytes match the checksum."""
    outside = export_copy.parent / "elsewhere.faiss"
    shard = export_copy / "index/shard-0.faiss"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert index_refusal(export_copy) == (f"{export_copy / 'manifest.json'}: 'index/shard-0.faiss' resolves outside "
                                          f"{export_copy} (a symlink out of the directory)")


def test_manifest_checksum_path_outside_is_refused(export_copy):
    edit_manifest(export_copy, lambda m: m["checksums"].update({"../../../../etc/hostname": "0" * 64}))
    assert "leaves the directory" in index_refusal(export_copy)


@pytest.mark.parametrize("field, value, message", [
    ("dimension", "64", "field 'dimension' must be an integer >= 1, got '64'"),
    ("num_shards", True, "field 'num_shards' must be an integer >= 1, got True"),
    ("vectors_per_shard", ["1682"], "field 'vectors_per_shard[0]' must be an integer >= 0, got '1682'"),
    ("shard_files", "index/shard-0.faiss", "field 'shard_files' must be a list, got 'index/shard-0.faiss'"),
    ("search_defaults", {"nprobe": 0}, "field 'search_defaults.nprobe' must be an integer >= 1, got 0"),
    ("checksums", {"index/shard-0.faiss": 5}, "checksum of 'index/shard-0.faiss' must be 64 hex digits, got 5"),
    ("params", None, "field 'params' must be an object, got None"),
    ("source", {"step": "10"}, "source: field 'step' must be an integer >= 0 or null, got '10'"),
    ("metric", "l2", "field 'metric' must be 'inner_product', got 'l2'"),
])
def test_manifest_fields_are_type_checked(export_copy, field, value, message):
    edit_manifest(export_copy, lambda m: m.update({field: value}))
    assert index_refusal(export_copy) == f"{export_copy / 'manifest.json'}: {message}"


def rewrite_shard_ids(root: Path, change) -> None:
    """Rebuild ``index/shard-0.faiss`` (an IDMap,Flat) with ids ``change(ids)``; fix its checksum."""
    import faiss

    path = root / "index/shard-0.faiss"
    stored = faiss.read_index(str(path))  # kept referenced: the downcast views do not own it
    shard = faiss.downcast_index(stored)
    ids = faiss.vector_to_array(shard.id_map)
    vectors = faiss.downcast_index(shard.index).reconstruct_n(0, shard.ntotal)  # (IDMap's own aborts)
    rebuilt = faiss.index_factory(shard.d, "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
    rebuilt.add_with_ids(vectors, change(ids.copy()))
    faiss.write_index(rebuilt, str(path))
    edit_manifest(root, lambda m: m["checksums"].update({"index/shard-0.faiss": sha256_file(path)}))


def test_shard_ids_outside_the_catalog_are_refused(export_copy):
    def corrupt(ids):
        ids[5] = 10**6
        return ids

    rewrite_shard_ids(export_copy, corrupt)
    assert index_refusal(export_copy) == ("index/shard-0.faiss: stores item index 1000000, which is not in "
                                          "index/ids.parquet (1 such ids; the shard does not belong to this export)")


def test_export_of_a_larger_catalog_is_refused_for_a_dataset(tiny_export, ml100k_prepared):
    from trec.export import ShardedIndex

    index = ShardedIndex.load(tiny_export)
    dataset = PreparedDataset.open(ml100k_prepared)
    index.check_catalog(dataset.num_items, str(ml100k_prepared))  # its own dataset: fine
    with pytest.raises(TrecError, match=r"holds item index 1681, but DATA has only 1000 items \(0..999\)"):
        index.check_catalog(1000, "DATA")


def test_ids_file_with_negative_index_is_refused(export_copy):
    path = export_copy / "index/ids.parquet"
    table = pq.read_table(path)
    indices = table["index"].to_numpy().copy()
    indices[0] = -1
    pq.write_table(table.set_column(0, "index", pa.array(indices)), path)
    edit_manifest(export_copy, lambda m: m["checksums"].update({"index/ids.parquet": sha256_file(path)}))
    assert index_refusal(export_copy) == ("index/ids.parquet: column 'index' must be distinct non-negative item "
                                          "indices in ascending order")


def test_ids_file_without_its_columns_is_one_line(export_copy):
    """pyarrow's message for a missing column runs over several lines: the error keeps the first."""
    path = export_copy / "index/ids.parquet"
    pq.write_table(pa.table({"foo": pa.array([1, 2])}), path)
    edit_manifest(export_copy, lambda m: m["checksums"].update({"index/ids.parquet": sha256_file(path)}))
    message = index_refusal(export_copy)
    assert message.startswith("index/ids.parquet: not a readable id mapping (") and "\n" not in message, message


@pytest.mark.parametrize("nprobe, ef_search, message", [
    (0, None, "nprobe applies to ivf_flat and ivf_pq indexes; this export is flat"),
    (None, 0, "ef_search applies to hnsw indexes; this export is flat"),
])
def test_zero_or_negative_search_flags_are_not_ignored(export_copy, nprobe, ef_search, message):
    """--nprobe 0 was taken for "the export's default" and searched without a word."""
    import argparse

    from trec.commands import load_index

    with pytest.raises(TrecError) as info:
        load_index(argparse.Namespace(index=export_copy, nprobe=nprobe, ef_search=ef_search))
    assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# prepared dataset: manifest types, paths, and out-of-range indices
# --------------------------------------------------------------------------------------------


@pytest.fixture
def data_copy(ml100k_prepared, tmp_path) -> Path:
    return Path(shutil.copytree(ml100k_prepared, tmp_path / "data"))


def rewrite_column(path: Path, column: str, change) -> None:
    table = pq.read_table(path)
    values = table[column].to_numpy().copy()
    change(values)
    position = table.column_names.index(column)
    pq.write_table(table.set_column(position, table.schema.field(column), pa.array(values, table[column].type)), path)


def test_reader_refuses_an_item_index_beyond_the_catalog(data_copy):
    shard = data_copy / "train/part-00000.parquet"
    rewrite_column(shard, "item_id", lambda v: v.__setitem__(12345, 1682))
    dataset = PreparedDataset.open(data_copy)
    reader = InteractionReader(dataset, "train", 512, prefetch_batches=0)
    with pytest.raises(TrecError) as info:
        for _ in reader:
            pass
    assert str(info.value) == (f"{shard}: column 'item_id' holds index 1682, outside 0..1681 "
                               f"(the file does not match manifest.json)")


def test_read_split_refuses_a_negative_user(data_copy):
    shard = data_copy / "test/part-00000.parquet"
    rewrite_column(shard, "user_id", lambda v: v.__setitem__(7, -3))
    with pytest.raises(TrecError, match=r"column 'user_id' holds index -3, outside 0..942"):
        PreparedDataset.open(data_copy).read_split("test")


def test_open_refuses_a_side_feature_beyond_its_table(data_copy):
    users = data_copy / "features/users.parquet"
    rewrite_column(users, "user_age", lambda v: v.__setitem__(3, 8))  # cardinality 8
    with pytest.raises(TrecError) as info:
        PreparedDataset.open(data_copy)
    assert str(info.value) == (f"{users}: column 'user_age' holds index 8, outside -1..7 "
                               f"(the file does not match manifest.json)")


def test_open_refuses_a_history_item_beyond_the_catalog(data_copy):
    path = data_copy / "features/user_history.parquet"
    table = pq.read_table(path)
    history = table["history"].combine_chunks()
    values = history.values.to_numpy().copy()
    values[0] = 10**6
    patched = pa.ListArray.from_arrays(history.offsets, pa.array(values, history.type.value_type))
    pq.write_table(table.set_column(table.column_names.index("history"), "history", patched), path)
    with pytest.raises(TrecError, match=r"user_history.parquet: column 'history' holds index 1000000, outside 0..1682"):
        PreparedDataset.open(data_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_items="1682"), "field 'num_items' must be an integer >= 1, got '1682'"),
    (lambda m: m["counts"].update(train=-1), "field 'counts.train' must be an integer >= 0, got -1"),
    (lambda m: m["features"][1].update(cardinality="8"),
     "feature 'user_age': field 'cardinality' must be an integer >= 1 or null, got '8'"),
    (lambda m: m["features"][1].update(multi_hot="no"),
     "feature 'user_age': field 'multi_hot' must be true or false, got 'no'"),
    (lambda m: m["files"].update({"../../outside.parquet": {"bytes": 1, "sha256": "0"}}),
     "path '../../outside.parquet' leaves the directory (absolute or '..')"),
    (lambda m: m["features"][1].update(mapping_file="/etc/hostname"), "leaves the directory (absolute or '..')"),
])
def test_dataset_manifest_fields_are_type_checked(data_copy, edit, message):
    edit_manifest(data_copy, edit)
    with pytest.raises(TrecError) as info:
        PreparedDataset.open(data_copy)
    assert str(info.value).startswith(f"{data_copy / 'manifest.json'}") and str(info.value).endswith(message), \
        str(info.value)


def test_training_on_a_damaged_dataset_is_one_line(data_copy, tmp_path):
    """End to end: the CLI refuses the damaged shard in one line instead of training on clamped rows."""
    shard = data_copy / "train/part-00000.parquet"
    rewrite_column(shard, "user_id", lambda v: v.__setitem__(100, 5000))
    proc = run_command([sys.executable, "-m", "trec", "train", "--config", CONFIG, "--data", data_copy,
                        "--run-dir", tmp_path / "run", *OVERRIDES, "training.max_steps=3"], check=False)
    line = one_error_line(proc)
    assert line == (f"error: {shard}: column 'user_id' holds index 5000, outside 0..942 "
                    f"(the file does not match manifest.json)")


def test_missing_element_of_a_multi_hot_list_is_dropped_not_sent_to_fbgemm(data_copy):
    """-1 (a null element of a hashed multi-hot list) has no row: it is dropped, as single-hot -1 is."""
    path = data_copy / "features/items.parquet"
    table = pq.read_table(path)
    genres = table["item_genres"].combine_chunks()
    values = genres.values.to_numpy().copy()
    values[genres.offsets[0].as_py()] = -1  # item 0's first genre
    patched = pa.ListArray.from_arrays(genres.offsets, pa.array(values, genres.type.value_type))
    pq.write_table(table.set_column(table.column_names.index("item_genres"), "item_genres", patched), path)
    expected = genres[0].as_py()[1:]
    dataset = PreparedDataset.open(data_copy)
    batch = dataset.build_batch(np.array([0]), np.array([0]), np.ones(1, np.float32))
    assert batch.sparse_features["item_genres"].values().tolist() == expected
