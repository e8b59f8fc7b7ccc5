"""Staff admin for payments (filters, raw callbacks, actions through services) and the reads
the API relies on, for the persona who must see and the one who must not."""

from decimal import Decimal

import pytest

from core.errors import NotFound
from meters.models import CommandStatus, LedgerEntry, MeterCommand
from payments import services
from payments.models import Payment, PaymentAudit, PaymentStatus
from payments.selectors import payment_delivered_to_meter, payment_get_for_user, payments_for_user
from tests.conftest import PASSWORD
from tests.payments.fixtures import stk_success_for

pytestmark = pytest.mark.django_db
CALLBACK = "/payments/callbacks/stk/test-callback-secret-0123456789abcdef/"


@pytest.fixture
def payments(fake_daraja, alice_meter, bob_meter, client):
    alice_payment = services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes=100)
    fake_daraja.next("never")  # Bob's callback is lost; only a query can tell
    bob_payment = services.stk_push_start(user=bob_meter.owner.user, meter_no="METER-B1", phone="0110123456", amount_kes=50)
    client.post(CALLBACK, data=stk_success_for(alice_payment), content_type="application/json")
    return alice_payment, bob_payment


def test_customers_see_only_their_payments_and_staff_all(payments, alice, bob, staff_user, django_user_model):
    alice_payment, bob_payment = payments
    assert list(payments_for_user(user=alice.user)) == [Payment.objects.get(pk=alice_payment.pk)]
    assert list(payments_for_user(user=bob.user).values_list("pk", flat=True)) == [bob_payment.pk]
    assert payments_for_user(user=staff_user).count() == 2
    stranger = django_user_model.objects.create_user("charlie", password=PASSWORD)
    assert payments_for_user(user=stranger).count() == 0
    assert payment_get_for_user(user=alice.user, payment_id=alice_payment.pk).pk == alice_payment.pk
    for user, payment_id in ((bob.user, alice_payment.pk), (stranger, bob_payment.pk), (alice.user, "x"), (alice.user, 10**9)):
        with pytest.raises(NotFound):
            payment_get_for_user(user=user, payment_id=payment_id)


def test_delivered_to_meter_follows_the_meters_acknowledgement(payments):
    payment = Payment.objects.get(pk=payments[0].pk)
    assert not payment_delivered_to_meter(payment) and not payment_delivered_to_meter(Payment.objects.get(pk=payments[1].pk))
    MeterCommand.objects.filter(pk=payment.command_id).update(status=CommandStatus.ACKNOWLEDGED)
    assert payment_delivered_to_meter(payment)


def test_a_later_acknowledged_balance_also_delivers_the_payment(payments):
    from meters.services import meter_command_queue_balance

    payment = Payment.objects.get(pk=payments[0].pk)
    MeterCommand.objects.filter(pk=payment.command_id).update(status=CommandStatus.SUPERSEDED)
    later = meter_command_queue_balance(meter_no="METER-A1", reason="resync")
    assert not payment_delivered_to_meter(payment)
    MeterCommand.objects.filter(pk=later.pk).update(status=CommandStatus.ACKNOWLEDGED)
    assert payment_delivered_to_meter(payment)


def test_staff_see_payments_with_filters_and_raw_callbacks(payments, admin_client):
    alice_payment, _ = payments
    listing = admin_client.get("/admin/payments/payment/?status__exact=succeeded")
    assert listing.status_code == 200 and b"METER-A1" in listing.content and b"METER-B1" not in listing.content
    detail = admin_client.get(f"/admin/payments/payment/{alice_payment.pk}/change/")
    assert detail.status_code == 200 and b"NLJ7RT61SV" in detail.content and b"CallbackMetadata" in detail.content
    assert admin_client.get("/admin/payments/callback/?status__exact=processed").status_code == 200


def test_customers_cannot_reach_the_payments_admin(payments, client, alice):
    client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})  # through axes
    response = client.get("/admin/payments/payment/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_query_now_action_queries_through_the_service(payments, admin_client, fake_daraja):
    _, bob_payment = payments
    response = admin_client.post(
        "/admin/payments/payment/", {"action": "query_now", "_selected_action": [bob_payment.pk]}, follow=True
    )
    assert response.status_code == 200
    bob_payment.refresh_from_db()
    assert bob_payment.status == PaymentStatus.SUCCEEDED and bob_payment.units_kwh == Decimal("2")
    assert PaymentAudit.objects.get(action="query").actor_name == "admin"


def test_resolution_actions_ask_for_a_note_then_call_the_services(payments, admin_client, monkeypatch, fake_daraja):
    _, bob_payment = payments
    monkeypatch.setattr(services, "QUERY_MAX_ATTEMPTS", 1)
    fake_daraja.control("fail", endpoint="stkquery", status=503)
    services.payment_query(payment_id=bob_payment.pk)
    assert Payment.objects.get(pk=bob_payment.pk).status == PaymentStatus.NEEDS_REVIEW
    form = admin_client.post("/admin/payments/payment/", {"action": "resolve_credit", "_selected_action": [bob_payment.pk]})
    assert form.status_code == 200 and f"Payment {bob_payment.pk}: KES 50.00 for METER-B1 (Needs review)".encode() in form.content
    missing_note = admin_client.post(
        "/admin/payments/payment/", {"action": "resolve_credit", "_selected_action": [bob_payment.pk], "apply": "1", "note": ""}
    )
    assert missing_note.status_code == 200 and LedgerEntry.objects.filter(meter__meter_no="METER-B1").count() == 0
    admin_client.post(
        "/admin/payments/payment/",
        {"action": "resolve_credit", "_selected_action": [bob_payment.pk], "apply": "1", "note": "Paid, seen in portal",
         "receipt": "ABC123XYZ0"},
    )
    bob_payment.refresh_from_db()
    assert bob_payment.status == PaymentStatus.SUCCEEDED and bob_payment.mpesa_receipt == "ABC123XYZ0"
    assert PaymentAudit.objects.get(action="credit").note.startswith("Paid, seen in portal")


def test_payments_cannot_be_edited_or_deleted_in_the_admin(payments, admin_client):
    alice_payment, _ = payments
    response = admin_client.post(f"/admin/payments/payment/{alice_payment.pk}/change/", {"status": "failed"})
    assert response.status_code == 403
    assert admin_client.post(f"/admin/payments/payment/{alice_payment.pk}/delete/").status_code == 403
    assert Payment.objects.get(pk=alice_payment.pk).status == PaymentStatus.SUCCEEDED
