"""Reads of payments. The API and the portal read through these."""

from django.db.models import Q, QuerySet

from core.errors import NotFound
from meters.selectors import balance_acknowledged_since
from payments.models import Payment


def payments_for_user(*, user) -> QuerySet[Payment]:
    """Staff: every payment. A customer: payments for their meters and payments they started."""
    payments = Payment.objects.select_related("meter", "command").order_by("-id")
    if not getattr(user, "is_authenticated", False):
        return payments.none()
    if user.is_staff:
        return payments
    condition = Q(initiated_by=user)
    customer = getattr(user, "customer", None)
    if customer is not None:
        condition |= Q(meter__owner=customer)
    return payments.filter(condition)


def payment_get_for_user(*, user, payment_id) -> Payment:
    """One payment, if the user may see it; NotFound otherwise (ids cannot be probed)."""
    try:
        pk = int(payment_id)
    except (TypeError, ValueError):
        raise NotFound(f"Unknown payment {payment_id}", field="payment_id") from None
    payment = payments_for_user(user=user).filter(pk=pk).first()
    if payment is None:
        raise NotFound(f"Unknown payment {payment_id}", field="payment_id")
    return payment


def payment_delivered_to_meter(payment: Payment) -> bool:
    """Whether the meter has acknowledged a balance that includes this payment's credit.

    Its own command, or any later balance command to the same meter (which carries a balance
    computed after this credit) acknowledged by the meter.
    """
    if payment.command_id is None:
        return False
    return balance_acknowledged_since(meter_id=payment.meter_id, command_id=payment.command_id)
