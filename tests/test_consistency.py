"""Issue 11.4/11.5: commands and settings that agree with each other and with what they document."""

from __future__ import annotations

import json
import math
import re
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torchrec.optim import KeyedOptimizerWrapper
from training import REPO, child_env, refusal, run_command

from trec.config import LRDecay, OptimizerConfig
from trec.optim import ScheduledOptimizer

# --------------------------------------------------------------------------------------------
# learning-rate schedule
# --------------------------------------------------------------------------------------------


def _lrs(cfg: OptimizerConfig, total_steps: int, base: float = 0.5) -> list[float]:
    """The learning rate each of ``total_steps`` optimizer steps of a real torch optimizer uses."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = ScheduledOptimizer(
        KeyedOptimizerWrapper({"w": weight}, lambda params: torch.optim.SGD(params, lr=base)), cfg, total_steps, base)
    used = []
    for _ in range(total_steps):
        used.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(3)
        optimizer.step()
    return used


@pytest.mark.parametrize("decay", [LRDecay.cosine, LRDecay.linear])
@pytest.mark.parametrize("warmup", [0, 10])
def test_decay_ends_at_the_configured_final_rate(decay, warmup):
    base, total = 0.5, 50
    lrs = _lrs(OptimizerConfig(warmup_steps=warmup, decay=decay, min_lr_ratio=0.1), total, base)
    assert lrs[-1] == pytest.approx(0.1 * base, rel=1e-9)  # before the fix: 0.55 x base (cosine)
    assert max(lrs) == pytest.approx(base)
    assert lrs[warmup] == pytest.approx(base)  # decay starts at the full rate right after warm-up
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # and only goes down
    if decay == LRDecay.cosine:  # halfway through the decay: halfway between the rates
        middle = warmup + (total - 1 - warmup) / 2
        if middle == int(middle):
            assert lrs[int(middle)] == pytest.approx(base * (0.1 + 0.9 * 0.5))


def test_schedule_position_survives_a_checkpoint():
    """The schedule resumes where it was (WarmupOptimizer keeps its step in the optimizer state)."""
    cfg, total, base = OptimizerConfig(warmup_steps=3, decay=LRDecay.cosine, min_lr_ratio=0.0), 20, 1.0
    weight = torch.nn.Parameter(torch.ones(2))

    def build():
        return ScheduledOptimizer(
            KeyedOptimizerWrapper({"w": weight}, lambda params: torch.optim.Adam(params, lr=base)), cfg, total, base)

    first = build()
    for _ in range(12):
        weight.grad = torch.ones(2)
        first.step()
    resumed = build()
    resumed.init_state()  # a checkpoint loads into an optimizer whose state exists
    resumed.load_state_dict(first.state_dict())
    assert resumed.param_groups[0]["lr"] == pytest.approx(first.param_groups[0]["lr"])
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 16)))


# --------------------------------------------------------------------------------------------
# one logging period
# --------------------------------------------------------------------------------------------


def test_training_log_every_steps_is_gone_with_a_pointer_to_the_real_key(tmp_path):
    from trec.models import load_config
    from trec.errors import TrecError

    assert load_config(None, ["logging.log_every_steps=7"]).logging.log_every_steps == 7
    with pytest.raises(TrecError, match=r"unknown key 'training.log_every_steps' \(did you mean "
                                        r"'logging.log_every_steps'\?\)"):
        load_config(None, ["training.log_every_steps=7"])
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  log_every_steps: 7\n")
    with pytest.raises(TrecError, match=r"c.yaml: unknown key 'training.log_every_steps'"):
        load_config(config, [])
    for shipped in sorted((REPO / "configs").glob("*.yaml")):  # every shipped config still loads
        load_config(shipped, [])


# --------------------------------------------------------------------------------------------
# search and recommend: one user, the same way, on a hash-mapped dataset
# --------------------------------------------------------------------------------------------

USER = "42"  # an ML-100K user with train, val and test items


@pytest.fixture(scope="module")
def hash_run(ml100k, tmp_path_factory):
    """ML-100K with hashed user/item IDs (4,096 buckets, train/val/test), a 10-step one-process
    two-tower run on it and its flat FAISS export: (dataset, run, export)."""
    root = tmp_path_factory.mktemp("hash")
    data, run_dir, export = root / "data", root / "run", root / "export"
    trec = [sys.executable, "-m", "trec"]
    # Both override forms, mixed with options (their effects are checked below: 4,096 buckets, 10 steps).
    run_command([*trec, "data", "prepare", "movielens", "--source", ml100k, "--out", data, "--quiet",
                 "--set", "data.prepare.hash_buckets=4096", "data.prepare.val_fraction=0.1", "--id-mapping", "hash"])
    run_command([*trec, "train", "--config", "configs/movielens_two_tower.yaml", "--set", "training.max_steps=10",
                 "data.batch_size=512", "--data", data, "--run-dir", run_dir, "logging.histogram_every_steps=0"])
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 10
    run_command([*trec, "export", "--run-dir", run_dir, "--out", export])
    return data, run_dir, export


def _user_items(data: Path, raw_user: str) -> tuple[set[int], set[str]]:
    """(the item buckets the dataset has for the user's bucket in any split, their seen raw IDs)."""
    users = pq.read_table(data / "mappings" / "user_id.parquet")
    bucket = users.filter(pc.equal(users["raw"], int(raw_user)))["index"][0].as_py()
    items = pq.read_table(data / "mappings" / "item_id.parquet")
    raw_of_bucket: dict[int, list[str]] = {}
    for raw, index in zip(items["raw"].to_pylist(), items["index"].to_pylist()):
        raw_of_bucket.setdefault(index, []).append(str(raw))
    buckets = set()
    for split in ("train", "val", "test"):
        for shard in sorted((data / split).glob("*.parquet")):
            table = pq.read_table(shard, columns=["user_id", "item_id"])
            buckets.update(table.filter(pc.equal(table["user_id"], bucket))["item_id"].to_pylist())
    return buckets, {raw for item in buckets for raw in raw_of_bucket[item]}


def _listed_items(stdout: str, column: int) -> list[str]:
    """The item column of a search/recommend listing ('+N' suffixes of shared buckets removed)."""
    rows = [line.split() for line in stdout.splitlines()[1:] if line.strip() and line.split()[0].rstrip(".").isdigit()]
    return [row[column].split("+")[0] for row in rows]


def test_search_and_recommend_exclude_the_same_items_on_a_hash_mapped_dataset(hash_run, run_trec):
    data, run_dir, export = hash_run
    _, seen = _user_items(data, USER)
    searched = run_trec("search", "--index", export, "--run-dir", run_dir, "--user", USER, "-k", "20").stdout
    recommended = run_trec("recommend", "--run-dir", run_dir, "--user", USER, "-k", "20").stdout
    # Before: recommend failed ("item_id is hash-mapped"), search printed bucket numbers and
    # left out train and val items only.
    buckets, seen = _user_items(data, USER)
    for out in (searched, recommended):
        assert f" {len(buckets)} seen items excluded (train/val/test))" in out.splitlines()[0]
    search_items, recommend_items = _listed_items(searched, 1), _listed_items(recommended, 1)
    assert len(search_items) == len(recommend_items) == 20
    assert search_items == recommend_items  # flat index == exact retrieval, the same exclusions
    known = {str(raw) for raw in pq.read_table(data / "mappings" / "item_id.parquet")["raw"].to_pylist()}
    assert set(search_items) <= known  # raw MovieLens IDs, not bucket numbers
    assert not set(search_items) & seen


def test_include_seen_keeps_seen_items_in_both(hash_run, run_trec):
    data, run_dir, export = hash_run
    searched = run_trec("search", "--index", export, "--run-dir", run_dir, "--user", USER, "-k", "5",
                        "--include-seen").stdout
    recommended = run_trec("recommend", "--run-dir", run_dir, "--user", USER, "-k", "5", "--include-seen").stdout
    for out in (searched, recommended):
        assert "seen items kept (--include-seen)" in out.splitlines()[0]
    assert _listed_items(searched, 1) == _listed_items(recommended, 1)


def test_an_unknown_user_gets_the_same_labelled_fallback_from_both(hash_run, run_trec):
    data, run_dir, export = hash_run
    searched = run_trec("search", "--index", export, "--run-dir", run_dir, "--user", "999999", "-k", "3").stdout
    recommended = run_trec("recommend", "--run-dir", run_dir, "--user", "999999", "-k", "3").stdout
    assert searched == recommended  # before: search failed with "unknown raw ID"
    assert "user 999999 is unknown (or has no positive training row): popularity fallback" in searched
    assert "Star Wars (1977)" in searched  # the most rated movie of ML-100K
    assert _listed_items(searched, 1)[0] == "50"  # its raw MovieLens ID


def test_k_beyond_the_catalog_is_one_line_before_anything_is_built(hash_run, capsys):
    data, run_dir, export = hash_run
    for command in (["search", "--index", export], ["recommend"]):
        line = refusal(capsys, *command, "--run-dir", run_dir, "--user", USER, "-k", "1000000000000")
        assert line == "error: k=1000000000000 exceeds the catalog of 4,096 items; use -k 4096 or less"


def test_evaluation_cutoff_beyond_the_catalog_is_refused_before_training(hash_run, run_trec, tmp_path):
    data, _, _ = hash_run
    run_dir = tmp_path / "run"
    proc = run_trec("train", "--config", "configs/movielens_two_tower.yaml", "--data", data, "--run-dir", run_dir,
                    "evaluation.ks=[10,5000]", "training.max_steps=2", check=False, timeout=300)
    # Before: trained, then reported "ndcg@5000" computed over the 4,096 items there are.
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluation.ks: k=5000 exceeds the catalog of 4096")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


# --------------------------------------------------------------------------------------------
# --set KEY=VALUE and trailing KEY=VALUE everywhere
# --------------------------------------------------------------------------------------------


def test_every_config_reading_command_takes_both_override_forms(hash_run, run_trec, tmp_path, capsys):
    data, run_dir, export = hash_run
    # Effects that show: evaluate's cut-offs and user cap, export's index kind.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run_trec("evaluate", "--run-dir", copy, "--set", "evaluation.max_users=50", "--set", "evaluation.ks=[5]",
             "evaluation.popularity_baseline=false")
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["users"] == 50 and "ndcg@5" in metrics and "popularity/ndcg@5" not in metrics
    run_trec("export", "--run-dir", run_dir, "--out", tmp_path / "ivf", "--set", "export.index=ivf_flat",
             "export.nlist=8", "export.num_shards=1")
    assert "IVF8" in json.loads((tmp_path / "ivf" / "manifest.json").read_text())["factory"]
    shown = run_trec("config", "show", "configs/movielens_two_tower.yaml", "--set", "data.batch_size=64",
                     "--set", "data.eval_batch_size=32", "model.embedding_dim=16").stdout
    assert "batch_size: 64" in shown and "eval_batch_size: 32" in shown and "embedding_dim: 16" in shown
    # search and recommend read them into the run's config too: a bad key is reported as such
    # (before: argparse's "unrecognized arguments"). train and data prepare: see hash_run.
    commands = {
        "search": ["search", "--index", export, "--run-dir", run_dir, "--user", USER],
        "recommend": ["recommend", "--run-dir", run_dir, "--user", USER],
    }
    for name, command in commands.items():  # in this process: the refusal comes before anything is loaded
        for form in (["--set", "data.nosuch=1", "--set", "data.batch_size=64"], ["--set", "data.batch_size=64",
                                                                                 "data.nosuch=1"]):
            assert "unknown key 'data.nosuch'" in refusal(capsys, *command, *form), (name, form)


@pytest.mark.parametrize("component,args", [
    ("train", ["--config", "c.yaml", "--data", "/data/d", "--run-dir", "/runs/r"]),
    ("export", ["--run-dir", "/runs/r", "--out", "/exports/e"]),
    ("evaluate", ["--run-dir", "/runs/r"]),
])
def test_torchx_components_forward_both_override_forms(component, args):
    """``--set=K=V`` (repeatable: TorchX refuses a repeated option word, not repeated distinct
    words) and trailing ``K=V`` reach the trec command on every rank, which parses them all."""
    from trec.cli import parse_args
    from trec.commands import config_overrides

    overrides = ["--set=training.seed=7", "--set=evaluation.ks=[5]", "data.batch_size=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("TREC_IMAGE", "TREC_CUDA_IMAGE", "TORCHXCONFIG")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), "run", "--workspace", "", "--dryrun", "-s", "kubernetes",
         "-cfg", "queue=trec", f"./launchers/components.py:{component}", "--", *args, *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = yaml.safe_load(proc.stdout.partition("=== SCHEDULER REQUEST ===")[2])
    script = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"][-1]
    words = shlex.split(script)
    trec_args = words[words.index("trec") + 1 :]
    parsed = parse_args(trec_args)
    assert parsed.command == component
    assert config_overrides(parsed) == ["training.seed=7", "evaluation.ks=[5]", "data.batch_size=64"]


# --------------------------------------------------------------------------------------------
# prepare: never inside its source, and a killed run's leftovers cleaned
# --------------------------------------------------------------------------------------------


def _csv_source(directory: Path) -> Path:
    directory.mkdir(parents=True)
    rows = [f"{user},{item},{user * 100 + item}" for user in range(20) for item in range(user % 5, 30, 3)]
    (directory / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return directory


def test_out_inside_source_is_refused(tmp_path, run_trec, capsys):
    source = _csv_source(tmp_path / "src")
    (tmp_path / "link").symlink_to(source)
    before = sorted(p.name for p in source.rglob("*"))
    for out in (source / "prepared", source, tmp_path / "link" / "prepared", source / ".." / "src" / "deep" / "x"):
        line = refusal(capsys, "data", "prepare", "csv", "--source", source, "--out", out, "--overwrite")
        assert line == f"error: --out {out} is inside --source {source}: write the dataset outside the source data"
    assert sorted(p.name for p in source.rglob("*")) == before  # nothing written, nothing replaced
    run_trec("data", "prepare", "csv", "--source", tmp_path / "link", "--out", tmp_path / "beside", "--quiet")


def test_a_killed_prepare_leaves_a_temp_dir_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trec", "data", "prepare", "synthetic", "--out", str(out),
               "--interactions", "3000000", "--users", "20000", "--items", "5000", "--quiet"]
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let it write into the temporary directory
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert proc.returncode == -9, "the prepare finished before the kill"
    (left,) = tmp_path.glob(".out.*.tmp")
    assert not out.exists()
    # Other outputs' temporary directories, and files of the same shape, are not its own.
    decoys = [tmp_path / ".out.v2.abcd1234.tmp", tmp_path / ".outx.abcd1234.tmp"]
    for decoy in decoys:
        decoy.mkdir()
    (tmp_path / ".out.note1234.tmp").write_text("not a directory")
    again = run_command([sys.executable, "-m", "trec", "data", "prepare", "synthetic", "--out", out,
                         "--interactions", "20000", "--users", "500", "--items", "300"])
    assert f"removed {left}, left by an interrupted prepare" in again.stdout  # before: kept forever
    assert not left.exists() and (out / "manifest.json").is_file()
    assert all(decoy.is_dir() for decoy in decoys) and (tmp_path / ".out.note1234.tmp").is_file()


# --------------------------------------------------------------------------------------------
# 11.5: figures name their CPU
# --------------------------------------------------------------------------------------------

_CPU = re.compile(r"AMD EPYC|Intel|Xeon|Graviton|Apple M\d|Ampere")


def test_every_measured_figure_in_the_readme_names_its_cpu():
    """Metrics differ across CPUs (NDCG@10 0.4548 on AMD EPYC, 0.4485 on Intel for one commit), so
    each block of measured figures says which CPU it came from."""
    readme = (REPO / "README.md").read_text()
    sections = re.split(r"\n(?=#{2,4} )", readme)
    measured = [s for s in sections if re.match(r"#{2,4} (Results|Measured)", s)]
    assert len(measured) >= 3
    for section in measured:
        assert _CPU.search(section), section.splitlines()[0]
    for line in readme.splitlines():
        if line.startswith("| `trec bench"):  # the benchmark table's rows each name their machine
            assert _CPU.search(line), line[:80]
    quickstart = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "NDCG@10" in quickstart and _CPU.search(quickstart)
