"""The meters part of the REST API (/api/v1/): meters, readings, statements, staff operations
and customers.

Every endpoint that takes a meterNo gets the meter through `meters.selectors.meter_get_for_user`
(the one object-level check: someone else's meter is a 404), then DRF's object permissions decide
what the caller may do with it (`StaffForWrites`: owners read, staff also write). Writes call
the same services as the admin. Views are thin: parse, call a service or selector, shape.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ERROR_FIELD_NAMES, IDEMPOTENCY_KEY_HEADER, StaffPermission, idempotency_key_from
from core.errors import InvalidInput
from core.rules import KWH_QUANTUM
from meters import adjustments, services
from meters.models import AdjustmentRequest, AdjustmentStatus, Reading, Tariff
from meters.selectors import ledger_statement, meter_get_for_user, meters_for_user
from meters.serializers import (
    AdjustmentDecisionSerializer,
    AdjustmentResultSerializer,
    AdjustmentSerializer,
    CommandSerializer,
    CredentialIssuedSerializer,
    CustomerCreateSerializer,
    CustomerSerializer,
    MeterCreateSerializer,
    MeterSerializer,
    MeterUpdateSerializer,
    PendingAdjustmentSerializer,
    ReadingsQuerySerializer,
    ReadingsSerializer,
    RelaySerializer,
    StatementEntrySerializer,
)


class StaffForWrites(permissions.BasePermission):
    """Object permission on a meter the caller can see: reading is for its owner and staff,
    everything else for staff only (and then for the staff role the view names: StaffPermission)."""

    message = "Only utility staff may do this"

    def has_object_permission(self, request, view, obj) -> bool:
        return request.method in permissions.SAFE_METHODS or bool(request.user and request.user.is_staff)


class StaffOnlyForWrites(permissions.BasePermission):
    """Collections: anyone signed in may list (what they may see); only staff may create."""

    message = "Only utility staff may do this"

    def has_permission(self, request, view) -> bool:
        return request.method in permissions.SAFE_METHODS or bool(request.user and request.user.is_staff)


class MeterView(APIView):
    # The base of every view under meters/{meterNo}/ (a comment, not a docstring: DRF would
    # publish a docstring as each operation's description).

    permission_classes = [permissions.IsAuthenticated, StaffForWrites, StaffPermission]
    staff_permission_on_object = True
    error_field_names = ERROR_FIELD_NAMES

    def get_meter(self):
        meter = meter_get_for_user(user=self.request.user, meter_no=self.kwargs["meterNo"])
        self.check_object_permissions(self.request, meter)
        return meter


def _default_tariff() -> Tariff:
    tariff = Tariff.objects.filter(effective_from__lte=timezone.now()).order_by("-effective_from", "-id").first()
    if tariff is None:
        raise InvalidInput("No tariff is in effect yet; give one", field="tariff")
    return tariff


class MeterListView(generics.GenericAPIView):
    permission_classes = [permissions.IsAuthenticated, StaffOnlyForWrites, StaffPermission]
    staff_permissions = {"POST": "meters.add_meter"}
    serializer_class = MeterSerializer
    error_field_names = ERROR_FIELD_NAMES

    def get_queryset(self):
        return meters_for_user(user=self.request.user)

    @extend_schema(summary="Meters you can see (yours; staff see all)", responses=MeterSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(MeterSerializer(page, many=True).data)

    @extend_schema(summary="Provision a meter (staff)", request=MeterCreateSerializer, responses={201: MeterSerializer})
    def post(self, request):
        data = MeterCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        meter = services.meter_provision(
            meter_no=values["meterNo"], owner=values["owner"], tariff=values.get("tariff") or _default_tariff(),
            actor=request.user.get_username(),
        )
        body = MeterSerializer(meter_get_for_user(user=request.user, meter_no=meter.meter_no)).data
        # The meter's broker password, this once: it is stored only as the broker's hash.
        body["mqtt"] = {"username": meter.meter_no, "password": meter.issued_password}
        return Response(body, status=201)


class MeterDetailView(MeterView):
    staff_permissions = {"PATCH": "meters.change_meter"}

    @extend_schema(summary="One meter", responses=MeterSerializer)
    def get(self, request, meterNo):
        return Response(MeterSerializer(self.get_meter()).data)

    @extend_schema(summary="Change a meter's owner or tariff (staff)", request=MeterUpdateSerializer, responses=MeterSerializer)
    def patch(self, request, meterNo):
        meter = self.get_meter()
        data = MeterUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        services.meter_update(meter_no=meter.meter_no, **data.validated_data)
        return Response(MeterSerializer(meter_get_for_user(user=request.user, meter_no=meter.meter_no)).data)


class StatementView(MeterView, generics.GenericAPIView):
    serializer_class = StatementEntrySerializer

    @extend_schema(
        summary="Ledger entries, newest first, with the balance after each", responses=StatementEntrySerializer(many=True)
    )
    def get(self, request, meterNo):
        # Limit/offset pagination applies LIMIT/OFFSET after the running-balance window is computed
        # over all of the meter's entries; a keyset filter (id < x) would be applied before it and
        # restart the running sum, so cursor pagination must not be used here.
        page = self.paginate_queryset(ledger_statement(meter=self.get_meter()))
        return self.get_paginated_response(StatementEntrySerializer(page, many=True).data)


# A bound on the buckets one request can ask for, so that a request cannot make the server
# build an unbounded response (the list is complete, not paginated).
MAX_SPAN = {"hour": timedelta(days=31), "day": timedelta(days=366)}
DEFAULT_SPAN = {"hour": timedelta(days=1), "day": timedelta(days=30)}
STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


def _bucket_start(moment: datetime, bucket: str) -> datetime:
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def readings_by_bucket(*, meter, start: datetime, end: datetime, bucket: str) -> list[dict]:
    """Consumption per hour or day (UTC) in [start, end), every bucket present (zeros included).

    Duplicate reports (the same report delivered twice) are left out of `units`; `debited` is what
    the ledger charged, which is zero for duplicates anyway.
    """
    trunc = TruncHour if bucket == "hour" else TruncDay
    rows = (
        Reading.objects.filter(meter=meter, reading_at__gte=start, reading_at__lt=end)
        .annotate(slot=trunc("reading_at", tzinfo=UTC))
        .values("slot")
        .annotate(
            units=Sum("units_consumed_kwh", filter=Q(is_duplicate=False)),
            debited=Sum("debit_kwh"),
            reports=Count("id", filter=Q(is_duplicate=False)),
        )
    )
    zero = Decimal("0")
    found = {row["slot"]: row for row in rows}
    results = []
    slot = _bucket_start(start, bucket)
    while slot < end:
        row = found.get(slot, {})
        results.append(
            {
                "start": slot,
                # quantized: SQLite (development) sums decimals as doubles.
                "units": Decimal(row.get("units") or zero).quantize(KWH_QUANTUM),
                "debited": Decimal(row.get("debited") or zero).quantize(KWH_QUANTUM),
                "reports": row.get("reports") or 0,
            }
        )
        slot += STEP[bucket]
    return results


class ReadingsView(MeterView):
    validates_query = True

    @extend_schema(
        summary="Consumption over time, per hour or day (UTC)",
        parameters=[ReadingsQuerySerializer],
        responses=ReadingsSerializer,
    )
    def get(self, request, meterNo):
        meter = self.get_meter()
        # A plain dict, not the QueryDict: DRF treats an empty query value (`?bucket=`) as absent.
        query = ReadingsQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        bucket = query.validated_data["bucket"]
        end = query.validated_data.get("to") or timezone.now()
        start = query.validated_data.get("from") or end - DEFAULT_SPAN[bucket]
        first_slot = _bucket_start(start, bucket)
        if start >= end:
            raise serializers.ValidationError({"from": ["from must be before to"]})
        if end - first_slot > MAX_SPAN[bucket]:
            limit = f"At most {MAX_SPAN[bucket].days} days per request with bucket={bucket}"
            raise serializers.ValidationError({"from": [limit]})
        results = readings_by_bucket(meter=meter, start=start, end=end, bucket=bucket)
        total = sum((item["units"] for item in results), Decimal("0"))
        body = {
            "meterNo": meter.meter_no, "bucket": bucket, "start": first_slot, "end": end, "totalUnits": total, "results": results,
        }
        return Response(ReadingsSerializer(body).data)


class AdjustmentView(MeterView):
    staff_permissions = {"POST": "meters.adjust_balance"}

    @extend_schema(
        summary="A ledger adjustment (staff), through the same service as the admin; above ADJUSTMENT_APPROVAL_KWH it "
                "waits for a second staff member (202, see adjustment-requests/)",
        request=AdjustmentSerializer,
        parameters=[IDEMPOTENCY_KEY_HEADER],
        responses={201: AdjustmentResultSerializer, 200: AdjustmentResultSerializer, 202: PendingAdjustmentSerializer},
    )
    def post(self, request, meterNo):
        meter = self.get_meter()
        data = AdjustmentSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = idempotency_key_from(request)
        outcome = adjustments.adjustment_request(
            meter_no=meter.meter_no,
            units_kwh=data.validated_data["units"],
            reason=data.validated_data["reason"],
            actor=request.user,
            # Namespaced per user: ledger keys are global, and one client's key must not
            # collide with another's (or with the M-Pesa and meter keys).
            idempotency_key=f"api-adjust:{request.user.pk}:{key}" if key else None,
        )
        if outcome.pending:
            return Response(PendingAdjustmentSerializer(outcome.request).data, status=status.HTTP_202_ACCEPTED)
        posting = outcome.posting
        body = {"entry": posting.entry, "balance": posting.balance_kwh, "created": posting.created}
        return Response(AdjustmentResultSerializer(body).data, status=201 if posting.created else 200)


class ResyncView(MeterView):
    staff_permissions = {"POST": "meters.resend_balance"}

    @extend_schema(summary="Queue a balance command to the meter (staff)", request=None, responses={202: CommandSerializer})
    def post(self, request, meterNo):
        meter = self.get_meter()
        command = services.meter_command_queue_balance(
            meter_no=meter.meter_no, reason="resync", actor=request.user.get_username()
        )
        return Response(CommandSerializer(command).data, status=status.HTTP_202_ACCEPTED)


class RelayView(MeterView):
    staff_permissions = {"POST": "meters.command_relay"}

    @extend_schema(
        summary="Queue a relay override to the meter (staff)", request=RelaySerializer, responses={202: CommandSerializer}
    )
    def post(self, request, meterNo):
        meter = self.get_meter()
        data = RelaySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        command = services.meter_command_queue_relay(
            meter_no=meter.meter_no,
            state=data.validated_data["state"],
            reason=data.validated_data["reason"],
            actor=request.user.get_username(),
        )
        return Response(CommandSerializer(command).data, status=status.HTTP_202_ACCEPTED)


class CustomerCreateView(APIView):
    permission_classes = [permissions.IsAdminUser, StaffPermission]
    staff_permissions = {"POST": "meters.add_customer"}
    error_field_names = ERROR_FIELD_NAMES

    @extend_schema(
        summary="Create a customer and their user (staff)", request=CustomerCreateSerializer, responses={201: CustomerSerializer}
    )
    def post(self, request):
        data = CustomerCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        customer = services.customer_create(**data.validated_data)
        return Response(CustomerSerializer(customer).data, status=status.HTTP_201_CREATED)


class CredentialView(MeterView):
    staff_permissions = {"POST": "meters.manage_credentials", "DELETE": "meters.manage_credentials"}

    @extend_schema(summary="Issue or rotate the meter's MQTT password (staff): shown this once", request=None,
                   responses={201: CredentialIssuedSerializer})
    def post(self, request, meterNo):
        meter = self.get_meter()
        password = services.meter_credential_issue(meter_no=meter.meter_no, actor=request.user)
        return Response(CredentialIssuedSerializer({"username": meter.meter_no, "password": password}).data, status=201)

    @extend_schema(summary="Revoke the meter's MQTT password (staff): the broker refuses it from its next reload",
                   request=None, responses={204: None})
    def delete(self, request, meterNo):
        services.meter_credential_revoke(meter_no=self.get_meter().meter_no, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AdjustmentRequestListView(generics.GenericAPIView):
    permission_classes = [permissions.IsAdminUser, StaffPermission]
    staff_permissions = {"GET": "meters.view_adjustmentrequest"}
    serializer_class = PendingAdjustmentSerializer

    @extend_schema(summary="Adjustment requests awaiting a second staff member, oldest first (staff)",
                   responses=PendingAdjustmentSerializer(many=True))
    def get(self, request):
        pending = AdjustmentRequest.objects.filter(status=AdjustmentStatus.PENDING).select_related("meter", "requested_by")
        page = self.paginate_queryset(pending.order_by("id"))
        return self.get_paginated_response(PendingAdjustmentSerializer(page, many=True).data)


class AdjustmentDecisionView(APIView):
    permission_classes = [permissions.IsAdminUser, StaffPermission]
    staff_permissions = {"POST": "meters.approve_adjustment"}
    error_field_names = {**ERROR_FIELD_NAMES, "request_id": "id"}
    decision = "approve"

    @extend_schema(summary="Approve (it posts, once) or reject a pending adjustment (a second staff member)",
                   request=AdjustmentDecisionSerializer, responses={200: PendingAdjustmentSerializer})
    def post(self, request, id: int):
        data = AdjustmentDecisionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        note = data.validated_data.get("note", "")
        if self.decision == "approve":
            decided = adjustments.adjustment_approve(request_id=id, approver=request.user, note=note).request
        else:
            decided = adjustments.adjustment_reject(request_id=id, approver=request.user, note=note)
        return Response(PendingAdjustmentSerializer(decided).data)
