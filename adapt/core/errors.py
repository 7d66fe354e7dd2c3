"""The one error type users see: a clear, one-line message and a non-zero exit."""


class AdaptError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
