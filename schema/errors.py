class ConfigError(ValueError):
    """A user's configuration mistake; the message names the key and the allowed values."""
