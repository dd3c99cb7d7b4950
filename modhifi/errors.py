"""The one exception type for bad input: its message is a single line naming the problem and the fix."""


class UserError(ValueError):
    """Bad input from a user (a path, a checkpoint, an option); the CLI prints it and exits 2."""


def first_line(error: BaseException) -> str:
    """The first line of a dependency's error message (its type where it has none), to quote in a
    UserError's one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
