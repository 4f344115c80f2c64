"""The servable bundle `trec export` writes (EXPORT/bundle/): single-process models equal to the sharded
ones (user vectors, ranker scores), checksums refusing a changed file, and a load that needs no process
group and no prepared dataset directory. Tiny synthetic data and runs of a few steps (one process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from training import TINY, child_env, error_line, run_command, trec_command

from trec.errors import TrecError

STEPS = ["training.max_steps=6", *TINY, "data.batch_size=256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Synthetic data, a two-tower, an mf and a dcn run on it, and the exports of both retrievers (with
    user vectors; the two-tower's with the dcn ranker)."""
    root = tmp_path_factory.mktemp("bundle")
    data = root / "data"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "120",
                             "--interactions", "6000", "--val-fraction", "0.1", "--quiet"))
    configs = {"two_tower": "configs/movielens_two_tower.yaml", "mf": "configs/movielens_mf.yaml",
               "dcn": "configs/movielens_dcn.yaml"}
    for name, config in configs.items():
        extra = ["model.dcn.eval_negatives=1"] if name == "dcn" else []
        run_command(trec_command(1, "train", "--config", config, "--data", data, "--run-dir", root / name,
                                 *STEPS, *extra))
    for name in ("two_tower", "mf"):
        ranker = ["--ranker-run-dir", root / "dcn"] if name == "two_tower" else []
        run_command(trec_command(1, "export", "--run-dir", root / name, "--out", root / f"export_{name}", "--users",
                                 *ranker, "--set", "export.index=flat"))
    return root


def exported_users(export) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(export / "embeddings" / "users-part-0.parquet")
    return table["index"].to_numpy(), np.stack(table["vector"].to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("model", ["two_tower", "mf"])
def test_bundle_user_vectors_equal_the_exported_ones(runs, model):
    from trec.serving.bundle import Bundle

    bundle = Bundle.load(runs / f"export_{model}")
    users, vectors = exported_users(runs / f"export_{model}")
    assert len(users) == bundle.tables.num_users == 200
    assert np.abs(bundle.user_vectors(users) - vectors).max() <= 1e-5
    assert bundle.retriever_config.model.name == model and bundle.manifest["retriever"]["model"] == model
    assert (bundle.ranker is not None) == (model == "two_tower")
    # What serving reads besides the towers: popularity as in training, every split's items as seen.
    from trec.data import PreparedDataset

    dataset = PreparedDataset.open(runs / "data")
    assert np.array_equal(bundle.tables.item_counts, dataset.item_counts)
    seen = dataset.user_items(["train", "val", "test"])
    assert np.array_equal(bundle.seen.offsets, seen.offsets) and np.array_equal(bundle.seen.values, seen.values)
    positives = dataset.user_items(["train"], positives=True).lengths > 0
    assert np.array_equal(bundle.positive_users, positives)
    assert not bundle.tables.has_split("train")


def test_bundle_ranker_scores_equal_the_sharded_rankers(runs):
    from trec.distributed import distributed_session
    from trec.runs import load_trained_run
    from trec.serving.bundle import Bundle
    from trec.two_stage import ranker_of

    bundle = Bundle.load(runs / "export_two_tower")
    users, items = np.repeat(np.arange(0, 200, 10), 6), np.tile(np.arange(0, 120, 20), 20)
    ours = bundle.rank_scores(users, items)
    with distributed_session(0, "cpu", "WARNING") as ctx:
        run = load_trained_run(runs / "dcn", ctx)
        theirs = ranker_of(run, run.dataset, ctx)(users, items).numpy()
    assert ours.shape == (120,) and np.abs(ours - theirs).max() <= 1e-5
    assert bundle.manifest["ranker"]["run_dir"] == str((runs / "dcn").resolve())


def test_export_manifest_records_the_bundle(runs):
    export = runs / "export_two_tower"
    manifest = json.loads((export / "manifest.json").read_text())
    bundle = json.loads((export / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["bundle"]["version"] == bundle["version"]
    for relative, entry in bundle["files"].items():  # the export's checksums cover the bundle too
        assert manifest["checksums"][f"bundle/{relative}"] == entry["sha256"]
    assert "retriever/weights.pt" in bundle["files"] and "tables/popularity.parquet" in bundle["files"]
    tables = json.loads((export / "bundle" / "tables" / "manifest.json").read_text())
    assert tables["serving"] is True and not any(name.startswith("train/") for name in tables["files"])


@pytest.mark.parametrize("relative", ["retriever/weights.pt", "tables/features/users.parquet"])
def test_a_changed_bundle_file_is_refused_in_one_line_naming_it(runs, tmp_path, relative):
    from trec.serving.bundle import Bundle

    copy = tmp_path / "export"
    shutil.copytree(runs / "export_two_tower", copy)
    path = copy / "bundle" / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrecError, match="checksum mismatch") as refused:
        Bundle.load(copy)
    assert f"bundle/{relative}" in str(refused.value) and "\n" not in str(refused.value)
    path.unlink()
    with pytest.raises(TrecError, match=f"bundle/{relative}: missing"):
        Bundle.load(copy / "bundle")


def test_loading_needs_no_process_group_and_no_prepared_dataset(runs, tmp_path):
    """A fresh process, the dataset directory moved away: no process group and no run loading."""
    code = (
        "import sys; import torch.distributed as dist; from trec.serving.bundle import Bundle\n"
        "bundle = Bundle.load(sys.argv[1])\n"
        "bundle.user_vectors([0, -1]); bundle.rank_scores([0], [1])\n"
        "banned = [m for m in ('trec.runs', 'trec.checkpoint', 'trec.trainer', 'trec.two_stage') if m in sys.modules]\n"
        "print(dist.is_initialized(), banned)\n"
    )
    away = tmp_path / "data_moved_away"
    shutil.move(runs / "data", away)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(runs / "export_two_tower")], capture_output=True,
                             text=True, env=child_env(), timeout=300)
    finally:
        shutil.move(away, runs / "data")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "[]"], out.stdout


def test_a_ranker_trained_on_another_dataset_is_refused_in_one_line(runs, tmp_path):
    ranker = tmp_path / "dcn"
    shutil.copytree(runs / "dcn", ranker)
    record = json.loads((ranker / "run.json").read_text())
    record["dataset"]["fingerprint"] = "0" * 64
    (ranker / "run.json").write_text(json.dumps(record))
    proc = run_command(trec_command(1, "export", "--run-dir", runs / "two_tower", "--out", tmp_path / "export",
                                    "--ranker-run-dir", ranker), check=False)
    assert "trained on dataset" in error_line(proc) and str(ranker) in error_line(proc)
    assert not (tmp_path / "export").exists()
