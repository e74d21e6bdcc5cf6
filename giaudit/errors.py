"""Errors users can act on. The CLI prints them as one line and exits 2."""


class GiauditError(Exception):
    """Base for errors whose message is meant for the user."""


class ConfigError(GiauditError, ValueError):
    """Bad configuration: the message names the key and says what to do."""


class DataError(GiauditError):
    """A data source is missing or malformed: the message names the file."""


class ThreatModelError(GiauditError):
    """An attack asks for a capability the threat model does not grant."""
