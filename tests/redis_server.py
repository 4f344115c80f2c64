"""A real redis-server on a free loopback port, for the tests of the online store.

Tests that need it take the ``redis_server`` fixture (tests/conftest.py). Where redis-server is not on
PATH they skip with the reason, unless ``TREC_REQUIRE_REDIS=1`` (set by .ci/run), which turns the skip
into a failure so that CI always runs them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REQUIRE = "TREC_REQUIRE_REDIS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``redis-server`` started without persistence on 127.0.0.1:PORT; ``stop()`` / ``start()`` simulate an outage.
    With ``password``, clients must authenticate (``--requirepass``) and ``url`` carries it."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not on PATH (apt-get install redis-server)"
            if os.environ.get(REQUIRE) == "1":
                pytest.fail(f"{message}; {REQUIRE}=1 forbids skipping the Redis tests")
            pytest.skip(message)
        self.binary, self.directory = binary, directory
        self.port, self.password = free_port(), password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--protected-mode", "yes",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._send(b"PING", timeout=0.2).endswith(b"+PONG\r\n"):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def flush(self) -> None:
        self._send(b"FLUSHALL", timeout=2)

    def _send(self, command: bytes, timeout: float) -> bytes:
        """``command`` (after AUTH with a password) on a new connection; every reply, once all have come."""
        commands = ([f"AUTH {self.password}".encode()] if self.password else []) + [command]
        replies = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(b"".join(c + b"\r\n" for c in commands))
            while replies.count(b"\r\n") < len(commands):
                chunk = sock.recv(64)
                if not chunk:
                    break
                replies += chunk
        return replies
