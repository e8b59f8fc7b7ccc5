"""Each alert fires once for its event (run again: nothing new), customers are told by e-mail
and SMS through the official SDK to the Africa's Talking stand-in, and every notification is
recorded: sent, retried, failed. Times are passed in (`now`), never waited for."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.utils import timezone

from meters import services
from meters.models import CommandKind, HistoryKind, HistoryReview, Meter, MeterCommand, RegisterHistory, StatusEvent
from mqtt_worker.services import dead_letters_store
from notifications.alerts import run_alerts
from notifications.models import Channel, Kind, Notification, Status
from notifications.services import notifications_deliver
from payments.models import Payment, PaymentChannel, PaymentStatus
from tests.payments.fixtures import c2b_request

pytestmark = pytest.mark.django_db


@pytest.fixture
def sam_mail(staff_user):
    return staff_user.email  # staff alerts go to active staff with an address (STAFF_ALERT_EMAILS empty)


def fired(kind) -> list[Notification]:
    return list(Notification.objects.filter(kind=kind).order_by("id"))


def test_a_silent_meter_is_marked_offline_once_and_staff_are_told(alice_meter, sam_mail, settings):
    settings.METER_REPORT_INTERVAL_S = 30
    now = timezone.now()
    Meter.objects.filter(pk=alice_meter.pk).update(online=True, last_seen_at=now - timedelta(seconds=89))
    assert run_alerts(now=now)["offline"] == 0, "within three intervals: still online"
    later = now + timedelta(seconds=2)
    assert run_alerts(now=later)["offline"] == 1
    assert not Meter.objects.get(pk=alice_meter.pk).online
    assert StatusEvent.objects.filter(meter=alice_meter, status="offline").count() == 1
    (alert,) = fired(Kind.METER_OFFLINE)
    assert alert.recipient == sam_mail and "METER-A1" in alert.body
    assert run_alerts(now=later + timedelta(minutes=1))["offline"] == 0
    assert len(fired(Kind.METER_OFFLINE)) == 1 and StatusEvent.objects.filter(status="offline").count() == 1


def test_low_balance_is_told_once_per_crossing_by_email_and_sms(alice_meter, fake_sms, settings):
    settings.LOW_BALANCE_KWH = Decimal("5")
    services.ledger_credit(meter_no="METER-A1", units_kwh="6", idempotency_key="t1", actor="test")
    assert run_alerts()["low_balance"] == 0
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-2.5", reason="test", actor="test")  # 3.5 kWh
    assert run_alerts()["low_balance"] == 2  # e-mail and SMS
    assert run_alerts()["low_balance"] == 0
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-1", reason="test", actor="test")  # still low: no news
    assert run_alerts()["low_balance"] == 0
    services.ledger_credit(meter_no="METER-A1", units_kwh="10", idempotency_key="t2", actor="test")
    assert run_alerts()["low_balance"] == 0  # back above: re-armed
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-12", reason="test", actor="test")
    assert run_alerts()["low_balance"] == 2, "a second crossing is told again"
    notices = fired(Kind.LOW_BALANCE)
    assert {(n.channel, n.recipient) for n in notices} == {("email", "alice@example.com"), ("sms", "254712345678")}
    assert len(notices) == 4

    assert notifications_deliver() == {"sent": 4, "retrying": 0, "failed": 0}
    sms = fake_sms.state()["messages"]
    assert [m["to"] for m in sms] == ["+254712345678", "+254712345678"]
    assert "METER-A1" in sms[0]["message"] and "kWh left" in sms[0]["message"]
    assert len(mail.outbox) == 2 and mail.outbox[0].to == ["alice@example.com"]
    sent = Notification.objects.get(channel=Channel.SMS, key__endswith=":1")
    assert sent.status == Status.SENT and sent.provider_id.startswith("ATXid_") and sent.attempts == 1


def test_a_credited_payment_tells_the_customer_the_units(client, alice_meter, fake_sms):
    confirmation = "/payments/callbacks/c2b/confirmation/test-callback-secret-0123456789abcdef/"
    client.post(confirmation, data=c2b_request(bill_ref="METER-A1", amount="100.00"), content_type="application/json")
    payment = Payment.objects.get()
    assert payment.status == PaymentStatus.SUCCEEDED
    assert run_alerts()["payment_credited"] == 2
    assert run_alerts()["payment_credited"] == 0
    notifications_deliver()
    # (4 kWh is also below the low-balance threshold: that alert speaks too.)
    (sms,) = [m for m in fake_sms.state()["messages"] if "credited" in m["message"]]
    assert "4 kWh on meter METER-A1" in sms["message"] and "RKL51ZDR4F" in sms["message"]
    assert "4 kWh credited to meter METER-A1" in {m.subject for m in mail.outbox}


def test_commands_unacknowledged_past_the_limit_tell_staff_once(alice_meter, sam_mail, settings):
    settings.COMMAND_ACK_ALERT_S = 300
    command = services.meter_command_queue_balance(meter_no="METER-A1", reason="resync")
    now = command.issued_at + timedelta(seconds=299)
    assert run_alerts(now=now)["commands_unacknowledged"] == 0
    assert run_alerts(now=now + timedelta(seconds=2))["commands_unacknowledged"] == 1
    assert run_alerts(now=now + timedelta(seconds=60))["commands_unacknowledged"] == 0
    (alert,) = fired(Kind.COMMANDS_UNACKNOWLEDGED)
    assert command.cmd_id in alert.body
    # Sent to a meter that is offline: it cannot acknowledge; that is the offline alert's business.
    MeterCommand.objects.update(status="sent")
    services.meter_command_queue_relay(meter_no="METER-A1", state="off", reason="test", actor="sam")
    MeterCommand.objects.filter(kind=CommandKind.RELAY).update(status="sent", issued_at=now - timedelta(hours=1))
    assert run_alerts(now=now + timedelta(minutes=5))["commands_unacknowledged"] == 0


def test_payments_needing_review_and_long_checks_tell_staff_once_each(alice_meter, sam_mail, settings):
    settings.PAYMENT_CHECKING_ALERT_S = 600
    now = timezone.now()
    review = Payment.objects.create(meter=alice_meter, channel=PaymentChannel.STK, status=PaymentStatus.NEEDS_REVIEW,
                                    amount_kes=Decimal("50"), review_reason="amount differs")
    checking = Payment.objects.create(meter=alice_meter, channel=PaymentChannel.STK, status=PaymentStatus.CHECKING,
                                      amount_kes=Decimal("20"), created_at=now - timedelta(seconds=599))
    assert run_alerts(now=now)["payments_review"] == 1
    assert run_alerts(now=now + timedelta(seconds=2))["payments_review"] == 1  # the check is old enough now
    assert run_alerts(now=now + timedelta(seconds=60))["payments_review"] == 0
    assert {n.key for n in fired(Kind.PAYMENT_REVIEW)} == {f"payment-needs_review:{review.pk}",
                                                           f"payment-checking:{checking.pk}"}


def test_a_dead_letter_spike_tells_staff_once_per_window(sam_mail, settings):
    settings.DEAD_LETTER_SPIKE_COUNT, settings.DEAD_LETTER_SPIKE_WINDOW_S = 5, 300
    now = timezone.now().replace(microsecond=0)
    dead_letters_store(letters=[("smartmeter/X/consumption", b"garbage", "not JSON")] * 4, client_id="t", at=now)
    assert run_alerts(now=now)["dead_letter_spike"] == 0
    dead_letters_store(letters=[("smartmeter/X/consumption", b"garbage", "not JSON")], client_id="t", at=now)
    assert run_alerts(now=now)["dead_letter_spike"] == 1
    assert run_alerts(now=now)["dead_letter_spike"] == 0
    assert "5 dead letters" in fired(Kind.DEAD_LETTER_SPIKE)[0].subject


def test_register_resets_awaiting_review_tell_staff_once(alice_meter, sam_mail):
    history = RegisterHistory.objects.create(meter=alice_meter, reg_id="~1", kind=HistoryKind.PROVISIONAL,
                                             review=HistoryReview.PENDING, reason="register went back from 120 to 3")
    assert run_alerts()["register_resets"] == 1
    assert run_alerts()["register_resets"] == 0
    assert "went back" in fired(Kind.REGISTER_RESET)[0].body and history.pk


def test_a_failed_sms_is_retried_then_marked_failed(alice_meter, fake_sms, settings):
    settings.NOTIFY_MAX_ATTEMPTS = 3
    alice_meter.owner.user.email = ""
    alice_meter.owner.user.save()
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-1", reason="arrears", actor="test")
    assert run_alerts()["low_balance"] == 1  # SMS only: no e-mail address
    fake_sms.control("fail", count=5, status=500, body="Internal Server Error")
    now = timezone.now()
    assert notifications_deliver(now=now) == {"sent": 0, "retrying": 1, "failed": 0}
    assert notifications_deliver(now=now) == {"sent": 0, "retrying": 0, "failed": 0}, "not due before its pause"
    (sms,) = Notification.objects.all()
    assert sms.status == Status.RETRYING and sms.attempts == 1 and "gateway refused" in sms.last_error
    assert notifications_deliver(now=sms.next_attempt_at) == {"sent": 0, "retrying": 1, "failed": 0}
    sms.refresh_from_db()
    assert notifications_deliver(now=sms.next_attempt_at) == {"sent": 0, "retrying": 0, "failed": 1}
    sms.refresh_from_db()
    assert (sms.status, sms.attempts) == (Status.FAILED, 3)
    assert fake_sms.state()["refused"] == 3
    assert notifications_deliver(now=sms.next_attempt_at + timedelta(days=1))["failed"] == 0, "failed stays failed"


def test_an_unreachable_number_fails_at_once(alice_meter, fake_sms):
    alice_meter.owner.user.email = ""
    alice_meter.owner.user.save()
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-1", reason="arrears", actor="test")
    run_alerts()
    fake_sms.control("fail", count=1, statusCode=406)
    assert notifications_deliver() == {"sent": 0, "retrying": 0, "failed": 1}
    assert "UserInBlacklist" in Notification.objects.get().last_error


def test_notifications_are_visible_to_staff_in_the_admin(admin_client, alice_meter, fake_sms):
    services.ledger_adjust(meter_no="METER-A1", units_kwh="-1", reason="arrears", actor="test")
    run_alerts()
    notifications_deliver()
    page = admin_client.get("/admin/notifications/notification/")
    assert page.status_code == 200 and "254712345678" in page.content.decode() and "Sent" in page.content.decode()
