"""A/B experiments of serving (trec/serving/experiments.py): seeded simulated traffic through assign and
ExperimentLog finds a real effect and keeps the false-positive rate of A/A tests at its level; assignment is
stable across processes; only clicks on a served list count, once per impression; config errors name the key;
`trec experiments report` prints the table and JSON from the store and from a server."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import random
import sys
import threading

import numpy as np
import pytest
from training import run_command, trec_command

from trec.cli import main
from trec.errors import TrecError
from trec.serving.experiments import (Arm, Experiment, ExperimentLog, assign, format_report, load_experiments,
                                      report_json, two_proportion_test)
from trec.serving.store import open_store

ITEMS = [str(item) for item in range(10)]
AB_YAML = """\
experiments:
  - name: tower-v2
    arms:
      - {name: control, version: v0001, share: 0.5}
      - {name: treatment, version: v0002, share: 0.5}
"""


def experiment(name: str = "tower-v2", shares=(0.5, 0.5)) -> Experiment:
    names = ["control", "treatment", "other"]
    return Experiment(name, tuple(Arm(names[i], f"v000{i + 1}", share) for i, share in enumerate(shares)))


def binomial_band(n: int, p: float, level: float = 0.999) -> tuple[int, int]:
    """The central ``level`` interval of Binomial(n, p) (exact CDF): a count outside it has probability
    < 1 - level under the model, so a seeded test using it fails by chance about once in a thousand seeds."""
    tail, cdf, low, high = (1 - level) / 2, 0.0, None, n
    for k in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * math.log(p) + (n - k) * math.log1p(-p))
        if low is None and cdf >= tail:
            low = k
        if cdf >= 1 - tail:
            high = k
            break
    return low, high


def simulate(log: ExperimentLog, exp: Experiment, users: list[str], click_rate: dict, rng: random.Random) -> None:
    """Serve ITEMS to each user (its assigned arm) and click one of them with the arm's probability; some users
    also send a view and a second click on the same list, which must not count."""
    for start in range(0, len(users), 1000):
        served = [(exp, assign(exp, user), user, ITEMS) for user in users[start:start + 1000]]
        log.record_impressions(served)
        feedback = []
        for _, arm, user, _ in served:
            if rng.random() < click_rate[arm.name]:
                feedback.append((exp, user, rng.choice(ITEMS), "click"))
                if rng.random() < 0.2:
                    feedback += [(exp, user, rng.choice(ITEMS), "like"), (exp, user, ITEMS[0], "view")]
        log.record_feedback(feedback)


def test_a_real_effect_is_significant_and_its_ci_covers_the_truth():
    log, exp = ExperimentLog(open_store("memory")), experiment()
    simulate(log, exp, [f"u{i}" for i in range(20_000)], {"control": 0.10, "treatment": 0.12}, random.Random(0))
    report = log.report(exp)
    control, treatment = report.arms
    assert control.impressions + treatment.impressions == 20_000 and control.vs_control is None
    comparison = treatment.vs_control
    assert comparison.p_value < 0.05 and comparison.z > 0
    assert comparison.ci_low < 0.02 < comparison.ci_high
    assert comparison.difference == pytest.approx(treatment.ctr - control.ctr)
    table = format_report(report)
    assert table.splitlines()[0] == "experiment tower-v2 (control: control)" and "treatment" in table
    assert json.loads(json.dumps(report_json(report)))["arms"][1]["vs_control"]["p_value"] == comparison.p_value


def test_a_a_false_positive_rate_stays_at_the_level():
    # 300 A/A tests on seeded binomial counts: each is significant with probability 0.05 under the null, so
    # the number significant is Binomial(300, 0.05); its 99.9% band is computed, not guessed.
    rng, runs, n = np.random.default_rng(0), 300, 5000
    clicks = rng.binomial(n, 0.1, size=(runs, 2))
    significant = sum(two_proportion_test(int(a), n, int(b), n).p_value < 0.05 for a, b in clicks)
    low, high = binomial_band(runs, 0.05)
    assert low <= significant <= high, (significant, low, high)


def test_a_a_end_to_end_through_the_log():
    # Smaller, through assign and the log: 40 A/A experiments (different names: different assignments).
    rng, runs, users = random.Random(1), 40, [f"u{i}" for i in range(1500)]
    significant = 0
    for run in range(runs):
        log, exp = ExperimentLog(open_store("memory")), experiment(f"aa-{run}")
        simulate(log, exp, users, {"control": 0.1, "treatment": 0.1}, rng)
        control, treatment = log.report(exp).arms
        assert control.impressions + treatment.impressions == len(users)
        assert control.clicks <= control.impressions and treatment.clicks <= treatment.impressions
        significant += treatment.vs_control.p_value < 0.05
    assert significant <= binomial_band(runs, 0.05)[1]


def test_assignment_is_stable_across_processes_and_respects_shares():
    exp = experiment("split", shares=(0.2, 0.3, 0.5))
    users = [f"user-{i}" for i in range(20_000)]
    arms = [assign(exp, user).name for user in users]
    assert arms == [assign(exp, user).name for user in users]
    # The definition: the first 8 bytes of sha256(NAME \0 USER), big-endian, over the cumulative shares.
    fraction = int.from_bytes(hashlib.sha256(b"split\x00user-7").digest()[:8], "big") / 2**64
    assert arms[7] == ("control" if fraction < 0.2 else "treatment" if fraction < 0.5 else "other")
    script = ("import sys; from trec.serving.experiments import Arm, Experiment, assign\n"
              "exp = Experiment('split', (Arm('control', 'v0001', 0.2), Arm('treatment', 'v0002', 0.3), "
              "Arm('other', 'v0003', 0.5)))\n"
              "print(' '.join(assign(exp, f'user-{i}').name for i in range(2000)))")
    child = run_command([sys.executable, "-c", script], timeout=120, env={"PYTHONHASHSEED": "12345"})
    assert child.stdout.split() == arms[:2000]
    for arm in exp.arms:
        count = arms.count(arm.name)
        low, high = binomial_band(len(users), arm.share)
        assert low <= count <= high, (arm.name, count, low, high)
    # Two experiments split the same users independently: 50/50 each, they agree on about half of them.
    first, second = experiment("first"), experiment("second")
    agree = sum(assign(first, u).name == assign(second, u).name for u in users[:2000])
    low, high = binomial_band(2000, 0.5)
    assert low <= agree <= high


@pytest.fixture(params=["memory", "redis"])
def store(request):
    store = open_store("memory") if request.param == "memory" else open_store(
        request.getfixturevalue("redis_server").url, timeout_s=0.5)
    yield store
    store.close()


def test_only_a_first_click_on_a_served_item_counts(store):
    log, exp = ExperimentLog(store), experiment()
    alice, bob = "alice", next(u for u in (f"b{i}" for i in range(100)) if assign(exp, u) != assign(exp, "alice"))
    log.record_impressions([(exp, assign(exp, alice), alice, ["1", "2"]), (exp, assign(exp, bob), bob, ["3"])])
    ignored = [(exp, alice, "9", "click"),       # not in the served list
               (exp, alice, "1", "view"),        # not a click event
               (exp, "carol", "1", "click"),     # nothing served to carol
               (exp, bob, "1", "click")]         # item of alice's list, not bob's
    assert log.record_feedback(ignored) == 0
    assert log.record_feedback([(exp, alice, "1", "click"), (exp, alice, "2", "purchase"),
                                (exp, alice, "1", "click")]) == 1
    assert log.record_feedback([(exp, alice, "2", "like")]) == 0  # the impression has its click already
    assert log.record_feedback([(exp, bob, "3", "like")]) == 1
    log.record_impressions([(exp, assign(exp, alice), alice, ["5"])])  # a new list: a new impression
    assert log.record_feedback([(exp, alice, "1", "click")]) == 0       # the old list is replaced
    assert log.record_feedback([(exp, alice, "5", "click")]) == 1
    by_arm = {arm.name: (arm.impressions, arm.clicks) for arm in log.report(exp).arms}
    assert by_arm[assign(exp, alice).name] == (2, 2) and by_arm[assign(exp, bob).name] == (1, 1)


def test_statistics_edge_cases():
    assert two_proportion_test(0, 0, 5, 10).p_value is None  # no impressions: no test
    nothing = two_proportion_test(0, 100, 0, 100)
    assert (nothing.difference, nothing.z, nothing.p_value, nothing.ci_low, nothing.ci_high) == (0, 0, 1, 0, 0)
    extreme = two_proportion_test(0, 50, 50, 50)
    assert extreme.difference == 1 and extreme.p_value < 1e-10 and extreme.ci_low == extreme.ci_high == 1
    known = two_proportion_test(100, 1000, 130, 1000)  # z = 0.03 / sqrt(0.115 * 0.885 * 0.002); p = 2 (1 - Phi(z))
    assert known.z == pytest.approx(2.10274, abs=1e-5) and known.p_value == pytest.approx(0.035488, abs=1e-6)
    half = 1.959964 * math.sqrt(0.1 * 0.9 / 1000 + 0.13 * 0.87 / 1000)  # unpooled Wald
    assert (known.ci_low, known.ci_high) == pytest.approx((0.03 - half, 0.03 + half))
    with pytest.raises(ValueError):
        two_proportion_test(5, 4, 0, 1)


@pytest.mark.parametrize("text, message", [
    (AB_YAML.replace("share: 0.5}\n", "shar: 0.5}\n", 2).replace("shar", "share", 1),
     "experiments[0].arms[1].shar: unknown key"),
    (AB_YAML.replace("share: 0.5}", "share: 0.4}", 1), "experiments[0].arms: shares sum to 0.9, expected 1"),
    (AB_YAML.replace("name: treatment", "name: control"), "experiments[0].arms: arm 'control' appears twice"),
    (AB_YAML.replace("share: 0.5}", "share: -0.5}", 1), "experiments[0].arms[0].share: expected a number"),
    (AB_YAML.replace("name: tower-v2", "name: Tower v2"), "experiments[0].name: expected a name"),
    (AB_YAML.replace("version: v0002, ", ""), "experiments[0].arms[1].version: missing"),
    (AB_YAML + "    click_events: []\n", "experiments[0].click_events: expected a non-empty list"),
    (AB_YAML + "    colour: red\n", "experiments[0].colour: unknown key"),
    (AB_YAML + "other: 1\n", "other: unknown key"),
    ("experiments:\n  - name: a\n    arms: [{name: x, version: v1, share: 1}]\n",
     "experiments[0].arms: expected a list of 2"),
    (AB_YAML + AB_YAML[len("experiments:\n"):], "experiments: experiment 'tower-v2' appears twice"),
    ("experiments:\n  - &a {name: x}\n  - *a\n", "aliases"),
    ("experiments: []\nexperiments: []\n", "duplicate key"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    with pytest.raises(TrecError) as error:
        load_experiments(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_config_loads_with_defaults(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(AB_YAML + "    click_events: [click]\n" + AB_YAML[len("experiments:\n"):].replace("tower-v2", "b"))
    first, second = load_experiments(path)
    assert first.arms == (Arm("control", "v0001", 0.5), Arm("treatment", "v0002", 0.5))
    assert first.click_events == ("click",) and second.click_events == ("click", "like", "purchase")
    with pytest.raises(TrecError, match="config file not found"):
        load_experiments(tmp_path / "missing.yaml")


def test_cli_report_from_the_store_and_from_a_server(tmp_path, redis_server, capsys):
    config = tmp_path / "experiments.yaml"
    config.write_text(AB_YAML)
    exp = load_experiments(config)[0]
    log = ExperimentLog(open_store(redis_server.url, timeout_s=0.5))
    simulate(log, exp, [f"u{i}" for i in range(400)], {"control": 0.1, "treatment": 0.3}, random.Random(2))
    expected = report_json(log.report(exp))
    report = ["experiments", "report", "tower-v2"]

    # In a subprocess, as users run it (each pays the import of trec.serving, about 4 s).
    table = run_command(trec_command(1, *report, "--store", redis_server.url, "--config", config), timeout=120)
    assert table.stdout.strip() == format_report(log.report(exp))
    assert table.stdout.splitlines()[1].split()[:5] == ["arm", "version", "impressions", "clicks", "ctr"]
    assert main([*report, "--store", redis_server.url, "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected

    # The rest in this process (trec.cli.main: the same parsing, output and one-line errors, exit status 2).
    assert main([*report, "--store", redis_server.url, "--config", str(config).replace(".yaml", ".yml")]) == 2
    assert main(["experiments", "report", "nope", "--store", redis_server.url, "--config", str(config)]) == 2
    assert main([*report, "--store", "memory", "--config", str(config)]) == 2
    assert main([*report, "--store", redis_server.url]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors
    assert "config file not found" in errors[0] and "no experiment nope" in errors[1], errors
    assert "--store memory" in errors[2] and "--store needs --config" in errors[3], errors

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _report_handler(expected))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert main([*report, "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == expected
        assert main([*report, "--url", url + "/"]) == 0
        assert capsys.readouterr().out.strip() == format_report(log.report(exp))
        assert main(["experiments", "report", "nope", "--url", url]) == 2
        assert capsys.readouterr().err.strip().endswith("HTTP 404: no experiment nope on this server")
    finally:
        server.shutdown()
        server.server_close()
    assert main([*report, "--url", url]) == 2  # nobody listens any more
    assert capsys.readouterr().err.startswith(f"error: {url}/experiments/tower-v2: ")


def _report_handler(body: dict):
    """The route the server adds, GET /experiments/NAME, answering ``body`` for tower-v2 and 404 otherwise."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/experiments/tower-v2"
            payload = json.dumps(body if found else {"detail": "no such experiment"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return Handler
