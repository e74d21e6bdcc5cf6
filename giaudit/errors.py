"""Errors users can act on. The CLI prints them as one line and exits 2."""


class GiauditError(Exception):
    """Base for errors whose message is meant for the user."""


class ConfigError(GiauditError, ValueError):
    """Bad configuration: the message names the key and says what to do."""


class DataError(GiauditError):
    """A data source is missing or malformed: the message names the file."""


class ThreatModelError(GiauditError):
    """An attack asks for a capability the threat model does not grant."""


class ParamError(ConfigError):
    """Raised by a constructor about one of its own arguments; the registry adds the table's path."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class ModelRefused(GiauditError):
    """A client refused the global model the server sent (model_validation): it sent no update.

    Not a failure of the audit: the record of an active attack stopped this way is "blocked"."""
