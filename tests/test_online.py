"""The online loop of `trec serve`, over real server processes: feedback changes the next answer without
retraining, a brand-new user goes cold → warm → hot, every event lands in the Parquet log that
`trec data prepare parquet --label-col label` trains from, replicas share a real redis-server, and with
Redis killed requests are still answered (degraded, said by /ready and /metrics) and recover."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from serving_client import Server, ids, metric
from training import TINY, run_command, trec_command

from trec.serving.recommender import Recommender
from trec.serving.requests import RecommendRequest


@pytest.fixture(scope="module")
def rec(serving_export) -> Recommender:
    return Recommender.load(serving_export["export"])


def offline(rec: Recommender, user: str, history: list[str] | None = None, k: int = 10) -> list[str]:
    """What the bundle answers for ``user`` with ``history`` sent: what the server must answer once that
    history came in as feedback."""
    return [item.item_id for item in rec.recommend(RecommendRequest(user, k=k, history=history)).items]


def stop(server: Server) -> None:
    server.stop()
    assert server.proc.returncode in (0, -15), server.proc.stderr.read()[-4000:]


def test_feedback_changes_the_next_answer_and_warms_a_new_user(serving_export, rec, tmp_path):
    events = tmp_path / "events"
    server = Server(serving_export["export"], "--events", events, "--hot-history", "3")
    try:
        user = str(rec.tables.id_labels("user_id")[5])
        before = server.recommend(user_id=user, k=10)
        assert ids(before) == offline(rec, user) and before["stage"] == "hot"
        clicked = ids(before)[0]
        answer = server.feedback(user_id=user, item_id=clicked, event="click")
        assert answer == {"label": 0.5, "positive": True, "logged": True, "history_length": 1, "arm": None}
        after = server.recommend(user_id=user, k=10)
        assert clicked not in ids(after) and ids(after) == offline(rec, user, [clicked])
        viewed = ids(after)[0]  # a view (0.4) is below the positive threshold: logged, not in the history
        assert server.feedback(user_id=user, item_id=viewed, event="view")["positive"] is False
        assert ids(server.recommend(user_id=user, k=10)) == ids(after)

        items = [str(rec.item_labels[n]) for n in (10, 20, 30, 40)]
        stages = [server.recommend(user_id="brand-new", k=5)]
        server.feedback(user_id="brand-new", item_id=items[3], event="dislike")  # a negative does not warm
        stages.append(server.recommend(user_id="brand-new", k=5))
        for count, item in enumerate(items[:3], start=1):
            assert server.feedback(user_id="brand-new", item_id=item, event="purchase")["history_length"] == count
            stages.append(server.recommend(user_id="brand-new", k=5))
        assert [(s["stage"], s["route"]) for s in stages] == [("cold", "popularity")] * 2 + [
            ("warm", "cold_features")] * 2 + [("hot", "cold_features")]
        assert ids(stages[2]) == offline(rec, "brand-new", items[:1], k=5)
        assert ids(stages[4]) == offline(rec, "brand-new", items[:3], k=5)
        assert metric(server, "trec_feedback", "trec_feedback_total", event="purchase", positive="true") == 3
    finally:
        stop(server)  # closing the log writes what it buffered
    rows = pq.read_table(sorted(events.rglob("*.parquet"))).to_pylist()
    assert [(r["user_id"], r["item_id"], r["event"], round(r["label"], 3)) for r in rows] == [
        (user, clicked, "click", 0.5), (user, viewed, "view", 0.4), ("brand-new", items[3], "dislike", 0.0),
        *[("brand-new", item, "purchase", 1.0) for item in items[:3]]]
    assert not list(events.rglob(".wal-*")), "a clean shutdown leaves no write-ahead file"


def test_bad_feedback_gets_422_naming_the_field(serving_export):
    server = Server(serving_export["export"])
    try:
        good = {"user_id": "1", "item_id": "2", "event": "click"}
        for change, field in (({"event": "clik"}, "event"), ({"timestamp": "today"}, "timestamp"),
                              ({"timestamp": -5}, "timestamp"), ({"context": {"device": "tv"}}, "context.device"),
                              ({"rating": 5}, "rating"), ({"item_id": ""}, "item_id")):
            status, answer = server.request("POST", "/feedback", {**good, **change})
            assert (status, answer["field"]) == (422, field), answer
        status, answer = server.request("POST", "/feedback", {"item_id": "2", "event": "click"})
        assert (status, answer["field"]) == (422, "user_id")
        assert "purchase" in server.request("POST", "/feedback", {**good, "event": "x"})[1]["message"]
    finally:
        stop(server)


def test_feedback_log_prepares_and_trains(serving_export, tmp_path):
    """feedback → prepare → train: events posted over HTTP become the next training set, labels honoured."""
    events, data, run = tmp_path / "events", tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    names = np.array(["purchase", "like", "click", "view", "dislike"])
    bodies = [{"user_id": f"u{user}", "item_id": f"i{item}", "event": str(names[kind]), "timestamp": 1_700_000_000 + n}
              for n, (user, item, kind) in enumerate(zip(rng.integers(0, 60, 1500), rng.integers(0, 50, 1500),
                                                         rng.integers(0, 5, 1500)))]
    server = Server(serving_export["export"], "--events", events)
    try:
        with ThreadPoolExecutor(8) as pool:
            assert all(answer["logged"] for answer in pool.map(lambda body: server.feedback(**body), bodies))
    finally:
        stop(server)
    run_command(trec_command(1, "data", "prepare", "parquet", "--source", events, "--out", data, "--label-col",
                             "label", "--time-col", "timestamp", "--val-fraction", "0.1", "--quiet"))
    labels = np.concatenate([pq.read_table(path, columns=["label"])["label"].to_numpy()
                             for path in sorted(data.rglob("*.parquet")) if "/splits/" in str(path)
                             or path.parent.name in ("train", "val", "test")])
    expected = {"purchase": 1.0, "like": 0.9, "click": 0.5, "view": 0.4, "dislike": 0.0}
    assert np.allclose(np.sort(labels), np.sort([expected[b["event"]] for b in bodies]))
    run_command(trec_command(1, "train", "--config", "configs/movielens_two_tower.yaml", "--data", data,
                             "--run-dir", run, "training.max_steps=6", *TINY))
    assert (run / "metrics.json").is_file()


def test_replicas_share_redis_and_survive_its_outage(serving_export, rec, redis_server):
    flags = ("--store", redis_server.url, "--store-timeout-ms", "100")
    first, second = Server(serving_export["export"], *flags), Server(serving_export["export"], *flags)
    try:
        item = str(rec.item_labels[7])
        first.feedback(user_id="shared-user", item_id=item, event="like")
        answer = second.recommend(user_id="shared-user", k=5)  # the other replica sees the click
        assert answer["stage"] == "warm" and ids(answer) == offline(rec, "shared-user", [item], k=5)
        assert second.request("GET", "/ready")[1]["status"] == "ready"
        assert metric(second, "trec_store_up", "trec_store_up") == 1

        redis_server.stop()  # the server process is killed: every store call now fails
        user = str(rec.tables.id_labels("user_id")[5])
        started = time.monotonic()
        for _ in range(5):
            assert ids(second.recommend(user_id=user, k=10)) == offline(rec, user)  # the bundle's history
        assert time.monotonic() - started < 5, "a dead store must cost a timeout at most, not hang requests"
        assert second.recommend(user_id="shared-user", k=5)["stage"] == "cold"  # its online history is unreachable
        answer = second.feedback(user_id="shared-user", item_id=item, event="click")
        assert answer["positive"] and answer["history_length"] is None
        status, ready = second.request("GET", "/ready")
        assert (status, ready["status"], ready["store"]["up"]) == (200, "degraded", False), ready
        assert metric(second, "trec_store_up", "trec_store_up") == 0

        redis_server.start()  # back, empty (no persistence)
        deadline = time.monotonic() + 10
        while second.request("GET", "/ready")[1]["status"] != "ready":
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.2)
        second.feedback(user_id="shared-user", item_id=item, event="click")
        assert first.recommend(user_id="shared-user", k=5)["stage"] == "warm"
        assert metric(second, "trec_store_up", "trec_store_up") == 1
    finally:
        stop(first)
        stop(second)
