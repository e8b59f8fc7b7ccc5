"""Pieces of the REST API that every app's `api.py` and `serializers.py` use.

The error shape (`portal.exceptions` writes it, these serializers document it), the
Idempotency-Key header, the service-field → API-field names, and the field types that keep
accounting values exact on the way in.
"""

from drf_spectacular.utils import OpenApiParameter
from rest_framework import permissions, serializers

from core.errors import InvalidInput
from core.rules import IDEMPOTENCY_KEY_HELP, IDEMPOTENCY_KEY_PATTERN, KES_PLACES, KWH_PLACES, valid_idempotency_key

# DecimalField arguments for the two units of the API (the database columns' precision).
KWH_FIELD = {"max_digits": 18, "decimal_places": KWH_PLACES}
KES_FIELD = {"max_digits": 14, "decimal_places": KES_PLACES}

IDEMPOTENCY_KEY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="Optional. A retry with the same key returns the first result instead of doing it twice.",
    pattern=f"^{IDEMPOTENCY_KEY_PATTERN}$",
)

# Service field names → the names the API uses for them.
ERROR_FIELD_NAMES = {"meter_no": "meterNo", "units_kwh": "units", "amount_kes": "amount", "idempotency_key": "Idempotency-Key"}


def idempotency_key_from(request) -> str | None:
    """The client's Idempotency-Key header, or None if absent; InvalidInput if malformed."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not valid_idempotency_key(key):
        raise InvalidInput(f"Idempotency-Key must be {IDEMPOTENCY_KEY_HELP}", field="idempotency_key")
    return key


class Text(serializers.CharField):
    """A string field that takes only JSON strings (DRF's CharField also takes numbers)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class DecimalText(serializers.DecimalField):
    """A decimal given as a JSON string, as the API returns it: a JSON number would pass through
    binary floating point in most clients, and accounting values must stay exact."""

    default_error_messages = {"not_a_string": "Send decimal numbers as strings, e.g. \"12.50\""}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


# The API's one error format.
class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, machine-readable: invalid, not_found, conflict, throttled, …")
    message = serializers.CharField(help_text="For people")
    field = serializers.CharField(allow_null=True, help_text="The request field at fault (camelCase), or null")
    details = serializers.DictField(
        allow_null=True,
        help_text="Per-field messages for validation errors ({field: [message]}); retryAfter (s) when throttled",
    )


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()


def staff_may(user, permission: str) -> bool:
    return bool(user and user.is_authenticated and user.is_staff and user.has_perm(permission))


class StaffPermission(permissions.BasePermission):
    """Staff operations by role: a view names the Django permission each HTTP method needs in
    `staff_permissions` ({"POST": "meters.adjust_balance"}; portal's staff-roles migration gives
    them to groups). Methods it does not name are left to the view's other permission classes.
    Views of one object (a meter) check it on the object, after the view found it for the
    caller, so someone else's meter stays a 404; collections check it up front."""

    message = "Your staff role does not allow this"

    def _needed(self, request, view) -> str | None:
        return getattr(view, "staff_permissions", {}).get(request.method)

    def has_permission(self, request, view) -> bool:
        if getattr(view, "staff_permission_on_object", False):
            return True
        needed = self._needed(request, view)
        return needed is None or staff_may(request.user, needed)

    def has_object_permission(self, request, view, obj) -> bool:
        needed = self._needed(request, view)
        return needed is None or staff_may(request.user, needed)
