"""The user-facing error of bad configuration, below every other module so that all can raise it."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""
