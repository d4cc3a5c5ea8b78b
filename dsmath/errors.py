"""Errors a user can cause and fix. The CLI prints them as one line, without a stack trace."""


class UserError(Exception):
    """Bad input, a missing file, an impossible request: the message says what to do."""
