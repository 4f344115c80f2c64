"""`trec serve` as a real server process on a free loopback port, over a real bundle (a tiny synthetic
dataset, a short two-tower run and a short DCN run, exported with a flat index): /recommend equals
`trec search`, filters hold, each cold-start route, concurrent answers equal sequential ones, bad
requests get 422 naming the field, /metrics parses and counts, and a tampered bundle is refused."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving_client import Server, ids
from serving_client import metric as _metric
from training import run_command, trec_command

from trec.serving.recommender import Recommender


@pytest.fixture(scope="module")
def export(serving_export):
    return serving_export  # tests/conftest.py: one bundle for the serving tests


@pytest.fixture(scope="module")
def server(export):
    running = Server(export["export"])
    yield running
    running.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -15 is a clean exit here.
    assert running.proc.returncode in (0, -15), running.proc.stderr.read()[-4000:]


@pytest.fixture(scope="module")
def rec(export) -> Recommender:
    return Recommender.load(export["export"])


def search_output(export, user: str, k: int) -> list[str]:
    """The raw item IDs `trec search` prints for ``user``, in its order."""
    out = run_command(trec_command(1, "search", "--index", export["export"], "--run-dir", export["tt"],
                                   "--user", user, "-k", str(k))).stdout
    ranked = [words[1] for words in map(str.split, out.splitlines()) if words and words[0].rstrip(".").isdigit()]
    assert len(ranked) == k, out
    return ranked


def test_recommend_equals_trec_search(server, export, rec):
    users = [str(raw) for raw in rec.tables.id_labels("user_id")[: rec.tables.num_users]]
    for user in (users[0], users[57]):
        answer = server.recommend(user_id=user, k=10)
        assert (answer["route"], answer["source"], answer["model_version"]) == ("known", "two_tower", rec.version)
        assert ids(answer) == search_output(export, user, 10)
        assert [item["rank"] for item in answer["items"]] == list(range(1, 11))
    status, model = server.request("GET", "/model")
    assert status == 200 and model["version"] == rec.version and model["ranker"]["model"] == "dcn"
    status, similar = server.request("GET", f"/similar-items/{rec.item_labels[3]}?k=4")
    assert status == 200 and ids(similar) == [i.item_id for i in rec.similar_items(rec.item_labels[3], 4)]
    assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/ready")[0] == 200
    assert server.request("GET", "/docs")[0] == 200
    assert "/recommend" in server.request("GET", "/openapi.json")[1]["paths"]


def test_filters_are_never_violated(server, rec):
    rng = np.random.default_rng(1)
    users = [str(raw) for raw in rec.tables.id_labels("user_id")[:40]] + ["nobody"]
    for user in users:
        name = str(rng.choice(["item_cat_1", "item_tags_2"]))
        labels = [label for label in rec.tables.id_labels(name) if label]
        filters = {name: [str(v) for v in rng.choice(labels, size=2, replace=False)]}
        answer = server.recommend(user_id=user, k=15, filters=filters)
        allowed = rec.filters.allowed(filters)
        got = [rec.items.known(item) for item in ids(answer)]
        assert got and all(allowed[item] for item in got), (user, filters)


def test_each_cold_start_route(server, rec):
    items = rec.item_labels
    known = server.recommend(user_id=str(rec.tables.id_labels("user_id")[1]), k=5)
    assert known["route"] == "known"
    cold = server.recommend(user_id="new-user", k=10, history=[items[3], items[40], "not-an-item"])
    assert (cold["route"], cold["source"], cold["unknown_history"]) == ("cold_features", "two_tower", 1)
    assert not {items[3], items[40]} & set(ids(cold))
    featured = server.recommend(user_id="new-user", k=5, user_features={"user_cat_0": "never-seen"})
    assert featured["route"] == "cold_features" and len(featured["items"]) == 5
    popular = server.recommend(user_id="new-user", k=5)
    assert (popular["route"], popular["source"]) == ("popularity", "popularity")
    assert [item["score"] for item in popular["items"]][0] == rec.popularity.max()
    reranked = server.recommend(user_id="new-user", k=5, history=[items[7]], rerank=True, candidates=20)
    assert (reranked["route"], reranked["source"]) == ("cold_features", "two_stage")


def test_concurrent_requests_answer_as_sequential_ones(server, rec):
    users = [str(raw) for raw in rec.tables.id_labels("user_id")[:64]]
    bodies = [{"user_id": user, "k": 10, "rerank": n % 3 == 0} for n, user in enumerate(users)]
    bodies += [{"user_id": "new", "history": [rec.item_labels[n]], "k": 5} for n in range(16)]
    bodies.append({"user_id": "x", "k": 0})  # a bad request inside the batches fails alone
    sequential = [server.request("POST", "/recommend", body) for body in bodies]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda body: server.request("POST", "/recommend", body), bodies))
    assert [status for status, _ in concurrent] == [200] * (len(bodies) - 1) + [422]
    for (status, alone), (_, together) in zip(sequential, concurrent):
        if status == 200:
            assert ids(alone) == ids(together)
            assert np.allclose([i["score"] for i in alone["items"]], [i["score"] for i in together["items"]],
                               atol=1e-5)
    assert _metric(server, "trec_batch_size", "trec_batch_size_count") < len(bodies) * 2  # some batches held several


BAD = [
    ({"user_id": "1", "k": 0}, "k"),
    ({"user_id": "1", "k": 100000}, "k"),
    ({"user_id": "1", "k": "ten"}, "k"),
    ({"k": 3}, "user_id"),
    ({"user_id": ["1"]}, "user_id"),
    ({"user_id": "1", "filters": {"no_such_feature": ["a"]}}, "filters.no_such_feature"),
    ({"user_id": "1", "filters": {"item_cat_1": ["no-such-value"]}}, "filters.item_cat_1"),
    ({"user_id": "1", "filters": {"item_cat_1": "not-a-list"}}, "filters.item_cat_1"),
    ({"user_id": "1", "history": [{"a": 1}]}, "history[0]"),
    ({"user_id": "1", "exclude_seen": "yes"}, "exclude_seen"),
    ({"user_id": "1", "user_features": {"age": 3}}, "user_features.age"),
    ({"user_id": "1", "context": {"device": "phone"}}, "context.device"),
    ({"user_id": "1", "candidates": -1, "rerank": True}, "candidates"),
    ({"user_id": "1", "typo": 1}, "typo"),
]


def test_bad_requests_get_422_naming_the_field(server):
    for body, field in BAD:
        status, answer = server.request("POST", "/recommend", body)
        assert status == 422 and answer["field"].startswith(field), (body, answer)
        assert answer["message"].startswith(answer["field"])
    for raw in (b'{"user_id": "1",', b"[1, 2]", b"", b"\xff\xfe"):
        status, answer = server.request("POST", "/recommend", raw=raw)
        assert status == 422 and answer["field"] == "body", (raw, answer)
    assert server.request("GET", "/similar-items/no-such-item?k=3")[1]["field"] == "item_id"
    assert server.request("GET", "/similar-items/1?k=-2")[1]["field"] == "k"
    assert server.request("GET", "/similar-items/1?k=x")[1]["field"] == "k"
    assert server.recommend(user_id="1", k=3)["items"]  # still serving
    assert server.proc.poll() is None


def test_metrics_parse_and_count_the_requests(server, rec):
    def recommends(source: str) -> float:
        return _metric(server, "trec_requests", "trec_requests_total", endpoint="/recommend", source=source,
                       status="200")

    before = recommends("two_tower"), recommends("popularity")
    for _ in range(3):
        server.recommend(user_id=str(rec.tables.id_labels("user_id")[2]), k=4)
    server.recommend(user_id="nobody", k=4)
    assert (recommends("two_tower"), recommends("popularity")) == (before[0] + 3, before[1] + 1)
    assert _metric(server, "trec_request_seconds", "trec_request_seconds_count", endpoint="/recommend") >= 4
    assert _metric(server, "trec_index_search_seconds", "trec_index_search_seconds_count") >= 3
    assert _metric(server, "trec_model_info", "trec_model_info", version=rec.version, ranker="dcn") == 1


def test_workers_and_one_at_a_time(export, rec, redis_server):
    """--workers 2 (uvicorn processes, each loading the bundle, sharing one Redis store) and --max-batch 1 give
    the same answers, and
    one scrape of /metrics counts the requests of both workers (multiprocess mode), not those of one. The
    cold-start threshold reaches the workers: with --min-history 2 one known history item is not enough."""
    running = Server(export["export"], "--workers", "2", "--max-batch", "1", "--min-history", "2", "--store",
                     redis_server.url)
    try:
        items = rec.item_labels
        assert running.recommend(user_id="new-user", k=5, history=[items[3]])["route"] == "popularity"
        assert running.recommend(user_id="new-user", k=5, history=[items[3], items[4]])["route"] == "cold_features"
        user = str(rec.tables.id_labels("user_id")[5])
        expected = [item.item_id for item in rec.recommend(_request(user)).items]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: running.recommend(user_id=user, k=10), range(16)))
        assert all(ids(answer) == expected for answer in answers)
        pids: set[int] = set()
        for _ in range(200):  # the kernel hands each new connection to either worker
            pids.add(running.request("GET", "/model")[1]["serving"]["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids  # both workers answer, so each scrape below reaches one of them
        for _ in range(3):  # whichever worker answers the scrape
            assert _metric(running, "trec_requests", "trec_requests_total", endpoint="/recommend") == 18
        assert _metric(running, "trec_model_info", "trec_model_info", version=rec.version) == 1
    finally:
        running.stop()
    assert running.proc.returncode in (0, -15), running.proc.stderr.read()[-4000:]


def _request(user: str):
    from trec.serving.requests import RecommendRequest

    return RecommendRequest(user, k=10)


def test_a_tampered_bundle_is_refused_in_one_line(export):
    tampered = export["root"] / "tampered"
    shutil.copytree(export["export"], tampered)
    with open(tampered / "bundle" / "tables" / "popularity.parquet", "ab") as handle:
        handle.write(b"\0")
    started = time.monotonic()
    proc = run_command(trec_command(1, "serve", tampered, "--port", "0"), check=False, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "popularity.parquet" in lines[0] and "checksum" in lines[0], proc.stderr
    assert time.monotonic() - started < 60
    missing = run_command(trec_command(1, "serve", export["root"] / "nowhere"), check=False, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("error:") == 1, missing.stderr


def test_several_workers_on_a_model_root_must_poll_current(tmp_path):
    """POST /admin/reload reaches one worker: without --watch-s the others would keep serving the old version."""
    proc = run_command(trec_command(1, "serve", "--model-root", tmp_path, "--workers", "2",
                                    "--store", "redis://127.0.0.1:1/0"), check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    assert "--watch-s" in proc.stderr and "one worker" in proc.stderr
