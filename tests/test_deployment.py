"""Versions and experiments over real `trec serve` processes: a reload under concurrent load fails no request,
the CURRENT pointer is followed, a corrupt version is refused while the old one keeps serving, /admin needs
its token, and an A/B experiment routes users by a stable hash, counts impressions and clicks per arm, and
reports them over HTTP and through `trec experiments report`."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from serving_client import Server, metric
from training import run_command, trec_command

from trec.serving.experiments import assign, build_report, load_experiments, report_json
from trec.serving.versions import publish, set_current

TOKEN = {"TREC_ADMIN_TOKEN": "s3cret"}
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def model_root(serving_export, tmp_path):
    """v0001 (current) and v0002: the same export published twice (hard links, cheap)."""
    root = tmp_path / "models"
    publish(serving_export["export"], root, make_current=True)
    publish(serving_export["export"], root)
    return root


def stop(server: Server) -> None:
    server.stop()
    assert server.proc.returncode in (0, -15), server.proc.stderr.read()[-4000:]


def test_reload_under_load_fails_no_request(model_root):
    server = Server(None, "--model-root", model_root, env=TOKEN)
    outcomes: list[tuple[int, str | None, float, float]] = []  # status, version, sent at, answered at
    done = threading.Event()

    def client(n: int) -> None:
        while not done.is_set():
            sent = time.monotonic()
            status, answer = server.request("POST", "/recommend", {"user_id": str(n), "k": 5})
            version = answer.get("version") if status == 200 else str(answer)
            outcomes.append((status, version, sent, time.monotonic()))

    try:
        assert server.recommend(user_id="1", k=5)["version"] == "v0001"
        assert server.request("POST", "/admin/reload")[0] == 401
        assert server.request("POST", "/admin/reload", headers={"Authorization": "Bearer nope"})[0] == 401
        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        set_current(model_root, "v0002")
        reload_sent = time.monotonic()
        status, answer = server.request("POST", "/admin/reload", headers=AUTH)
        reload_answered = time.monotonic()
        assert (status, answer) == (200, {"status": "reloaded", "previous": "v0001", "current": "v0002"})
        time.sleep(0.5)
        done.set()
        for thread in threads:
            thread.join()
        assert all(status == 200 for status, *_ in outcomes), [o for o in outcomes if o[0] != 200][:3]
        # Causal bounds only (no timing slack): answered before the reload was sent -> old version; sent after
        # the reload was answered -> new version. Requests in between may see either.
        assert {version for _, version, _, answered in outcomes if answered < reload_sent} == {"v0001"}
        assert {version for _, version, sent, _ in outcomes if sent > reload_answered} == {"v0002"}
        assert len(outcomes) > 50
        assert metric(server, "trec_reloads", "trec_reloads_total", outcome="done") == 1
        assert metric(server, "trec_model_info", "trec_model_info", name="v0002", current="True") == 1
        assert metric(server, "trec_model_info", "trec_model_info", name="v0001") == 0  # retired

        broken = model_root / "versions" / "v0003"  # a hand-made version whose weights changed after export
        shutil.copytree(model_root / "versions" / "v0002", broken)
        (broken / "published.json").write_text((broken / "published.json").read_text().replace("v0002", "v0003"))
        with open(broken / "bundle" / "retriever" / "weights.pt", "ab") as handle:
            handle.write(b"\0")
        set_current(model_root, "v0003")
        status, answer = server.request("POST", "/admin/reload", headers=AUTH)
        assert status == 409 and "weights.pt" in answer["error"] and answer["serving"] == "v0002", answer
        assert server.recommend(user_id="1", k=5)["version"] == "v0002"
    finally:
        stop(server)


def test_watch_follows_the_pointer_and_admin_is_off_without_a_token(model_root):
    server = Server(None, "--model-root", model_root, "--watch-s", "0.2")
    try:
        assert server.request("POST", "/admin/reload", headers=AUTH)[0] == 403
        set_current(model_root, "v0002")
        deadline = time.monotonic() + 20
        while server.recommend(user_id="1", k=3)["version"] != "v0002":
            assert time.monotonic() < deadline, "the watcher did not follow CURRENT"
            time.sleep(0.1)
        assert server.request("GET", "/model")[1]["current"] == "v0002"
    finally:
        stop(server)


def test_experiment_routes_counts_and_reports(model_root, tmp_path):
    config = tmp_path / "ab.yaml"
    config.write_text("experiments:\n  - name: ab\n    arms:\n      - {name: control, version: v0001, share: 0.5}\n"
                      "      - {name: treatment, version: v0002, share: 0.5}\n")
    experiment = load_experiments(config)[0]
    server = Server(None, "--model-root", model_root, "--experiments", config)
    try:
        counts = {"control": [0, 0], "treatment": [0, 0]}  # impressions, clicks
        for n in range(120):
            user = f"visitor-{n}"
            answer = server.recommend(user_id=user, k=5)
            arm = assign(experiment, user)
            assert (answer["arm"], answer["version"]) == (arm.name, arm.version)
            counts[arm.name][0] += 1
            if n % (2 if arm.name == "treatment" else 5) == 0:  # treatment users click more often
                server.feedback(user_id=user, item_id=answer["items"][0]["item_id"], event="click")
                server.feedback(user_id=user, item_id=answer["items"][0]["item_id"], event="click")  # once only
                counts[arm.name][1] += 1
            server.feedback(user_id=user, item_id="not-served", event="click")  # not on the list: no click
        status, report = server.request("GET", "/experiments/ab")
        expected = build_report("ab", [(arm.name, arm.version, *counts[arm.name]) for arm in experiment.arms])
        assert (status, report) == (200, report_json(expected))
        assert min(counts["control"][0], counts["treatment"][0]) > 30  # both arms really got traffic
        assert server.request("GET", "/experiments/other")[0] == 404
        url = f"http://127.0.0.1:{server.port}"
        printed = run_command(trec_command(1, "experiments", "report", "ab", "--url", url)).stdout
        assert "treatment" in printed and f"{counts['treatment'][0]}" in printed
    finally:
        stop(server)
