"""The one exception users see.

Every expected failure (bad file, bad flag, overflow) is raised as `CopeError`
with a single line that names the file and the fix; the CLI prints it and
exits with code 2. Anything else is a bug and keeps its traceback.
"""


class CopeError(Exception):
    """A user-facing failure: one line, naming the file and what to do."""

    exit_code = 2


class TooFewItems(CopeError):
    """A history too small to learn a voice from: the user adds writing; `cope eval` skips the user."""
