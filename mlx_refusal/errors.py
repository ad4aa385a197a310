"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
