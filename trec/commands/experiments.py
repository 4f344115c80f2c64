"""`trec experiments report`: the impressions, clicks and CTR of an A/B experiment's arms, each arm against the
control (:mod:`trec.serving.experiments`), from a running server or straight from the store."""

from __future__ import annotations

import argparse
import json

from trec.errors import TrecError

_URL_TIMEOUT_S = 5.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiments",
        help="report the A/B experiments of trec serve",
        description="A/B experiments of trec serve (trec serve --experiments FILE).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report",
        help="the impressions, clicks and CTR of each arm, and each arm against the control",
        description="Print the experiment's table: impressions, clicks and CTR per arm, and for each arm but the "
        "control the difference of CTR with the control, its 95%% CI and the two-sided p-value of the "
        "two-proportion z-test. --url asks a running server (GET URL/experiments/NAME); --store reads the "
        "counters from the store directly and needs the experiments file (--config) for the arms.",
    )
    report.add_argument("name", metavar="NAME", help="experiment name, as in the experiments file")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", metavar="http://HOST:PORT", help="a running trec serve")
    source.add_argument("--store", metavar="redis://HOST:PORT/DB", help="the store trec serve counts in")
    report.add_argument("--config", metavar="FILE", help="the experiments file (with --store)")
    report.add_argument("--store-prefix", default="trec:", help="the store's key prefix (default trec:)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.serving.experiments import NAME, format_report, report_json

    if not NAME.fullmatch(args.name):
        raise TrecError(f"trec experiments report: {args.name[:100]!r} is not an experiment name")
    if args.store is not None and args.config is None:
        raise TrecError("trec experiments report: --store needs --config FILE (the experiments file names the arms)")
    if args.url is not None and args.config is not None:
        raise TrecError("trec experiments report: --config goes with --store (the server has its own)")
    report = _from_url(args.url, args.name) if args.url is not None else _from_store(args)
    print(json.dumps(report_json(report), indent=2) if args.json else format_report(report))
    return 0


def _from_url(url: str, name: str):
    import urllib.error
    import urllib.request

    from trec.serving.experiments import report_from_json

    address = f"{url.rstrip('/')}/experiments/{name}"
    if not address.startswith(("http://", "https://")):
        raise TrecError(f"--url: expected http://HOST:PORT, got {url[:100]!r}")
    try:
        with urllib.request.urlopen(address, timeout=_URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            body = response.read(1 << 20)
    except urllib.error.HTTPError as error:
        hint = f": no experiment {name} on this server" if error.code == 404 else ""
        raise TrecError(f"{address}: HTTP {error.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:  # refused, unknown host, timed out, bad port
        raise TrecError(f"{address}: {getattr(error, 'reason', error)}") from None
    try:
        payload = json.loads(body)
    except ValueError:
        raise TrecError(f"{address}: the answer is not JSON") from None
    return report_from_json(payload, address)


def _from_store(args: argparse.Namespace):
    from trec.serving.experiments import ExperimentLog, load_experiments
    from trec.serving.store import MEMORY, StoreUnavailable, open_store

    if args.store == MEMORY:
        raise TrecError("--store memory is the store of one trec serve process: give redis://HOST:PORT/DB, or --url")
    experiments = {experiment.name: experiment for experiment in load_experiments(args.config)}
    if args.name not in experiments:
        raise TrecError(f"{args.config}: no experiment {args.name} (it has {', '.join(sorted(experiments))})")
    store = open_store(args.store, timeout_s=_URL_TIMEOUT_S, prefix=args.store_prefix)
    try:
        return ExperimentLog(store).report(experiments[args.name])
    except StoreUnavailable as error:
        raise TrecError(str(error)) from None
    finally:
        store.close()
