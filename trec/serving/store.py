"""The online store of serving: users' real-time histories, counters and short-lived records.

    store = open_store("memory", timeout_s=0.05)                  # embedded, in this process (the default)
    store = open_store("redis://127.0.0.1:6379/0", timeout_s=0.05) # shared by every replica
    store.append_histories({"196": ["242", "302"]}, max_len=200)  # oldest first; an item moves to the end
    store.histories(["196", "7"])                                 # [["242", "302"], []]
    store.incr({"exp:ab:control:impressions": 1}); store.counters([...])
    store.put_many({"served:ab:196": ("{...}", 3600)}); store.get(...); store.set_once(key, ttl_s)

Keys are namespaced (``prefix``, ``trec:`` by default) and values are plain strings: JSON where
structured, never pickle. In Redis a history expires ``HISTORY_TTL_S`` after its user's last
positive event; counters never expire. Each method is one
round trip to Redis (a pipeline), so a micro-batch of requests costs one call, not one per request.

Every call has a timeout (``timeout_s``: the socket's read, write and connect timeouts, no
retries). A failed call raises :class:`StoreUnavailable` and opens a breaker: for
``retry_after_s`` every call fails at once instead of waiting its timeout again, then one call
tries the server again. Serving treats the store as an enhancement: with it down, requests are
answered from the bundle's offline histories and ``healthy`` is False (``/ready`` says
``degraded``; ``trec_store_up`` is 0).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from trec.errors import TrecError

MEMORY = "memory"
HISTORY_TTL_S = 30 * 86400
"""A Redis history lives this long after its user's last positive event."""


class StoreUnavailable(Exception):
    """A store call failed or the breaker is open (the server is down or slower than the timeout)."""


class MemoryStore:
    """The embedded store: dictionaries under one lock (one process; lost when it exits)."""

    url = MEMORY

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histories: dict[str, list[str]] = {}
        self._counters: dict[str, int] = defaultdict(int)
        self._records: dict[str, tuple[str, float]] = {}  # key -> (value, expiry on time.monotonic())

    def histories(self, users: Sequence[str]) -> list[list[str]]:
        with self._lock:
            return [list(self._histories.get(user, ())) for user in users]

    def append_histories(self, items_by_user: Mapping[str, Sequence[str]], max_len: int) -> list[int]:
        lengths = []
        with self._lock:
            for user, items in items_by_user.items():
                history = self._histories.setdefault(user, [])
                for item in items:
                    if item in history:
                        history.remove(item)
                    history.append(item)
                del history[:-max_len]
                lengths.append(len(history))
        return lengths

    def incr(self, amounts: Mapping[str, int]) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._counters[name] += amount

    def counters(self, names: Sequence[str]) -> list[int]:
        with self._lock:
            return [self._counters.get(name, 0) for name in names]

    def put_many(self, records: Mapping[str, tuple[str, float]]) -> None:
        now = time.monotonic()
        with self._lock:
            for key, (value, ttl_s) in records.items():
                self._records[key] = (value, now + ttl_s)

    def get(self, key: str) -> str | None:
        with self._lock:
            value, expiry = self._records.get(key, (None, 0.0))
            return value if expiry > time.monotonic() else None

    def set_once(self, key: str, ttl_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._records.get(key, (None, 0.0))[1] > now:
                return False
            self._records[key] = ("1", now + ttl_s)
            return True

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


class RedisStore:
    """The same operations on a Redis server (the redis client; strings in, strings out)."""

    def __init__(self, url: str, timeout_s: float, prefix: str = "trec:", history_ttl_s: float = HISTORY_TTL_S) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.history_ttl_ms = int(history_ttl_s * 1000)
        # No retries: a slow or dead server costs one timeout, and the breaker (GuardedStore) stops the rest.
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), decode_responses=True)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def histories(self, users: Sequence[str]) -> list[list[str]]:
        pipe = self._client.pipeline(transaction=False)
        for user in users:
            pipe.lrange(self._key("history", user), 0, -1)
        return pipe.execute()

    def append_histories(self, items_by_user: Mapping[str, Sequence[str]], max_len: int) -> list[int]:
        pipe = self._client.pipeline(transaction=True)  # each user's list changes as one step
        for user, items in items_by_user.items():
            key = self._key("history", user)
            for item in items:
                pipe.lrem(key, 0, item)
                pipe.rpush(key, item)
            pipe.ltrim(key, -max_len, -1)
            pipe.pexpire(key, self.history_ttl_ms)  # a user gone quiet frees the memory (volatile-lru may too)
            pipe.llen(key)
        results = pipe.execute()
        lengths, position = [], 0
        for items in items_by_user.values():
            position += 2 * len(items) + 3
            lengths.append(int(results[position - 1]))
        return lengths

    def incr(self, amounts: Mapping[str, int]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for name, amount in amounts.items():
            pipe.incrby(self._key("count", name), amount)
        pipe.execute()

    def counters(self, names: Sequence[str]) -> list[int]:
        if not names:
            return []
        return [int(value or 0) for value in self._client.mget([self._key("count", name) for name in names])]

    def put_many(self, records: Mapping[str, tuple[str, float]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, (value, ttl_s) in records.items():
            pipe.set(self._key("record", key), value, px=max(1, int(ttl_s * 1000)))
        pipe.execute()

    def get(self, key: str) -> str | None:
        return self._client.get(self._key("record", key))

    def set_once(self, key: str, ttl_s: float) -> bool:
        return bool(self._client.set(self._key("record", key), "1", nx=True, px=max(1, int(ttl_s * 1000))))

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()


class GuardedStore:
    """A store whose every call is timed out and breaker-guarded (see the module docstring).

    ``on_health(healthy: bool)`` is called whenever the state changes (the metrics gauge)."""

    _METHODS = ("histories", "append_histories", "incr", "counters", "put_many", "get", "set_once", "ping")

    def __init__(self, store: MemoryStore | RedisStore, retry_after_s: float = 1.0,
                 on_health: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.url = redacted(store.url)  # what errors, logs and /ready show: never the password
        self.retry_after_s = retry_after_s
        self.on_health = on_health
        self.healthy = True
        self.last_error: str | None = None
        self._open_until = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        if name not in self._METHODS:
            raise AttributeError(name)
        method = getattr(self.store, name)

        def guarded(*args, **kwargs):
            if not self.healthy and time.monotonic() < self._open_until:
                raise StoreUnavailable(f"store {self.url} is down ({self.last_error})")
            try:
                result = method(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any client failure: connection, timeout, protocol
                self._set_health(False, f"{type(error).__name__}: {error}")
                raise StoreUnavailable(f"store {self.url}: {self.last_error}") from None
            self._set_health(True, None)
            return result

        return guarded

    def check(self) -> bool:
        """Ping the server (bypassing the breaker); the new health."""
        self._open_until = 0.0
        try:
            self.ping()
        except StoreUnavailable:
            pass
        return self.healthy

    def _set_health(self, healthy: bool, error: str | None) -> None:
        with self._lock:
            changed = healthy != self.healthy
            self.healthy, self.last_error = healthy, error
            if not healthy:
                self._open_until = time.monotonic() + self.retry_after_s
        if changed and self.on_health is not None:
            self.on_health(healthy)

    def close(self) -> None:
        self.store.close()


def redacted(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: ``redis://:***@host:6379/0``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:  # not a URL urllib can split: show none of it
        return "<unparsable URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def open_store(url: str, timeout_s: float = 0.05, retry_after_s: float = 1.0,
               on_health: Callable[[bool], None] | None = None, prefix: str = "trec:") -> GuardedStore:
    """``memory`` or ``redis://HOST:PORT/DB`` (also ``rediss://``, ``unix://``), guarded. A malformed URL is one
    TrecError line; an unreachable server is not an error here (serving starts degraded and retries)."""
    if url == MEMORY:
        return GuardedStore(MemoryStore(), retry_after_s, on_health)
    parts = urlsplit(url)
    database = parts.path.strip("/") if parts.scheme != "unix" else "0"
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname) \
            or not (database == "" or database.isdigit()):
        raise TrecError(f"--store: expected 'memory' or redis://[:PASSWORD@]HOST:PORT/DB, got {redacted(url)!r}"[:200])
    if not timeout_s > 0:
        raise TrecError(f"--store-timeout-ms must be > 0, got {timeout_s * 1000:g}")
    try:
        store = RedisStore(url, timeout_s, prefix)
    except ValueError as error:  # the client's own URL checks (a bad port or database number)
        raise TrecError(f"--store: {error}") from None
    guarded = GuardedStore(store, retry_after_s, on_health)
    guarded.check()
    return guarded
