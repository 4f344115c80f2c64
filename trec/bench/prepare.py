"""`trec bench prepare`: `trec data prepare synthetic` time and peak memory as interactions grow.

Each size runs `trec data prepare synthetic` as its own process with the same users and items
(``--users``, ``--items``), so growth comes from the rows alone. Wall time comes from the clock,
peak RSS from ``os.wait4`` (the process's ``ru_maxrss``, what ``/usr/bin/time -v`` reports); the
resident memory is also sampled from ``/proc`` while it runs and attributed to the pass that was
running (the prepare job logs each pass as it ends), which shows where memory goes.

A size whose time, projected from the sizes already measured, exceeds ``--budget-s`` is replaced
by the largest of size/3.3 and size/10 that fits (100M → 30M → 10M), and the output says so.
The last two sizes give the projection to ``--project`` interactions: time and peak RSS each
extended along the line through them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trec.bench.scale import parse_count, parse_counts
from trec.errors import TrecError
from trec.io import atomic_write_json
from trec.memory import maxrss_bytes

_PASS_LINE = re.compile(r"^\s+(\w+)\s+([\d.]+) s$")  # "  stage       23.25 s", logged as each pass ends
_FALLBACKS = (1.0, 0.3, 0.1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", default="10M,100M",
                        help="synthetic interactions per run, comma-separated, k/M suffixes (default 10M,100M)")
    parser.add_argument("--users", default="1M", help="synthetic users, the same at every size (default 1M)")
    parser.add_argument("--items", default="200k", help="synthetic items, the same at every size (default 200k)")
    parser.add_argument("--project", default="1B", help="interactions to project time and memory to (default 1B)")
    parser.add_argument("--budget-s", type=float, default=900,
                        help="largest projected seconds for one size before a smaller one is measured (default 900)")
    parser.add_argument("--scratch", metavar="DIR", help="where the datasets are written, then deleted "
                        "(default: a temporary directory under data/)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="FLAG=VALUE",
                        help="extra `trec data prepare` flag, e.g. --set history-max-len=20 (repeatable)")


def _prepare_command(out: Path, interactions: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "trec", "data", "prepare", "synthetic", "--out", str(out), "--overwrite",
               "--interactions", str(interactions), "--users", str(parse_count(args.users)),
               "--items", str(parse_count(args.items)), "--seed", "0"]
    for option in args.options:
        flag, sep, value = option.partition("=")
        if not sep:
            raise TrecError(f"--set '{option}': expected FLAG=VALUE, e.g. history-max-len=20")
        command += [f"--{flag.lstrip('-')}", value]
    return command


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_prepare(out: Path, interactions: int, args: argparse.Namespace) -> dict:
    """Runs one prepare; wall seconds, peak RSS, and each pass's seconds and sampled peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(_prepare_command(out, interactions, args), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    passes: dict[str, dict] = {}
    current = {"peak": 0, "last": 0}
    done = threading.Event()

    def sample() -> None:  # 0.2 s is fine enough: each pass of a large prepare runs for seconds
        while not done.wait(0.2):
            current["last"] = _rss_bytes(process.pid) or current["last"]
            current["peak"] = max(current["peak"], current["last"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        match = _PASS_LINE.match(line.rstrip())
        if match:
            passes[match.group(1)] = {"seconds": float(match.group(2)), "sampled_peak_rss_bytes": current["peak"]}
            current["peak"] = current["last"]  # a pass shorter than one sample still shows the memory it ran in
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise TrecError(f"trec data prepare ({interactions:,} interactions) failed with status {process.returncode}: "
                        f"{lines[-1] if lines else 'no output'}")
    return {"interactions": interactions, "seconds": seconds, "peak_rss_bytes": maxrss_bytes(usage.ru_maxrss),
            "passes": passes}


def _fitting_size(requested: int, measured: list[dict], budget: float) -> int:
    """``requested``, or the largest fallback whose time, linear in rows from the last measurement, fits."""
    if not measured:
        return requested
    per_row = measured[-1]["seconds"] / measured[-1]["interactions"]
    for factor in _FALLBACKS:
        size = int(requested * factor)
        if size * per_row <= budget:
            return size
    return int(requested * _FALLBACKS[-1])


def project(measured: list[dict], target: int) -> dict:
    """Time and peak RSS at ``target`` along the line through the last two sizes (never below the last:
    a noisy pair of small sizes must not project a shrinking cost)."""
    if len(measured) < 2:
        return {}
    low, high = measured[-2], measured[-1]
    span = high["interactions"] - low["interactions"]
    if span <= 0:
        return {}

    def extend(key: str) -> float:
        slope = (high[key] - low[key]) / span
        return max(high[key] + slope * (target - high["interactions"]), high[key])

    return {"interactions": target, "seconds": extend("seconds"), "peak_rss_bytes": extend("peak_rss_bytes"),
            "rss_bytes_per_extra_interaction": (high["peak_rss_bytes"] - low["peak_rss_bytes"]) / span}


def run(args: argparse.Namespace) -> int:
    sizes = parse_counts(args.interactions)
    target = parse_count(args.project)
    scratch_root = Path(args.scratch or "data")
    scratch_root.mkdir(parents=True, exist_ok=True)
    measured, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=scratch_root) as scratch:
        for requested in sizes:
            size = _fitting_size(requested, measured, args.budget_s)
            if size != requested:
                notes.append(f"{requested:,} interactions projected over {args.budget_s:.0f} s: measured {size:,} instead")
                print(notes[-1], flush=True)
            out = Path(scratch) / f"syn-{size}"
            measured.append(measure_prepare(out, size, args))
            shutil.rmtree(out, ignore_errors=True)
            print(f"prepared {size:,} interactions in {measured[-1]['seconds']:.1f} s", flush=True)
    report = build_report(measured, project(measured, target), notes, args)
    print(report["table"])
    if args.json:
        atomic_write_json(Path(args.json), {k: v for k, v in report.items() if k != "table"})
    return 0


def _pass_cell(figure: dict, name: str) -> str:
    """'seconds / peak GiB' of one pass of one size, '-' where the pass did not run."""
    if name not in figure["passes"]:
        return "-"
    one = figure["passes"][name]
    return f"{one['seconds']:.1f} / {one['sampled_peak_rss_bytes'] / 2**30:.2f}"


def build_report(measured: list[dict], projection: dict, notes: list[str], args: argparse.Namespace) -> dict:
    names = list(dict.fromkeys(name for figure in measured for name in figure["passes"]))
    lines = [f"{'interactions':>14} {'wall s':>8} {'peak RSS GiB':>13}   " + "  ".join(f"{n} s / GiB" for n in names)]
    for figure in measured:
        lines.append(f"{figure['interactions']:>14,} {figure['seconds']:>8.1f} {figure['peak_rss_bytes'] / 2**30:>13.2f}   "
                     + "  ".join(_pass_cell(figure, name) for name in names))
    if projection:
        per_row = projection["rss_bytes_per_extra_interaction"]
        lines.append(f"{projection['interactions']:>14,} {projection['seconds']:>8.0f} "
                     f"{projection['peak_rss_bytes'] / 2**30:>13.2f}   projected along the last two sizes "
                     f"({per_row:.2f} bytes of peak RSS per extra interaction)")
    lines += notes
    return {
        "benchmark": "prepare", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "users": parse_count(args.users), "items": parse_count(args.items), "options": args.options,
        "results": measured, "projection": projection, "notes": notes, "table": "\n".join(lines),
    }
