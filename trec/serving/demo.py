"""`python -m trec.serving.demo EXPORT [USER]`: start `trec serve` on a free loopback port, print one
/recommend answer, stop the server (the last step of `make quickstart`)."""

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
        body = {"user_id": user, "k": 10}
        print(f"$ POST {match.group(1)}/recommend {json.dumps(body)}")
        request = urllib.request.Request(f"{match.group(1)}/recommend", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        print(f"source {answer['source']}, route {answer['route']}, model {answer['model_version']}")
        for item in answer["items"]:
            print(f"{item['rank']:>3}. {item['item_id']:>10}  {item['score']:8.4f}  {item['title']}")
        return 0
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
