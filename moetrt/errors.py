"""The one exception type for errors a user can cause (bad input, missing files, wrong options)."""


class MoetrtError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits with status 1."""
