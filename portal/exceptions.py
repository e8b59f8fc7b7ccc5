"""The API's one error format, for every error the API returns:

    {"error": {"code": "not_found", "message": "Unknown meter METER-X", "field": "meterNo", "details": null}}

`code` is machine-readable and stable; `message` is for people; `field` names the request field
at fault (camelCase, as the client sent it), or null; `details` carries per-field messages for
validation errors (`{"field": ["message", …]}`) and `retryAfter` (seconds) for throttling.
Service errors (core.errors.DomainError) keep their code and their HTTP status.
"""

import re

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from core.errors import DomainError


def camelize(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda match: match.group(1).upper(), name)


def error_body(code: str, message: str, *, field: str | None = None, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field, "details": details}}


def _api_field(view, field: str | None) -> str | None:
    """Services name fields as Python does (`units_kwh`); views may map them to the API's names."""
    if field is None:
        return None
    names = getattr(view, "error_field_names", {})
    return names.get(field, camelize(field))


def _flatten(detail, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested validation detail as {"field" or "field.sub": [messages]}."""
    if isinstance(detail, dict):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(detail, list) and any(isinstance(item, dict | list) for item in detail):
        flat = {}
        for index, item in enumerate(detail):
            flat.update(_flatten(item, f"{prefix}[{index}]" if prefix else f"[{index}]"))
        return flat
    items = detail if isinstance(detail, list) else [detail]
    return {prefix or "nonFieldErrors": [str(item) for item in items]}


def _validation_error(exc: exceptions.ValidationError) -> dict:
    details = _flatten(exc.detail)
    field, messages = next(iter(details.items()))
    codes = exc.get_codes()
    code = "invalid"
    if isinstance(codes, dict) and codes:
        first = next(iter(codes.values()))
        code = first[0] if isinstance(first, list) and first and isinstance(first[0], str) else code
    message = messages[0] if messages else "Invalid input"
    if field == "nonFieldErrors":
        field = None
    else:
        message = f"{field}: {message}"
    return error_body(code, message, field=field, details=details)


def api_exception_handler(exc, context):
    view = context.get("view")
    if isinstance(exc, DomainError):
        body = error_body(exc.code, exc.message, field=_api_field(view, exc.field))
        return Response(body, status=exc.http_status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # an unexpected exception: a bug, reported as a 500 by Django
    if isinstance(exc, exceptions.ValidationError):
        response.data = _validation_error(exc)
        return response
    code = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
    if not isinstance(code, str):
        code = "error"
    details = None
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        details = {"retryAfter": int(exc.wait + 0.999)}
    message = str(exc.detail) if isinstance(exc, exceptions.APIException) else "Error"
    response.data = error_body(code, message, details=details)
    return response
