"""The one exception type for errors a user can cause.

Raise `SsahError` with a single line that names the bad input and the fix. The CLI prints
it without a traceback and exits with status 2; library users can catch it.
"""


class SsahError(Exception):
    """An error caused by user input (a path, a spec, a dataset, a size), not by a bug."""

    exit_code = 2
