"""The one error type the CLI turns into a single `error: ...` line: bad input, wrong model, unusable option."""


class KvcError(Exception):
    """A problem the user can fix; the message is one line and says what to do."""
