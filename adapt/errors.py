"""The one error type users see: a clear, one-line message and a non-zero exit."""


class AdaptError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
