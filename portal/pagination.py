"""Pagination for every API list that can grow: limit/offset, at most 200 items a page.

Limit/offset rather than a cursor because the ledger statement's running balance is a window
over all of a meter's entries, which LIMIT/OFFSET leaves intact and a keyset filter would not.
A malformed limit or offset is a 400 (DRF's default silently ignores it), so that a client bug
shows up instead of returning a page the client did not ask for.
"""

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_OFFSET = 10**9


def _bounded_int(raw: str, name: str, minimum: int, maximum: int) -> int:
    if not raw.isascii() or not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise ValidationError({name: [f"Must be a whole number from {minimum} to {maximum}"]})
    return int(raw)


class ApiPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 200

    def get_limit(self, request) -> int:
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        return _bounded_int(raw, self.limit_query_param, 1, self.max_limit)

    def get_offset(self, request) -> int:
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        return _bounded_int(raw, self.offset_query_param, 0, MAX_OFFSET)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, self.max_limit), self.offset_query_param: (0, MAX_OFFSET)}
        for parameter in parameters:
            minimum, maximum = bounds[parameter["name"]]
            parameter["schema"].update({"minimum": minimum, "maximum": maximum})
        return parameters
