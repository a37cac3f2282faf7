"""Exceptions raysemi raises on purpose, so callers can tell user errors from bugs."""


class RaysemiError(Exception):
    """Base class of raysemi's own errors."""


class DataError(RaysemiError, ValueError):
    """A case, file or field on disk is not what raysemi expects; the message names which."""


class ConfigError(RaysemiError, ValueError):
    """A config file or override is invalid; the message names the field path."""
