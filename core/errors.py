"""Errors that services raise. Views and the API turn them into one documented error format.

They carry a machine-readable `code`, a message for people and, where it applies, the field.
"""


class DomainError(Exception):
    code = "invalid"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class InvalidInput(DomainError):
    code = "invalid"
    http_status = 400


class NotFound(DomainError):
    code = "not_found"
    http_status = 404


class Conflict(DomainError):
    code = "conflict"
    http_status = 409
