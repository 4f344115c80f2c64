"""A/B experiments of serving: a YAML file of experiments, stable assignment of users to arms, impressions and
clicks counted per arm in the online store (:mod:`trec.serving.store`), and the test of each arm against control.

    experiments:                               # the file: trec serve --experiments FILE
      - name: tower-v2
        arms:                                  # 2+ arms; the first is the control
          - {name: control, version: v0001, share: 0.5}
          - {name: treatment, version: v0002, share: 0.5}
        click_events: [click, like, purchase]  # optional; these three by default

    arm = assign(experiment, "196")            # the same arm in every process and replica
    log = ExperimentLog(store)
    log.record_impressions([(experiment, arm, "196", ["242", "302"])])   # one served list = one impression
    log.record_feedback([(experiment, "196", "302", "click")])           # at most one click per impression
    print(format_report(log.report(experiment)))

Store keys (strings; the store adds its own prefix): counters ``exp:NAME:ARM:impressions`` and
``exp:NAME:ARM:clicks``; records ``served:NAME:USER`` (JSON ``{"arm", "items", "id"}``: the user's last
served list, ``served_ttl_s``) and ``clicked:NAME:USER:ID`` (the click of that impression is counted).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from trec.config.loader import read_yaml  # the config's safe loader: no aliases, no duplicate keys
from trec.errors import TrecError
from trec.io import quote

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # experiment and arm names: no ':' (they are parts of store keys)
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a version name of the model root (versions.py)
DEFAULT_CLICK_EVENTS = ("click", "like", "purchase")
_SHARE_TOLERANCE, _Z_95 = 1e-6, 1.959964  # _Z_95: the two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Arm:
    name: str
    version: str  # a version name of the model root
    share: float  # of the users, in (0, 1]


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]  # the first is the control
    click_events: tuple[str, ...] = DEFAULT_CLICK_EVENTS


def load_experiments(path) -> list[Experiment]:
    """The experiments of a YAML file; anything wrong is one TrecError naming the file and the key path."""
    where, content = str(path), read_yaml(Path(path))
    _keys(content, {"experiments"}, where, "")
    entries = content.get("experiments")
    if not isinstance(entries, list) or not entries:
        raise TrecError(f"{where}: experiments: expected a non-empty list of experiments")
    found = [_experiment(entry, where, f"experiments[{i}]") for i, entry in enumerate(entries)]
    _unique([e.name for e in found], where, "experiments", "experiment")
    return found


def _experiment(entry: object, where: str, key: str) -> Experiment:
    _keys(entry, {"name", "arms", "click_events"}, where, key, required={"name", "arms"})
    name = _name(entry["name"], where, f"{key}.name")
    arms = entry["arms"]
    if not isinstance(arms, list) or len(arms) < 2:
        raise TrecError(f"{where}: {key}.arms: expected a list of 2 or more arms (the first is the control)")
    arms = tuple(_arm(arm, where, f"{key}.arms[{i}]") for i, arm in enumerate(arms))
    _unique([arm.name for arm in arms], where, f"{key}.arms", "arm")
    total = sum(arm.share for arm in arms)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise TrecError(f"{where}: {key}.arms: shares sum to {total:g}, expected 1")
    events = entry.get("click_events", list(DEFAULT_CLICK_EVENTS))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
        raise TrecError(f"{where}: {key}.click_events: expected a non-empty list of event names, got {quote(events)}")
    _unique(events, where, f"{key}.click_events", "event")
    return Experiment(name, arms, tuple(events))


def _arm(entry: object, where: str, key: str) -> Arm:
    _keys(entry, {"name", "version", "share"}, where, key, required={"name", "version", "share"})
    version, share = entry["version"], entry["share"]
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise TrecError(f"{where}: {key}.version: expected a version name of the model root, got {quote(version)}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise TrecError(f"{where}: {key}.share: expected a number in (0, 1], got {quote(share)}")
    return Arm(_name(entry["name"], where, f"{key}.name"), version, float(share))


def _keys(entry: object, allowed: set, where: str, key: str, required: set = frozenset()) -> None:
    if not isinstance(entry, dict):
        raise TrecError(f"{where}: {key or 'top level'}: expected a mapping, got {quote(entry)}")
    prefix = f"{key}." if key else ""
    for name in entry:
        if name not in allowed:
            raise TrecError(f"{where}: {prefix}{name}: unknown key (expected {', '.join(sorted(allowed))})")
    missing = sorted(required - set(entry))
    if missing:
        raise TrecError(f"{where}: {prefix}{missing[0]}: missing")


def _name(value: object, where: str, key: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise TrecError(f"{where}: {key}: expected a name of [a-z0-9_-] (1-64, starting a-z0-9), got {quote(value)}")
    return value


def _unique(names: list, where: str, key: str, what: str) -> None:
    twice = [name for index, name in enumerate(names) if name in names[:index]]
    if twice:
        raise TrecError(f"{where}: {key}: {what} {quote(twice[0])} appears twice")


def assign(experiment: Experiment, user_id: str) -> Arm:
    """The user's arm: the first 8 bytes of sha256(``NAME\\0USER``), big-endian, as a fraction of 2**64, mapped
    through the cumulative shares. Depends on nothing but the two names, so every process and replica agrees."""
    digest = hashlib.sha256(f"{experiment.name}\x00{user_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for arm in experiment.arms:
        cumulative += arm.share
        if fraction < cumulative:
            return arm
    return experiment.arms[-1]  # shares summing to 1 - 1e-6 (or rounding): the top sliver is the last arm's


def _counter(experiment: str, arm: str, kind: str) -> str:
    return f"exp:{experiment}:{arm}:{kind}"


class ExperimentLog:
    """Impressions and clicks of experiments' arms, counted in the store (shared by replicas with Redis). Store
    failures (:class:`~trec.serving.store.StoreUnavailable`) propagate: the caller decides."""

    def __init__(self, store, served_ttl_s: float = 86400) -> None:
        self.store = store
        self.served_ttl_s = served_ttl_s

    def record_impressions(self, rows: list[tuple[Experiment, Arm, str, list[str]]]) -> None:
        """Count one impression per served list (``(experiment, arm, user_id, item_ids)``) and keep each user's last
        list per experiment, with a new impression id: one incr and one put_many call for the whole batch."""
        if not rows:
            return
        amounts: dict[str, int] = defaultdict(int)
        served = {}
        for experiment, arm, user, items in rows:
            amounts[_counter(experiment.name, arm.name, "impressions")] += 1
            record = {"arm": arm.name, "items": [str(item) for item in items], "id": secrets.token_hex(8)}
            served[f"served:{experiment.name}:{user}"] = (json.dumps(record), self.served_ttl_s)
        # Counted before the list is stored: a click can only find a list whose impression is already counted.
        self.store.incr(dict(amounts))
        self.store.put_many(served)

    def record_feedback(self, rows: list[tuple[Experiment, str, str, str]]) -> int:
        """Count clicks of ``(experiment, user_id, item_id, event)`` rows; the number counted.

        A row counts one click for the arm of the user's last served list when the event is one of the
        experiment's click_events, the item is in that list, and that impression has no click yet (set_once):
        clicks <= impressions, so the CTR is a proportion."""
        amounts: dict[str, int] = defaultdict(int)
        for experiment, user, item, event in rows:
            if event not in experiment.click_events:
                continue
            served = _served(self.store.get(f"served:{experiment.name}:{user}"), experiment)
            if served is None or str(item) not in served["items"]:
                continue
            # The marker outlives the served record it guards (it is set later, with the same TTL).
            if self.store.set_once(f"clicked:{experiment.name}:{user}:{served['id']}", self.served_ttl_s):
                amounts[_counter(experiment.name, served["arm"], "clicks")] += 1
        if amounts:
            self.store.incr(dict(amounts))
        return sum(amounts.values())

    def report(self, experiment: Experiment) -> Report:
        values = self.store.counters([_counter(experiment.name, arm.name, kind) for arm in experiment.arms
                                      for kind in ("impressions", "clicks")])
        counts = [(arm.name, arm.version, values[2 * i], values[2 * i + 1]) for i, arm in enumerate(experiment.arms)]
        return build_report(experiment.name, counts)


def _served(raw: str | None, experiment: Experiment) -> dict | None:
    """The served record, or None when absent, not one this module wrote, or of an arm the experiment no longer
    has (a list served under an earlier config of it)."""
    try:
        served = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    ok = isinstance(served, dict) and isinstance(served.get("items"), list) and isinstance(served.get("id"), str)
    return served if ok and served.get("arm") in {arm.name for arm in experiment.arms} else None


@dataclass(frozen=True)
class Comparison:
    """Arm b against arm a (the control): the difference of CTRs b - a, its 95% CI, z and the two-sided p-value."""
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    z: float | None
    p_value: float | None


def two_proportion_test(clicks_a: int, n_a: int, clicks_b: int, n_b: int) -> Comparison:
    """The two-proportion z-test of b against a.

    The CI is the unpooled Wald interval, difference +- 1.959964 * sqrt(pa(1-pa)/na + pb(1-pb)/nb); z uses the
    pooled SE (the null hypothesis says both rates are equal); p = erfc(|z| / sqrt(2)).

    - No impressions in an arm: its rate is undefined, so everything is None (p too: no test was possible,
      which is not a test that found nothing).
    - Zero pooled variance (both rates 0, or both 1): the difference is exactly 0, so z = 0.0 and p = 1.0
      (no evidence of a difference) instead of 0/0; the CI is [0, 0]. Zero unpooled variance alone (0/n vs
      n/n) collapses the Wald CI to the difference (its known failure at rates 0 and 1); z and p are defined.
    """
    for clicks, n in ((clicks_a, n_a), (clicks_b, n_b)):
        if not 0 <= clicks <= n:
            raise ValueError(f"expected 0 <= clicks <= impressions, got {clicks} clicks of {n}")
    if n_a == 0 or n_b == 0:
        return Comparison(None, None, None, None, None)
    pa, pb = clicks_a / n_a, clicks_b / n_b
    difference = pb - pa
    half = _Z_95 * math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    pooled_se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if pooled_se == 0:
        return Comparison(difference, difference, difference, 0.0, 1.0)
    z = difference / pooled_se
    return Comparison(difference, difference - half, difference + half, z, math.erfc(abs(z) / math.sqrt(2)))


@dataclass(frozen=True)
class ArmReport:
    name: str
    version: str
    impressions: int
    clicks: int
    ctr: float | None  # None with no impressions
    vs_control: Comparison | None  # None for the control


@dataclass(frozen=True)
class Report:
    experiment: str
    arms: tuple[ArmReport, ...]  # the first is the control


def build_report(experiment: str, counts: list[tuple[str, str, int, int]]) -> Report:
    """The report of ``(arm, version, impressions, clicks)`` counts, control first (from the store or from JSON)."""
    for name, _, impressions, clicks in counts:
        if not 0 <= clicks <= impressions:
            raise TrecError(f"experiment {experiment}: arm {name} has {clicks} clicks of {impressions} impressions")
    _, _, control_n, control_clicks = counts[0]
    return Report(experiment, tuple(
        ArmReport(name, version, n, clicks, clicks / n if n else None,
                  two_proportion_test(control_clicks, control_n, clicks, n) if index else None)
        for index, (name, version, n, clicks) in enumerate(counts)))


def report_json(report: Report) -> dict:
    """The report as plain JSON types (the body of GET /experiments/NAME)."""
    arms = [{"name": arm.name, "version": arm.version, "impressions": arm.impressions, "clicks": arm.clicks,
             "ctr": arm.ctr, "vs_control": None if (c := arm.vs_control) is None else {
                 "difference": c.difference, "ci95": [c.ci_low, c.ci_high], "z": c.z, "p_value": c.p_value}}
            for arm in report.arms]
    return {"experiment": report.experiment, "control": report.arms[0].name, "arms": arms}


def report_from_json(payload: object, where: str) -> Report:
    """The report of a :func:`report_json` body: the counts are read, the statistics computed again (one code path)."""
    try:
        counts = [(arm["name"], arm["version"], arm["impressions"], arm["clicks"]) for arm in payload["arms"]]
        ok = isinstance(payload["experiment"], str) and len(counts) >= 2 and all(
            isinstance(n, str) and isinstance(v, str) and type(i) is int and type(c) is int for n, v, i, c in counts)
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise TrecError(f"{where}: not an experiment report (expected experiment and 2+ arms with counts)")
    return build_report(payload["experiment"], counts)


def format_report(report: Report) -> str:
    """A small aligned table: one row per arm, the control first, each other arm against it."""
    rows = [("arm", "version", "impressions", "clicks", "ctr", "diff", "95% CI", "p")]
    for arm in report.arms:
        c = arm.vs_control
        compared = ("", "", "") if c is None else ("-", "-", "-") if c.difference is None else (
            f"{c.difference:+.4f}", f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]", f"{c.p_value:.3g}")
        rows.append((arm.name, arm.version, str(arm.impressions), str(arm.clicks),
                     "-" if arm.ctr is None else f"{arm.ctr:.4f}", *compared))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [f"experiment {report.experiment} (control: {report.arms[0].name})"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
