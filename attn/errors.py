"""Errors that are the user's to fix; commands report them as one line, not a traceback."""


class UserError(Exception):
    """A missing dataset, an unreadable checkpoint, ...: the message names the fix."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field and the fix."""
