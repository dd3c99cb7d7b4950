"""The one exception type for bad input: its message is a single line naming the problem and the fix."""


class UserError(ValueError):
    """Bad input from a user (a path, a checkpoint, an option); the CLI prints it and exits 2."""
