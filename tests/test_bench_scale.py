"""`trec bench scale` and `trec bench prepare` at tiny sizes: they run, print their tables and write
what they claim (JSON, PNG); their small helpers (counts, fallback size, projection) exactly; and the
user-history collector that spills by user range (what keeps `trec data prepare`'s memory bounded)
gives the same histories as the in-memory one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.history import HistoryCollector
from trec.bench.prepare import _fitting_size, project
from trec.bench.scale import _refusal, parse_count
from trec.bench.spread import spread_ids
from trec.cli import main
from trec.env import kernel_huge_pages
from trec.errors import TrecError


def test_counts_take_k_m_b_suffixes_and_refuse_the_rest():
    assert [parse_count(text) for text in ("1000", "500k", "1.5M", "30M", "1B")] == [
        1000, 500_000, 1_500_000, 30_000_000, 1_000_000_000]
    for bad in ("ten", "0", "-3k"):
        with pytest.raises(TrecError):
            parse_count(bad)


def test_a_size_projected_over_budget_falls_back_to_a_third_then_a_tenth():
    measured = [{"interactions": 10_000_000, "seconds": 60.0}]  # 6 µs a row
    assert _fitting_size(100_000_000, [], 900) == 100_000_000
    assert _fitting_size(100_000_000, measured, 900) == 100_000_000  # 600 s
    assert _fitting_size(100_000_000, measured, 500) == 30_000_000  # 180 s
    assert _fitting_size(100_000_000, measured, 100) == 10_000_000


def test_projection_extends_the_line_through_the_last_two_sizes():
    measured = [{"interactions": 10, "seconds": 2.0, "peak_rss_bytes": 100},
                {"interactions": 20, "seconds": 3.0, "peak_rss_bytes": 100}]
    got = project(measured, 100)
    assert got["seconds"] == pytest.approx(11.0) and got["peak_rss_bytes"] == 100
    assert got["rss_bytes_per_extra_interaction"] == 0
    assert project(measured[:1], 100) == {}


def test_spread_ids_keeps_every_batch_s_lookups_and_repeats_over_larger_tables():
    from trec.data.batch import RecBatch, keyed_jagged

    history = np.array([0, 5, 5, 999, 3], np.int64)  # a repeated ID and the last row of the small table
    sparse = keyed_jagged(["user_history", "user_cat_0"], [np.array([2, 0, 3], np.int32), np.ones(3, np.int32)],
                          [history, np.array([1, 2, 1], np.int64)], stride=3)
    batch = RecBatch(dense_features=torch.zeros(3, 0), sparse_features=sparse, labels=torch.ones(3),
                     ratings=torch.zeros(3))
    source, target = {"user_history": 1000, "user_cat_0": 7}, {"user_history": 30_000_001, "user_cat_0": 7}
    [spread] = spread_ids([batch], source, target)
    got = spread.sparse_features
    assert torch.equal(got.lengths(), sparse.lengths()) and got.keys() == sparse.keys()
    assert torch.equal(got["user_cat_0"].values(), sparse["user_cat_0"].values())  # that table kept its size
    moved = got["user_history"].values().numpy()
    assert moved.max() < 30_000_001 and moved.max() >= 1000  # spread over the larger table
    assert ((moved[:, None] == moved[None, :]) == (history[:, None] == history[None, :])).all()  # same repeats
    assert spread_ids([batch], source, source) == [batch]


def test_bench_scale_refuses_half_precision_for_the_full_step(capsys):
    assert main(["bench", "scale", "--step", "full", "--dtypes", "fp16"]) == 2
    assert "pass --dtypes fp32" in capsys.readouterr().err


def test_bench_scale_tiny_prints_table_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    assert main(["bench", "scale", "--rows", "3k,300k", "--ranks", "1", "--dtypes", "fp16", "--batch-sizes", "64",
                 "--steps", "2", "--warmup", "1", "--interactions", "3000", "--dim", "128",
                 "--cache", str(tmp_path / "cache"),
                 "--threads", "1", "--plot", str(png), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "us/sample" in printed and "goal: cost per sample within ±20%" in printed
    report = json.loads(out.read_text())
    assert [(r["rows"] // 1000, r["dtype"], r["batch_size"]) for r in report["results"]] == [(3, "fp16", 64),
                                                                                             (300, "fp16", 64)]
    first, larger = report["results"]
    assert first["samples_per_s"] == pytest.approx(64 / first["seconds_per_step"])
    assert first["vs_smallest_rows"] == 1.0 and first["peak_rss_bytes_per_rank"][0] > 50 * 2**20
    assert first["threads"] == 1  # what the worker process really ran with
    # The larger tables step the smallest dataset's batches (its own would hold fewer history lookups),
    # timed in turns with the smallest tables.
    assert larger["lookups_per_sample"] == first["lookups_per_sample"] > 3
    assert larger["vs_smallest_rows"] == pytest.approx(larger["seconds_per_step"] / larger["reference_seconds_per_step"])
    # `trec` processes ask PyTorch's allocator for transparent huge pages: the larger job's fp16 tables
    # (300k rows x 128, 73 MiB) lie in them wherever the kernel allows it (madvise or always). Without
    # THP_MEM_ALLOC_ENABLE=1 that job holds about 14 MiB in huge pages, none of it the tables'.
    if kernel_huge_pages() in ("always", "madvise"):
        assert larger["huge_page_bytes_per_rank"][0] >= 0.9 * larger["rows"] * 128 * 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prepare_tiny_measures_each_size_and_projects(tmp_path, capsys):
    out = tmp_path / "prepare.json"
    assert main(["bench", "prepare", "--interactions", "4k,8k", "--users", "300", "--items", "80", "--project", "1M",
                 "--scratch", str(tmp_path / "scratch"), "--set", "history-max-len=5", "--json", str(out)]) == 0
    assert "projected along the last two sizes" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["interactions"] for r in report["results"]] == [4000, 8000]
    assert all(r["peak_rss_bytes"] > 20 * 2**20 and {"stage", "map", "write"} <= set(r["passes"])
               for r in report["results"])
    assert report["projection"]["interactions"] == 1_000_000
    assert not any((tmp_path / "scratch").iterdir())  # the prepared datasets are deleted


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_history_spilled_by_user_range_equals_in_memory(tmp_path, max_len):
    rng = np.random.default_rng(max_len)
    memory = HistoryCollector(500, max_len, 300)
    spilled = HistoryCollector(500, max_len, 300, compact_rows=10, spill_dir=tmp_path, spill_rows=5, buckets=7)
    for _ in range(40):
        n = int(rng.integers(0, 400))
        rows = rng.integers(0, 500, n), rng.integers(0, 300, n), rng.integers(0, 50, n)  # many ties in time
        memory.add(*rows)
        spilled.add(*rows)
    assert spilled._spill.rows > 0  # it did spill
    for ours, reference in zip(spilled.result(), memory.result()):
        np.testing.assert_array_equal(ours, reference)
    assert not any(tmp_path.iterdir())  # scratch files removed


def test_a_refused_job_is_read_from_its_one_error_line():
    """A job trec refuses (here the planner's line, as torchrun's ranks print it) is skipped with that line."""
    stderr = ("W1202 11:52:25 torch/distributed/run.py:766] Setting OMP_NUM_THREADS\n"
              "[rank0] error: sharding: no plan fits the tables (14.6 GiB with optimizer state and buffers; "
              "the largest, 'user_id', 4.85 GiB = 5204325376 bytes) on 2 rank(s) with 8.24 GiB ddr each\n"
              "E1202 11:52:25 api.py:1002] failed (exitcode: 2) local_rank: 0\n")
    assert _refusal(stderr).startswith("sharding: no plan fits the tables (14.6 GiB")
    assert _refusal("error: --rows: '1x' is not a count\n") == "--rows: '1x' is not a count"
    assert _refusal("Traceback (most recent call last):\nRuntimeError: boom\n") is None  # a crash stays a crash
