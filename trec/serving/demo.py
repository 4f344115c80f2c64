"""`python -m trec.serving.demo EXPORT [USER]`: start `trec serve` on a free loopback port, print one
/recommend answer, send a like for its first item to /feedback, print the next answer (which reads
the user's online history), stop the server (the last step of `make quickstart`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m trec.serving.demo EXPORT [USER]", file=sys.stderr)
        return 2
    export, user = argv[0], argv[1] if len(argv) > 1 else "1"
    command = [sys.executable, "-m", "trec", "serve", export, "--port", "0"]
    print("$ trec serve", export, "--port 0", flush=True)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # printed once /ready answers 200
        match = re.match(r"serving \S+ on (http://\S+)", line)
        if match is None:
            return server.wait() or 1
        print(line.rstrip(), flush=True)
        url = match.group(1)
        answer = _post(url, "/recommend", {"user_id": user, "k": 10})
        print(f"source {answer['source']}, route {answer['route']}, stage {answer['stage']}, "
              f"model {answer['model_version']}")
        _show(answer)
        liked = answer["items"][0]["item_id"]
        feedback = _post(url, "/feedback", {"user_id": user, "item_id": liked, "event": "like"})
        print(f"label {feedback['label']}, positive {feedback['positive']}, online history "
              f"{feedback['history_length']} item(s)")
        print("the next answer reads the online history (the liked item is now seen), no retraining:")
        _show(_post(url, "/recommend", {"user_id": user, "k": 10}))
        return 0
    finally:
        server.terminate()
        server.wait(30)


def _post(url: str, path: str, body: dict) -> dict:
    print(f"$ POST {url}{path} {json.dumps(body)}", flush=True)
    request = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _show(answer: dict) -> None:
    for item in answer["items"]:
        print(f"{item['rank']:>3}. {item['item_id']:>10}  {item['score']:8.4f}  {item['title']}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
