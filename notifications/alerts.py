"""The alerts Celery beat runs every minute (`run_alerts`). Each is idempotent: what it tells
is recorded under a key naming the event (notifications.services), so running it again, or
twice at once, tells nobody twice.

- offline: a meter silent for more than three report intervals is marked offline; staff are told
- low balance: the customer, once each time the balance falls below LOW_BALANCE_KWH
- payment credited: the customer is told the units
- commands unacknowledged past COMMAND_ACK_ALERT_S: staff (no PUBACK at all, or an online meter
  that has not acknowledged)
- payments needing review, and payments still "checking" after PAYMENT_CHECKING_ALERT_S: staff
- dead-letter spikes (DEAD_LETTER_SPIKE_COUNT within DEAD_LETTER_SPIKE_WINDOW_S): staff
- register resets awaiting review: staff
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from meters.consumption.silence import meters_mark_silent_offline
from meters.models import CommandStatus, HistoryReview, Meter, MeterCommand, RegisterHistory
from mqtt_worker.models import DeadLetter
from notifications.models import Kind, LowBalanceState
from notifications.services import notify_customer, notify_staff
from payments.models import Payment, PaymentStatus

# Credited payments older than this are not announced (e.g. when alerts are first switched on).
PAYMENT_NOTICE_WINDOW = timedelta(hours=6)
LISTED = 20  # items named in one staff message


def _listing(lines: list[str]) -> str:
    shown = "\n".join(f"- {line}" for line in lines[:LISTED])
    return shown + (f"\n… and {len(lines) - LISTED} more" if len(lines) > LISTED else "")


def alert_meters_offline(now: datetime) -> int:
    silent_since = now - timedelta(seconds=3 * settings.METER_REPORT_INTERVAL_S)
    events = meters_mark_silent_offline(silent_since=silent_since, now=now)
    if not events:
        return 0
    meters = dict(Meter.objects.filter(id__in=[e.meter_id for e in events]).values_list("id", "meter_no"))
    lines = [f"{meters[e.meter_id]}: {e.message}" for e in events]
    return notify_staff(key=f"offline:{events[0].pk}", kind=Kind.METER_OFFLINE,
                        subject=f"{len(events)} meter(s) went offline", body=_listing(lines))


def alert_low_balances(now: datetime) -> int:
    threshold = settings.LOW_BALANCE_KWH
    told = 0
    # Re-arm meters whose balance is back above the threshold (a purchase, an adjustment).
    LowBalanceState.objects.filter(low=True, meter__balance_kwh__gte=threshold).update(low=False, changed_at=now)
    low = (Meter.objects.filter(balance_kwh__lt=threshold, owner__isnull=False)
           .exclude(id__in=LowBalanceState.objects.filter(low=True).values("meter_id"))
           .select_related("owner__user"))
    for meter in low:
        with transaction.atomic():
            state, _ = LowBalanceState.objects.select_for_update().get_or_create(meter=meter)
            if state.low:
                continue
            state.low, state.crossings, state.changed_at = True, state.crossings + 1, now
            state.save()
            balance = meter.balance_kwh.normalize()
            told += notify_customer(
                key=f"low-balance:{meter.meter_no}:{state.crossings}", kind=Kind.LOW_BALANCE, customer=meter.owner,
                meter=meter, subject=f"Low balance on meter {meter.meter_no}",
                body=f"Dear {meter.owner.name}, meter {meter.meter_no} has {balance:f} kWh left. Buy units with M-Pesa "
                     f"(paybill {settings.MPESA_SHORTCODE}, account {meter.meter_no}) to keep the power on.",
                sms=f"Meter {meter.meter_no}: {balance:f} kWh left. Pay to {settings.MPESA_SHORTCODE}, account "
                    f"{meter.meter_no}.",
            )
    return told


def alert_payments_credited(now: datetime) -> int:
    told = 0
    credited = (Payment.objects.filter(status=PaymentStatus.SUCCEEDED, same_money_as__isnull=True, meter__owner__isnull=False,
                                       updated_at__gte=now - PAYMENT_NOTICE_WINDOW)
                .select_related("meter__owner__user").order_by("id"))
    for payment in credited:
        meter = payment.meter
        receipt = f" (M-Pesa {payment.mpesa_receipt})" if payment.mpesa_receipt else ""
        told += notify_customer(
            key=f"payment-credited:{payment.pk}", kind=Kind.PAYMENT_CREDITED, customer=meter.owner, meter=meter,
            subject=f"{payment.units_kwh.normalize():f} kWh credited to meter {meter.meter_no}",
            body=f"Dear {meter.owner.name}, your payment of KES {payment.amount_kes}{receipt} is credited: "
                 f"{payment.units_kwh.normalize():f} kWh on meter {meter.meter_no}.",
            sms=f"KES {payment.amount_kes}{receipt} credited: {payment.units_kwh.normalize():f} kWh on meter {meter.meter_no}.",
        )
    return told


def alert_commands_unacknowledged(now: datetime) -> int:
    stuck = (MeterCommand.objects.filter(issued_at__lt=now - timedelta(seconds=settings.COMMAND_ACK_ALERT_S))
             .filter(Q(status=CommandStatus.QUEUED) | Q(status=CommandStatus.SENT, meter__online=True))
             .select_related("meter").order_by("id"))
    commands = list(stuck[:LISTED + 1])
    if not commands:
        return 0
    newest = stuck.order_by("-id").values_list("id", flat=True).first()
    lines = [f"{c.meter.meter_no}: {c.kind} command {c.cmd_id} ({c.get_status_display()}) since {c.issued_at:%H:%M:%S} UTC"
             for c in commands]
    # Keyed by the newest stuck command: the same stuck set is told once, a new one again.
    return notify_staff(key=f"commands-unacked:{newest}", kind=Kind.COMMANDS_UNACKNOWLEDGED,
                        subject="Meter commands not acknowledged", body=_listing(lines))


def alert_payments_to_review(now: datetime) -> int:
    told = 0
    checking_since = now - timedelta(seconds=settings.PAYMENT_CHECKING_ALERT_S)
    payments = Payment.objects.filter(
        Q(status=PaymentStatus.NEEDS_REVIEW) | Q(status=PaymentStatus.CHECKING, created_at__lt=checking_since)
    ).select_related("meter").order_by("id")
    for payment in payments:
        why = payment.review_reason or ("outcome still unknown" if payment.status == PaymentStatus.CHECKING else "")
        told += notify_staff(
            key=f"payment-{payment.status}:{payment.pk}", kind=Kind.PAYMENT_REVIEW, meter=payment.meter,
            subject=f"Payment {payment.pk} {payment.get_status_display().lower()}",
            body=f"Payment {payment.pk}: KES {payment.amount_kes} for {payment.meter_id and payment.meter.meter_no or 'no meter'}"
                 f" ({payment.get_channel_display()}), {why}. Resolve it in the admin (Payments).",
        )
    return told


def alert_dead_letter_spike(now: datetime) -> int:
    window = settings.DEAD_LETTER_SPIKE_WINDOW_S
    count = DeadLetter.objects.filter(received_at__gt=now - timedelta(seconds=window), received_at__lte=now).count()
    if count < settings.DEAD_LETTER_SPIKE_COUNT:
        return 0
    # One alert per window of time, however long the spike lasts within it.
    bucket = int(now.timestamp()) // window
    reasons = DeadLetter.objects.filter(received_at__gt=now - timedelta(seconds=window)).values_list("reason", flat=True)[:5]
    return notify_staff(key=f"dead-letters:{bucket}", kind=Kind.DEAD_LETTER_SPIKE,
                        subject=f"{count} dead letters in {window // 60} minutes",
                        body=f"The MQTT worker refused {count} messages lately, e.g.:\n{_listing(list(reasons))}")


def alert_register_resets(now: datetime) -> int:
    told = 0
    for history in RegisterHistory.objects.filter(review=HistoryReview.PENDING).select_related("meter").order_by("id"):
        told += notify_staff(
            key=f"register-review:{history.pk}", kind=Kind.REGISTER_RESET, meter=history.meter,
            subject=f"Register reset on {history.meter.meter_no} awaits review",
            body=f"Meter {history.meter.meter_no}: {history.reason or 'a suspected register reset'}. Confirm it or merge "
                 "it back in the admin (Register histories).",
        )
    return told


ALERTS = {
    "offline": alert_meters_offline,
    "low_balance": alert_low_balances,
    "payment_credited": alert_payments_credited,
    "commands_unacknowledged": alert_commands_unacknowledged,
    "payments_review": alert_payments_to_review,
    "dead_letter_spike": alert_dead_letter_spike,
    "register_resets": alert_register_resets,
}


def run_alerts(*, now: datetime | None = None) -> dict[str, int]:
    """Every alert once; returns how many notifications each recorded."""
    now = now or timezone.now()
    return {name: check(now) for name, check in ALERTS.items()}
