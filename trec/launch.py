"""`python -m trec.launch TORCHRUN_ARGS...`: torchrun whose failure on a user error ends in one line.

torchrun lets the elastic agent's ``ChildFailedError`` escape its ``main``, so a worker's one-line
``error: ...`` is followed by the launcher's own traceback and a failure table (about forty
lines). This runs torchrun's own ``run`` with the same arguments. Workers write the line into
torchelastic's error file (see :func:`trec.cli._fail`); when the first failure's message is such
a line, it is printed once, as the last line, and the launcher exits with the worker's status
(2). Any other failure (a bug: its error file holds a traceback, or a signal) is reported as
torchrun reports it.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

# Set for the workers: the launcher prints their error line, so no rank needs to.
LAUNCHER_ENV = "TREC_LAUNCHER"
_USER_ERROR = re.compile(r"^(\[rank\d+\] )?error: [^\n]*$")


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHER_ENV] = "1"  # inherited by the workers the agent starts
    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        if failure.exitcode == 2 and _USER_ERROR.match(message):
            print(message, file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
