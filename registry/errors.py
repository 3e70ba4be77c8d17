"""Domain errors of the registry, each with a stable code and the field it is about.

The HTTP glue maps the classes to status codes (404, 409, 422, 403); the CLI prints the
message. Messages name fields and states, never a secret value.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base: ``code`` is stable (clients branch on it), ``field`` names the input concerned."""

    code = "registry_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class NotFoundError(RegistryError):
    """No such object for this tenant (another tenant's object is "not found" too)."""

    code = "not_found"


class ConflictError(RegistryError):
    """The object exists already, or is in a state that does not allow the change."""

    code = "conflict"


class InvalidError(RegistryError):
    """A value is well-formed JSON of the right type but not acceptable."""

    code = "invalid_value"


class ForbiddenError(RegistryError):
    """The caller may not do this, whatever the values (four eyes, operator-only fields)."""

    code = "forbidden"
