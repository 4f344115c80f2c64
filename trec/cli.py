"""The `trec` command line (also `python -m trec`).

Sub-commands live one per module in :mod:`trec.commands`; this file only assembles them and
turns a :class:`~trec.errors.TrecError` into one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Sequence

from trec import __version__
from trec.errors import TrecError
from trec.launch import LAUNCHER_ENV
from trec.memory import HUGE_PAGES_ENV

# Order is the order `trec --help` lists them in.
_COMMAND_MODULES = (
    "env",
    "config_cmd",
    "data",
    "train",
    "evaluate",
    "export",
    "search",
    "recommend",
    "serve",
    "publish",
    "experiments",
    "bench",
)

_DESCRIPTION = """\
trec: train sharded two-tower retrieval and DCN-v2 ranking models with TorchRec,
and export item embeddings into a sharded FAISS index.

typical flow:
  trec data prepare movielens --source ../shared/datasets/ml-100k --out data/ml100k
  torchx run -s local_cwd trec.train -j 1x2 -- \\
      --config movielens_two_tower --data data/ml100k --run-dir runs/tt
  trec export --run-dir runs/tt --out exports/tt
  trec search --index exports/tt --run-dir runs/tt --user 42 -k 10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trec", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"trec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"trec.commands.{name}").register(subparsers)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line (exit 2) like every other user error."""

    def error(self, message: str):
        if len(message) > 300:  # argparse quotes the bad argument, whatever its size
            message = message[:300] + "..."
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank{os.environ.get('RANK', '0')}] " if world > 1 else ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``KEY=VALUE`` pairs count as overrides wherever they stand.

    argparse fills a trailing ``KEY=VALUE ...`` positional at its first chance (right after
    ``trec config show CONFIG``, or empty), so pairs given after a later option come back as
    unrecognised; for a command that takes overrides they are overrides all the same, in order.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


# Failures of the file system that a user causes (a full disk, a read-only or wrong output path):
# reported as one line naming the path, like a TrecError. Anything else is a bug and keeps its traceback.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ELOOP}
_EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE (`yes | head`)


def run_cli() -> None:
    """The process entry point (``trec``, ``python -m trec``): :func:`main`, then exit with its status.

    After a user error (status 2) the process ends with ``os._exit`` once its output is flushed: a
    failed command can leave a native thread behind (an Arrow read-ahead thread of the file it was
    reading), and the interpreter's teardown racing that thread ended about one failed prepare in
    ten in SIGABRT ("terminate called without an active exception") instead of exit 2. Nothing is
    left to clean up by then: the command's context managers ran while the error unwound."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")  # before anything imports torch: see HUGE_PAGES_ENV
    status = main()
    if status == 2:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outcome = _run(args)
    if isinstance(outcome, int):
        return outcome
    # The failed command's frames are gone now; collect what they left in reference cycles
    # (a suspended file reader holds an Arrow read-ahead thread) while the interpreter is whole:
    # left to shutdown, such a thread can outlive Python and end the process in SIGABRT.
    gc.collect()
    return _fail(outcome)


def _run(args: argparse.Namespace) -> int | str:
    """Run the command: its exit status, or the message of a user error (see :func:`_fail`)."""
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return status
    except TrecError as error:
        return str(error)
    except BrokenPipeError:
        _discard_stdout()
        return _EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as error:  # CheckpointException (torch DCP) is a BaseException
        message = user_os_error(error, _output_of(args))
        if message is None:
            raise
        return message


def _fail(message: str) -> int:
    """Report a user error: one ``error:`` line, exit status 2.

    Under torchrun (torchelastic sets TORCHELASTIC_ERROR_FILE) the line also goes to the error file
    the elastic agent reads, without a Python call stack, so the agent's failure summary quotes the
    line instead of asking for a traceback. Only rank 0 prints it then: every rank usually fails the
    same way, and the agent's summary names any other rank's error.
    """
    line = f"{_rank_prefix()}error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        _write_error_file(error_file, line)
    # Under `python -m trec.launch` the launcher prints the first failure's line, once, at the end.
    launcher_prints = bool(error_file) and os.environ.get(LAUNCHER_ENV) == "1"
    if not launcher_prints and (not error_file or os.environ.get("RANK", "0") == "0"):
        print(line, file=sys.stderr)
    return 2


def _write_error_file(path: str, line: str) -> None:
    """torchelastic's error-file format (``ErrorHandler.record_exception``), with the one line as the message."""
    payload = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(payload, handle)
    except OSError:
        pass  # the line is still printed; the agent then reports the exit status alone


def _discard_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it again at exit, which would raise BrokenPipeError once more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _output_of(args: argparse.Namespace) -> str | None:
    for name in ("out", "run_dir"):
        if getattr(args, name, None):
            return str(getattr(args, name))
    return None


def user_os_error(error: BaseException, output: str | None = None) -> str | None:
    """The one-line message for a user-caused file-system failure in ``error`` or what it wraps, else None.

    Looks through exception chains (``raise ... from``) and torch DCP's CheckpointException, which
    carries each rank's exception. ``output`` (the command's --out or --run-dir) is named when the
    error does not name a file (a write(2) that hit a full disk only knows its descriptor).
    """
    for candidate in _causes(error):
        if isinstance(candidate, FileExistsError) and candidate.errno is None:
            return str(candidate)
        if isinstance(candidate, OSError) and candidate.errno in _USER_ERRNOS:
            return _describe_os_error(candidate, output)
        if _is_torch_write_failure(candidate) and output and _nearly_full(output):
            return _describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), output)
    return None


def _is_torch_write_failure(error: BaseException) -> bool:
    """torch.save's zip writer ignores a short write and fails later with a RuntimeError from
    inline_container.cc ("unexpected pos ..."), not an OSError: the errno is lost."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text)


def _nearly_full(output: str, free_bytes: int = 16 << 20) -> bool:
    """Whether the file system that holds ``output`` (or its nearest existing parent) is out of space."""
    path = os.path.abspath(output)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free < free_bytes
    except OSError:
        return False


def _causes(error: BaseException, depth: int = 0):
    if error is None or depth > 10:
        return
    yield error
    for _, (inner, _trace) in sorted(getattr(error, "failures", {}).items()) if _is_checkpoint_error(error) else ():
        yield from _causes(inner, depth + 1)
    yield from _causes(error.__cause__ or error.__context__, depth + 1)


def _is_checkpoint_error(error: BaseException) -> bool:
    return type(error).__name__ == "CheckpointException" and isinstance(getattr(error, "failures", None), dict)


def _describe_os_error(error: OSError, output: str | None) -> str:
    reason = os.strerror(error.errno).lower()
    if error.errno == errno.EEXIST and error.filename is not None and not os.path.isdir(error.filename):
        reason = "a file is in the way of a directory"  # mkdir(parents=True) met a file on the path
    if error.filename is not None:
        where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    else:
        where = f"writing {output}" if output else "writing output"
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "choose a writable location", errno.EACCES: "choose a location you can write to",
            errno.EPERM: "choose a location you can write to"}.get(error.errno)
    return f"{where}: {reason}" + (f" ({hint})" if hint else "")


if __name__ == "__main__":
    raise SystemExit(main())
