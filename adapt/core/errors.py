"""The one error type users see: a clear, one-line message and a non-zero exit; and the quiet stop of a
process whose run failed in another process, which reports why."""


class AdaptError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Stopped(SystemExit):
    """This process of a multi-process run stops because another one failed, and that one reports why:
    one `stopped: ...` line (not a second `error:` line) and exit code 1. A SystemExit, so it passes the
    command's error boundary as it is."""

    def __init__(self, why: str) -> None:
        super().__init__(f"stopped: {why}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
