"""`trec publish`: copy a verified export into a model root as a new version, and move its CURRENT pointer
(:mod:`trec.serving.versions`)."""

from __future__ import annotations

import argparse

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="publish an export as a version of a model root, or choose the current version",
        description="Verify every checksum of EXPORT (bundle and index) and copy it to DIR/versions/NAME (hard "
        "links where possible: published files are never changed), with DIR/versions/NAME/published.json "
        "(provenance). --current also points DIR/CURRENT at it; --set-current NAME points CURRENT at an "
        "existing version (roll back or forward); --list shows the versions. Prints "
        "`published NAME (bundle VERSION) in DIR`.",
    )
    parser.add_argument("export", metavar="EXPORT", nargs="?", help="export directory (trec export --out)")
    parser.add_argument("--model-root", required=True, metavar="DIR", help="model root (created on first publish)")
    parser.add_argument("--name", help="version name (default: the next v0001, v0002, ...)")
    parser.add_argument("--current", action="store_true", help="also make the new version current")
    parser.add_argument("--set-current", metavar="NAME", help="make the published version NAME current")
    parser.add_argument("--list", action="store_true", help="list the published versions")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.serving.versions import publish, set_current, versions

    actions = [flag for flag, given in (("EXPORT", args.export is not None), ("--set-current", args.set_current),
                                        ("--list", args.list)) if given]
    if len(actions) != 1:
        raise TrecError(f"trec publish: give exactly one of EXPORT, --set-current NAME or --list"
                        f"{', not ' + ' and '.join(actions) if actions else ''}")
    if args.export is None and (args.name is not None or args.current):
        raise TrecError("trec publish: --name and --current go with EXPORT")
    root = args.model_root
    if args.list:
        _print_table(versions(root))
    elif args.set_current:
        version = set_current(root, args.set_current)
        print(f"current {version.name} (bundle {version.bundle_version}) in {root}")
    else:
        version = publish(args.export, root, args.name, make_current=args.current)
        print(f"published {version.name} (bundle {version.bundle_version}) in {root}"
              f"{', current' if args.current else ''}")
    return 0


def _print_table(found: list) -> None:
    rows = [("", "name", "bundle", "published")]
    rows += [("*" if v.is_current else "", v.name, v.bundle_version, v.provenance["published"]) for v in found]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
