"""Notifications: recorded first, delivered after, each exactly once per event and recipient.

`notify_customer` / `notify_staff` record one row per channel and recipient under the event's
key (a unique constraint: an alert that runs again records nothing new); `notifications_deliver`
sends what is due, outside any transaction, and records the outcome: sent, retried later with a
growing pause, or failed once NOTIFY_MAX_ATTEMPTS tries have failed (or at once when the gateway
says the number can never be reached). The only writer of notifications.Notification.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from core import metrics
from notifications.models import Audience, Channel, Notification, Status
from notifications.sms import SmsError, sms_enabled, sms_send

logger = logging.getLogger("notifications")

RETRY_FIRST_S = 30
# A claimed notification is not claimed again for this long (a crash mid-send retries it then).
CLAIM_LEASE = timedelta(minutes=5)


def _record(rows: list[Notification]) -> int:
    """Record the notifications not recorded before (same key, channel and recipient); returns
    how many are new. A concurrent run that records the same one loses on the unique constraint."""
    created = 0
    for row in rows:
        try:
            with transaction.atomic():
                _, new = Notification.objects.get_or_create(
                    key=row.key, channel=row.channel, recipient=row.recipient,
                    defaults={"kind": row.kind, "audience": row.audience, "meter": row.meter, "subject": row.subject,
                              "body": row.body},
                )
        except IntegrityError:
            new = False
        created += new
    return created


def notify_customer(*, key: str, kind: str, customer, meter, subject: str, body: str, sms: str | None = None) -> int:
    """A customer is told by e-mail (if they have an address) and by SMS (their M-Pesa number)."""
    rows = []
    email = getattr(customer.user, "email", "")
    if email:
        rows.append(Notification(key=key, kind=kind, audience=Audience.CUSTOMER, channel=Channel.EMAIL, recipient=email,
                                 meter=meter, subject=subject, body=body))
    if sms_enabled() and customer.phone:
        rows.append(Notification(key=key, kind=kind, audience=Audience.CUSTOMER, channel=Channel.SMS,
                                 recipient=customer.phone, meter=meter, subject=subject, body=(sms or body)[:480]))
    return _record(rows)


def staff_recipients() -> list[str]:
    if settings.STAFF_ALERT_EMAILS:
        return list(settings.STAFF_ALERT_EMAILS)
    users = get_user_model().objects.filter(is_active=True, is_staff=True).exclude(email="")
    return sorted(set(users.values_list("email", flat=True)))


def notify_staff(*, key: str, kind: str, subject: str, body: str, meter=None) -> int:
    rows = [
        Notification(key=key, kind=kind, audience=Audience.STAFF, channel=Channel.EMAIL, recipient=email, meter=meter,
                     subject=subject, body=body)
        for email in staff_recipients()
    ]
    created = _record(rows)
    if created:
        metrics.ALERTS.labels(kind).inc()
    return created


def _send(notification: Notification) -> str:
    if notification.channel == Channel.SMS:
        return sms_send(phone=notification.recipient, message=notification.body)
    send_mail(notification.subject, notification.body, settings.DEFAULT_FROM_EMAIL, [notification.recipient])
    return ""


def notifications_deliver(*, now: datetime | None = None, limit: int = 100) -> dict:
    """Send the notifications that are due; returns how many were sent, will be retried, failed."""
    now = now or timezone.now()
    counts = {"sent": 0, "retrying": 0, "failed": 0}
    due = (Notification.objects.filter(status__in=[Status.PENDING, Status.RETRYING], next_attempt_at__lte=now)
           .order_by("next_attempt_at", "id").values_list("id", "attempts")[:limit])
    for notification_id, attempts in list(due):
        # Claimed by moving its next attempt out of reach, conditionally: one sender per row.
        claimed = Notification.objects.filter(id=notification_id, attempts=attempts).filter(
            Q(status=Status.PENDING) | Q(status=Status.RETRYING)
        ).update(attempts=F("attempts") + 1, next_attempt_at=now + CLAIM_LEASE)
        if not claimed:
            continue
        notification = Notification.objects.get(id=notification_id)
        try:
            provider_id = _send(notification)
        except SmsError as error:
            outcome = _failed(notification, str(error), retryable=error.retryable, now=now)
        except Exception as error:  # the e-mail backend: SMTP errors and the like
            logger.warning("Notification %s failed: %s", notification_id, error)
            outcome = _failed(notification, f"{type(error).__name__}: {error}", retryable=True, now=now)
        else:
            Notification.objects.filter(id=notification_id).update(status=Status.SENT, sent_at=timezone.now(),
                                                                  provider_id=provider_id[:100], last_error="")
            outcome = "sent"
        counts[outcome] += 1
        metrics.NOTIFICATIONS.labels(notification.channel, outcome).inc()
    return counts


def _failed(notification: Notification, error: str, *, retryable: bool, now: datetime) -> str:
    final = not retryable or notification.attempts >= settings.NOTIFY_MAX_ATTEMPTS
    pause = timedelta(seconds=RETRY_FIRST_S * 2 ** (notification.attempts - 1))
    Notification.objects.filter(id=notification.pk).update(
        status=Status.FAILED if final else Status.RETRYING, last_error=error[:500],
        next_attempt_at=now if final else now + pause,
    )
    return "failed" if final else "retrying"
