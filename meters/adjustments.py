"""Balance adjustments with four eyes: above ADJUSTMENT_APPROVAL_KWH (either sign) an adjustment
is a request that posts only when a second staff member approves it, with both names on the
ledger entry (`actor` the requester, `approved_by` the approver). Smaller ones post at once.

The only writer of meters.AdjustmentRequest. Posting goes through `services.ledger_adjust` with
the request's own idempotency key, under the request's row lock, so an approval clicked twice
(or by two approvers at once) posts once. Who may request or approve is the caller's check
(permissions `meters.adjust_balance` / `meters.approve_adjustment`); that the approver is not the
requester is checked here, and by a database constraint.
"""

import uuid
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.errors import Conflict, InvalidInput, NotFound
from core.rules import KWH_QUANTUM
from meters import services
from meters.models import AdjustmentRequest, AdjustmentStatus


@dataclass(frozen=True)
class AdjustmentOutcome:
    """What asking for an adjustment did: posted it (`posting`), or left it for approval."""

    request: AdjustmentRequest | None
    posting: services.Posting | None

    @property
    def pending(self) -> bool:
        return self.posting is None


def approval_threshold_kwh() -> Decimal:
    return Decimal(str(settings.ADJUSTMENT_APPROVAL_KWH))


def adjustment_request(*, meter_no: str, units_kwh, reason: str, actor, idempotency_key: str | None = None) -> AdjustmentOutcome:
    """Adjust now (up to the threshold) or file a request for a second staff member. A repeated
    idempotency key returns the first outcome."""
    units = services.to_decimal(units_kwh, field="units_kwh", places=KWH_QUANTUM)
    if abs(units) <= approval_threshold_kwh():
        posting = services.ledger_adjust(
            meter_no=meter_no, units_kwh=units, reason=reason, actor=actor, idempotency_key=idempotency_key
        )
        return AdjustmentOutcome(None, posting)
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("An adjustment needs a reason", field="reason")
    if getattr(actor, "pk", None) is None:
        raise InvalidInput("A large adjustment is requested by a staff member", field="actor")
    key = idempotency_key or f"adjust-request:{uuid.uuid4()}"
    with transaction.atomic():
        meter = services.meter_lock(meter_no=meter_no)
        existing = AdjustmentRequest.objects.filter(idempotency_key=key).first()
        if existing is None:
            try:
                with transaction.atomic():
                    existing = AdjustmentRequest.objects.create(
                        meter=meter, units_kwh=units, reason=reason.strip()[:255], requested_by=actor, idempotency_key=key,
                    )
            except IntegrityError:
                existing = AdjustmentRequest.objects.get(idempotency_key=key)
        if existing.meter_id != meter.pk or existing.units_kwh != units:
            raise Conflict(f"Idempotency key {key!r} was already used for a different adjustment", field="idempotency_key")
    return AdjustmentOutcome(existing, _posting_of(existing))


def _posting_of(request: AdjustmentRequest) -> services.Posting | None:
    if request.ledger_entry_id is None:
        return None
    entry = request.ledger_entry
    return services.Posting(entry, False, entry.meter.balance_kwh)


def _locked(request_id: int) -> AdjustmentRequest:
    request = AdjustmentRequest.objects.select_for_update().select_related("meter", "requested_by").filter(pk=request_id).first()
    if request is None:
        raise NotFound(f"Unknown adjustment request {request_id}", field="request_id")
    return request


def adjustment_approve(*, request_id: int, approver, note: str = "") -> AdjustmentOutcome:
    """The second staff member approves: the adjustment posts once, named for both. Approving
    an approved request again returns its posting."""
    with transaction.atomic():
        request = _locked(request_id)
        if request.status == AdjustmentStatus.APPROVED:
            return AdjustmentOutcome(request, _posting_of(request))
        if request.status != AdjustmentStatus.PENDING:
            raise Conflict(f"Adjustment request {request_id} was {request.get_status_display().lower()}", field="request_id")
        if getattr(approver, "pk", None) is None or approver.pk == request.requested_by_id:
            raise Conflict("A second staff member must approve this adjustment, not the one who asked", field="approver")
        posting = services.ledger_adjust(
            meter_no=request.meter.meter_no, units_kwh=request.units_kwh, reason=request.reason,
            actor=request.requested_by, idempotency_key=f"adjust-request:{request.pk}",
            approved_by=approver.get_username(),
        )
        request.status, request.decided_by, request.decided_at = AdjustmentStatus.APPROVED, approver, timezone.now()
        request.decision_note, request.ledger_entry = str(note or "")[:255], posting.entry
        request.save(update_fields=["status", "decided_by", "decided_at", "decision_note", "ledger_entry"])
    return AdjustmentOutcome(request, posting)


def adjustment_reject(*, request_id: int, approver, note: str) -> AdjustmentRequest:
    if not isinstance(note, str) or not note.strip():
        raise InvalidInput("Say why the adjustment is rejected", field="note")
    with transaction.atomic():
        request = _locked(request_id)
        if request.status != AdjustmentStatus.PENDING:
            raise Conflict(f"Adjustment request {request_id} was {request.get_status_display().lower()}", field="request_id")
        if getattr(approver, "pk", None) is None or approver.pk == request.requested_by_id:
            raise Conflict("A second staff member decides on this adjustment, not the one who asked", field="approver")
        request.status, request.decided_by, request.decided_at = AdjustmentStatus.REJECTED, approver, timezone.now()
        request.decision_note = note.strip()[:255]
        request.save(update_fields=["status", "decided_by", "decided_at", "decision_note"])
    return request
