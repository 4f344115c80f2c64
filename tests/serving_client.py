"""A `trec serve` process on a free loopback port for the serving tests, and its HTTP client."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families
from training import REPO, child_env


class Server:
    """A `trec serve` process on a port the OS picked (--port 0), up once it printed its line."""

    def __init__(self, export, *flags: str, env: dict | None = None) -> None:
        """``trec serve EXPORT FLAGS`` (``export=None``: only FLAGS, e.g. --model-root DIR)."""
        target = [str(export)] if export is not None else []
        command = [sys.executable, "-m", "trec", "serve", *target, "--port", "0", "--threads", "1", *flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=child_env(env), cwd=REPO)
        line = self.proc.stdout.readline()  # blocks until the server is ready (or gone)
        match = re.fullmatch(r"serving (\S+) on http://127\.0\.0\.1:(\d+)\n", line)
        if match is None:
            self.stop()
            raise AssertionError(f"no serving line: {line!r}\n{self.proc.stderr.read()[-4000:]}")
        self.port = int(match.group(2))

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            connection.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            text = response.read().decode()
            kind = response.getheader("Content-Type", "")
            return response.status, json.loads(text) if kind.startswith("application/json") else text
        finally:
            connection.close()

    def recommend(self, **body) -> dict:
        status, answer = self.request("POST", "/recommend", body)
        assert status == 200, answer
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


    def feedback(self, **body) -> dict:
        status, answer = self.request("POST", "/feedback", body)
        assert status == 200, answer
        return answer


def ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def metric(server: Server, family: str, sample: str, **labels: str) -> float:
    """The sum of ``sample``'s values with ``labels`` in the server's /metrics."""
    status, text = server.request("GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))
