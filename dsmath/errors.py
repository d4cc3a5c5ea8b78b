"""Errors a user can cause and fix. The CLI prints them as one line, without a stack trace."""


class UserError(Exception):
    """Bad input, a missing file, an impossible request: the message says what to do."""


class ConfigError(ValueError):
    """A user mistake in a config file or override: the message is one actionable line."""
