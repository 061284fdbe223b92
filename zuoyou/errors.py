"""User-facing errors: each names the problem in one line (the CLI prints it without a traceback)."""


class ZuoyouError(Exception):
    """Base class of every error meant for the user rather than for a developer."""


class ConfigError(ZuoyouError):
    """A config.json (or a config argument) that is malformed or unsupported."""


class CheckpointError(ZuoyouError):
    """A folder that is not a checkpoint, or weights that do not match their config."""


class InputError(ZuoyouError, ValueError):
    """Bad user input: an unreadable image, an empty or over-long prompt, a wrong parameter."""
