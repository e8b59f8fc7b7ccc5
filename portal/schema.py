"""OpenAPI generation: every operation documents the error responses it can give, in the one
error format (portal.exceptions), so that clients and the schemathesis run can rely on them."""

from drf_spectacular.openapi import AutoSchema
from rest_framework.permissions import AllowAny

from core.api import ErrorSerializer

ERROR_DESCRIPTIONS = {
    "400": "Invalid input (error.field names the field)",
    "401": "No valid token: send `Authorization: Bearer <token>`",
    "403": "Signed in but not allowed (e.g. staff only)",
    "404": "Not found, or not yours",
    "409": "Conflicts with existing data",
    "415": "Send JSON (Content-Type: application/json)",
    "429": "Too many requests: retry after error.details.retryAfter seconds",
}


class ApiAutoSchema(AutoSchema):
    def _error_codes(self) -> list[str]:
        view = self.view
        has_body = self.method in ("POST", "PUT", "PATCH")
        codes = []
        paginated = self._is_list_view() and self._get_paginator() is not None
        if has_body or paginated or getattr(view, "validates_query", False):
            codes.append("400")
        if view.get_authenticators():
            codes.append("401")
        if not all(isinstance(permission, AllowAny) for permission in view.get_permissions()):
            codes.append("403")
        may_not_find = getattr(view, "may_not_find", ())  # methods that look up an id given in the body
        if "{" in self.path or self.method in may_not_find:
            codes.append("404")
        if has_body:
            codes += ["409", "415"]
        if getattr(view, "throttle_scope", None) or any(
            getattr(throttle, "scope", None) for throttle in view.get_throttles()
        ):
            codes.append("429")
        return codes

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for code in self._error_codes():
            if code not in responses:
                response = self._get_response_for_code(ErrorSerializer, code, direction=direction)
                response["description"] = ERROR_DESCRIPTIONS[code]
                responses[code] = response
        return responses
