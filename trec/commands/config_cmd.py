"""`trec config show CONFIG [KEY=VALUE ...]`: the resolved, validated config as YAML."""

from __future__ import annotations

import argparse

from trec.commands import add_override_flags, config_overrides


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="inspect experiment configs")
    actions = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print CONFIG merged onto the defaults, with overrides applied")
    show.add_argument("config", metavar="CONFIG", help="YAML file, or the name of a config trec ships (configs/*.yaml)")
    add_override_flags(show, "override a config value by dotted key, e.g. --set data.batch_size=256")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from trec.config import config_to_yaml
    from trec.models import load_config

    cfg = load_config(args.config, config_overrides(args))
    print(config_to_yaml(cfg), end="")
    return 0
