"""The one exception type users see: a message that says what was wrong and where."""


class TrecError(Exception):
    """A user-facing error (bad input, bad config, missing file).

    The CLI prints ``error: <message>`` on one line and exits with status 2, without a
    traceback: the message itself names the file, row, column or key at fault.
    """
