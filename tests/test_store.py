"""The online store (trec/serving/store.py): the same behaviour embedded and on a real redis-server, and an
outage that is answered at once (breaker) and recovered from."""

from __future__ import annotations

import time

import pytest

from trec.errors import TrecError
from trec.serving.store import StoreUnavailable, open_store


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        store = open_store("memory")
    else:
        store = open_store(request.getfixturevalue("redis_server").url, timeout_s=0.5)
    yield store
    store.close()


def test_histories_keep_the_newest_items_once_in_order(store):
    assert store.histories(["u1", "u2"]) == [[], []]
    assert store.append_histories({"u1": ["a", "b", "c"], "u2": ["x"]}, max_len=3) == [3, 1]
    assert store.append_histories({"u1": ["a", "d"]}, max_len=3) == [3]  # a moves to the end; b falls off
    assert store.histories(["u1", "u2", "nobody"]) == [["c", "a", "d"], ["x"], []]


def test_counters_records_and_set_once(store):
    store.incr({"exp:ab:control:impressions": 2, "exp:ab:control:clicks": 1})
    store.incr({"exp:ab:control:impressions": 3})
    assert store.counters(["exp:ab:control:impressions", "exp:ab:control:clicks", "never"]) == [5, 1, 0]
    store.put_many({"served:ab:u1": ('{"arm": "control"}', 60), "short": ("v", 0.05)})
    assert store.get("served:ab:u1") == '{"arm": "control"}'
    assert store.set_once("clicked:ab:u1:1", 60) and not store.set_once("clicked:ab:u1:1", 60)
    time.sleep(0.15)
    assert store.get("short") is None and store.get("missing") is None


def test_redis_outage_fails_fast_reports_health_and_recovers(redis_server):
    changes = []
    store = open_store(redis_server.url, timeout_s=0.2, retry_after_s=0.5, on_health=changes.append)
    store.append_histories({"u": ["a"]}, max_len=10)
    redis_server.stop()  # the server really is gone: its process was killed
    with pytest.raises(StoreUnavailable):
        store.histories(["u"])
    assert not store.healthy and changes == [False]
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="down"):  # the breaker answers without waiting for a timeout
        store.histories(["u"])
    assert time.perf_counter() - started < 0.15  # under the 0.2 s timeout a real attempt could take
    redis_server.start()  # empty again: no persistence
    time.sleep(0.55)
    assert store.histories(["u"]) == [[]]
    assert store.healthy and changes == [False, True]


def test_unreachable_redis_starts_degraded_and_bad_urls_are_one_line():
    from redis_server import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.1)
    assert not store.healthy and "Connection" in store.last_error
    for url in ("redis:/nohost", "http://127.0.0.1:1/0", "redis://127.0.0.1:1/zero"):
        with pytest.raises(TrecError, match="--store"):
            open_store(url)


def test_redis_histories_expire_and_counters_do_not(redis_server):
    import redis

    from trec.serving.store import HISTORY_TTL_S

    store = open_store(redis_server.url, timeout_s=0.5)
    store.append_histories({"u": ["a"]}, max_len=10)
    store.incr({"exp:ab:control:clicks": 1})
    client = redis.Redis.from_url(redis_server.url)
    assert 0 < client.pttl("trec:history:u") <= HISTORY_TTL_S * 1000  # evictable under volatile-lru (k8s)
    assert client.pttl("trec:count:exp:ab:control:clicks") == -1  # never expires, never evicted


def test_a_password_protected_redis_needs_it_and_no_message_shows_it(tmp_path):
    from redis_server import RedisServer

    server = RedisServer(tmp_path, password="s3cret-0123")
    server.start()
    try:
        store = open_store(server.url, timeout_s=0.5)
        store.incr({"exp:ab:arm:clicks": 2})
        assert store.counters(["exp:ab:arm:clicks"]) == [2] and store.healthy
        assert store.url == f"redis://:***@127.0.0.1:{server.port}/0"
        for url in (server.url.replace("s3cret-0123", "wrong-0123"), f"redis://127.0.0.1:{server.port}/0"):
            refused = open_store(url, timeout_s=0.5)
            with pytest.raises(StoreUnavailable) as error:
                refused.counters(["exp:ab:arm:clicks"])
            message = f"{error.value} {refused.last_error}"
            assert "Authentication" in message or "NOAUTH" in message or "WRONGPASS" in message, message
            assert "s3cret" not in message and "wrong-0123" not in message, message
        with pytest.raises(TrecError) as bad:
            open_store("redis://:s3cret-0123@")  # no host: refused without echoing the password
        assert "s3cret" not in str(bad.value) and ":***@" in str(bad.value)
    finally:
        server.stop()
