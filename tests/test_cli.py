"""The `trec` console entry point: help, env, config show, and error exits."""

from __future__ import annotations

import json
import shutil
import subprocess

RESERVED = ["env", "config", "data", "train", "evaluate", "export", "search", "recommend", "bench"]


def test_help_lists_every_command(run_trec):
    out = run_trec("--help").stdout
    for name in RESERVED:
        assert f"    {name}" in out, name


def test_console_script_is_installed():
    path = shutil.which("trec")
    assert path, "the `trec` console script is not on PATH"
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("trec ")


def test_env_reports_stack_and_backend(run_trec):
    report = json.loads(run_trec("env", "--json").stdout)
    for package in ("torch", "torchrec", "fbgemm_gpu", "faiss", "torchx"):
        assert report["versions"][package] != "not installed", package
        if package in report["imports"]:
            assert report["imports"][package] == "ok", report["imports"][package]
    assert report["backend"] in ("gloo", "nccl")
    assert report["backend"] == ("nccl" if report["cuda_available"] else "gloo")
    # The process entry turns PyTorch's huge-page allocation on, unless the environment chose.
    assert report["huge_pages"]["torch_allocator"] == "1"
    chosen = json.loads(run_trec("env", "--json", env={"THP_MEM_ALLOC_ENABLE": "0"}).stdout)
    assert chosen["huge_pages"]["torch_allocator"] == "0"


def test_config_show_applies_set(run_trec):
    out = run_trec("config", "show", "configs/movielens_two_tower.yaml", "--set", "data.batch_size=77").stdout
    assert "batch_size: 77" in out
    assert "name: two_tower" in out


def test_config_show_misspelled_key_exits_2(run_trec):
    proc = run_trec("config", "show", "configs/movielens_two_tower.yaml", "--set", "data.batch_sise=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: override 'data.batch_sise=3': unknown key 'data.batch_sise' "
        "(did you mean 'batch_size', 'eval_batch_size'?)"
    ]
