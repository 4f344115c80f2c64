"""`trec env`: versions of the stack, devices and the backend a job would pick."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("env", help="versions of torch/torchrec/fbgemm/faiss/torchx, devices, backend")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--brief", action="store_true", help="one line (used after installation)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.env import collect_env, format_env

    report = collect_env()
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.brief:
        versions = report["versions"]
        print("trec env: " + " ".join(f"{k}={v}" for k, v in versions.items()) + f" backend={report['backend']}")
    else:
        print(format_env(report))
    return 0
