"""The Python API (README "Python API: `import trec`", run as written on a tiny synthetic dataset) and the
``--json`` output of `trec search`, `trec recommend` and `trec evaluate` on the run it trains, in this process."""

from __future__ import annotations

import json
import re

import pytest
from training import REPO, TINY

from trec.cli import main

HEADING = "### Python API: `import trec`"


def readme_example() -> str:
    """The first ```python block under HEADING in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(HEADING):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def adapted(example: str, data) -> str:
    """The example with the tiny dataset and a 4-step run: each replaced text must be there, so an edit of the
    README that changes them fails here instead of silently testing something else."""
    replacements = {
        '"data/ml100k"': repr(str(data)),
        '"training.max_steps=200"': ", ".join(repr(o) for o in ["training.max_steps=4", *TINY]),
    }
    for old, new in replacements.items():
        assert old in example, f"README example no longer contains {old}"
        example = example.replace(old, new)
    return example


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """The README example, run once in a scratch directory: {data, run, export, namespace}."""
    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    assert main(["data", "prepare", "synthetic", "--out", str(data), "--users", "50", "--items", "150",
                 "--interactions", "2000", "--quiet"]) == 0
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        exec(compile(adapted(readme_example(), data), "README.md (Python API)", "exec"), namespace)  # noqa: S102
    return {"data": data, "run": root / "runs" / "tt", "export": root / "exports" / "tt", "namespace": namespace}


def test_readme_example_trains_exports_evaluates_and_recommends(api_run):
    ns = api_run["namespace"]
    assert ns["outcome"].status == "trained" and ns["outcome"].step == 4
    assert 0.0 <= ns["outcome"].metrics["ndcg@10"] <= 1.0
    assert ns["manifest"]["num_vectors"] > 100  # the catalog: over the 100 candidates a request retrieves
    assert ns["metrics"]["index/ann_recall@10"] == pytest.approx(1.0)  # the default index is exact
    saved = json.loads((api_run["run"] / "metrics.json").read_text())
    assert saved["index/ndcg@10"] == pytest.approx(ns["metrics"]["index/ndcg@10"])
    assert len(ns["response"].items) == 10


def test_import_trec_is_lazy_and_complete():
    import trec

    for name in ("load_config", "train", "export", "evaluate", "Recommender"):
        assert name in dir(trec) and callable(getattr(trec, name)), name
    import trec.export.search  # the package stays a package: its modules and names are still there

    assert callable(trec.export) and trec.export.ShardedIndex is trec.export.search.ShardedIndex
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trec.nope  # noqa: B018


def test_train_on_a_finished_run_trains_nothing(api_run):
    import trec

    outcome = trec.train(None, None, api_run["run"])  # the run's own config.yaml
    assert outcome.status == "finished" and outcome.step == 4


def cli_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one document


def test_evaluate_json(api_run, capsys):
    document = cli_json(capsys, "evaluate", "--run-dir", str(api_run["run"]), "--index", str(api_run["export"]),
                        "--json")
    assert document["split"] == "test" and document["metrics_file"] == str(api_run["run"] / "metrics.json")
    metrics = document["metrics"]
    assert {"ndcg@10", "popularity/ndcg@10", "index/ndcg@10", "index/ann_recall@10"} <= set(metrics)
    assert metrics["ndcg@10"] == pytest.approx(api_run["namespace"]["metrics"]["ndcg@10"])


def test_search_json(api_run, capsys):
    document = cli_json(capsys, "search", "--index", str(api_run["export"]), "--run-dir", str(api_run["run"]),
                        "--user", "1", "-k", "5", "--json")
    assert document["user"] == "1"
    assert document["index"]["num_vectors"] == api_run["namespace"]["manifest"]["num_vectors"]
    items = document["items"]
    assert [item["rank"] for item in items] == [1, 2, 3, 4, 5]
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(item["item"], str) and item["title"] for item in items)


def test_recommend_json_and_popularity_fallback(api_run, capsys):
    document = cli_json(capsys, "recommend", "--run-dir", str(api_run["run"]), "--user", "1", "-k", "5", "--json")
    assert document["reranked"] is False and len(document["items"]) == 5
    assert [item["retrieval_rank"] for item in document["items"]] == [1, 2, 3, 4, 5]
    assert all(item["score"] is None for item in document["items"])  # no ranker: retrieval order
    unknown = cli_json(capsys, "recommend", "--run-dir", str(api_run["run"]), "--user", "no-such-user", "-k", "3",
                       "--json")
    assert unknown["fallback"] == "popularity" and len(unknown["items"]) == 3
    positives = [item["positives"] for item in unknown["items"]]
    assert positives == sorted(positives, reverse=True)
