"""The errors the CLI turns into a single `error: ...` line: bad input, wrong model, unusable option."""


class KvcError(Exception):
    """A problem the user can fix; the message is one line and says what to do. The CLI exits 1."""


class UsageError(KvcError):
    """An option value or combination the command line itself rules out, whatever the files and the model: out of
    range, unknown, or in conflict with another option. The CLI exits 2, as for typer's own usage errors."""
