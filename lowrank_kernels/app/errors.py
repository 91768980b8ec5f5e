"""The app's one error type."""


class ConfigError(ValueError):
    """A bad user input (config value, flag, file): reported as one line by the CLI, no traceback."""
