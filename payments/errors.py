"""Payment errors. They are core.errors.DomainError subclasses, so views and the API turn them
into the project's one error format (code, message, field, HTTP status)."""

from core.errors import DomainError


class MpesaUnavailable(DomainError):
    """Daraja could not be reached or was busy: trying again later may work."""

    code = "mpesa_unavailable"
    http_status = 503


class MpesaRefused(DomainError):
    """Daraja refused the request itself (e.g. an invalid phone number for M-Pesa)."""

    code = "mpesa_refused"
    http_status = 502
