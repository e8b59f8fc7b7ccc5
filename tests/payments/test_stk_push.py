"""stk_push_start: who may push, what is validated, idempotency, one pending push per meter,
Daraja failures. Runs against the fake Daraja server."""

from decimal import Decimal

import pytest

from core.errors import Conflict, InvalidInput, NotFound
from payments import services
from payments.errors import MpesaRefused, MpesaUnavailable
from payments.models import Payment, PaymentStatus

pytestmark = pytest.mark.django_db


def start(user, **overrides):
    arguments = dict(meter_no="METER-A1", phone="0712345678", amount_kes="100")
    return services.stk_push_start(user=user, **{**arguments, **overrides})


def test_push_creates_a_pending_payment_with_the_checkout_id(fake_daraja, alice_meter):
    payment = start(alice_meter.owner.user)
    assert payment.status == PaymentStatus.PENDING and payment.channel == "stk"
    assert payment.checkout_request_id.startswith("ws_CO_") and payment.merchant_request_id
    assert payment.amount_kes == Decimal("100.00") and payment.phone == "254712345678"
    assert payment.initiated_by == alice_meter.owner.user and payment.next_query_at > payment.created_at
    assert payment.units_kwh is None and payment.ledger_entry is None


def test_the_push_names_the_meter_and_calls_back_with_the_secret(fake_daraja, alice_meter, settings):
    settings.MPESA_CALLBACK_BASE_URL = "https://pay.example.com"
    start(alice_meter.owner.user)
    assert services.stk_callback_url() == "https://pay.example.com/payments/callbacks/stk/test-callback-secret-0123456789abcdef/"


def test_someone_elses_meter_is_not_found_and_nothing_is_sent(fake_daraja, alice_meter, bob):
    with pytest.raises(NotFound):
        start(bob.user)
    assert Payment.objects.count() == 0 and fake_daraja.state()["counts"]["stkpush"] == 0


def test_staff_may_push_for_any_meter(fake_daraja, alice_meter, staff_user):
    assert start(staff_user).status == PaymentStatus.PENDING


@pytest.mark.parametrize("amount", ["0", "-5", "10.50", "1.5", 10.0, True, "abc", "NaN", "Infinity", "250001", None])
def test_bad_amounts_are_refused_and_nothing_is_written(fake_daraja, alice_meter, amount):
    with pytest.raises(InvalidInput) as error:
        start(alice_meter.owner.user, amount_kes=amount)
    assert error.value.field == "amount_kes"
    assert Payment.objects.count() == 0 and fake_daraja.state()["counts"]["stkpush"] == 0


@pytest.mark.parametrize("phone", ["0812345678", "12345", "+1 555 0100", "", "25471234567"])
def test_bad_phones_are_refused(fake_daraja, alice_meter, phone):
    with pytest.raises(InvalidInput) as error:
        start(alice_meter.owner.user, phone=phone)
    assert error.value.field == "phone" and Payment.objects.count() == 0


def test_limits_come_from_settings(fake_daraja, alice_meter, settings):
    settings.MPESA_MIN_AMOUNT_KES, settings.MPESA_MAX_AMOUNT_KES = 50, 70
    with pytest.raises(InvalidInput, match="between KES 50 and KES 70"):
        start(alice_meter.owner.user, amount_kes=49)
    assert start(alice_meter.owner.user, amount_kes=Decimal("70")).amount_kes == Decimal("70.00")


def test_a_second_push_for_the_same_meter_is_refused_while_one_is_pending(fake_daraja, alice_meter):
    start(alice_meter.owner.user)
    with pytest.raises(Conflict) as error:
        start(alice_meter.owner.user, amount_kes="50")
    assert error.value.code == "payment_pending"
    assert Payment.objects.count() == 1 and fake_daraja.state()["counts"]["stkpush"] == 1


def test_a_retry_with_the_same_key_returns_the_first_payment(fake_daraja, alice_meter):
    first = start(alice_meter.owner.user, idempotency_key="buy-7f3a")
    again = start(alice_meter.owner.user, idempotency_key="buy-7f3a")
    assert again.pk == first.pk and Payment.objects.count() == 1
    assert fake_daraja.state()["counts"]["stkpush"] == 1


def test_the_same_key_for_a_different_payment_is_a_conflict(fake_daraja, alice_meter):
    start(alice_meter.owner.user, idempotency_key="buy-7f3a")
    with pytest.raises(Conflict, match="already used"):
        start(alice_meter.owner.user, idempotency_key="buy-7f3a", amount_kes="200")


def test_keys_are_per_user(fake_daraja, alice_meter, bob_meter):
    mine = start(alice_meter.owner.user, idempotency_key="k1")
    theirs = start(bob_meter.owner.user, meter_no="METER-B1", idempotency_key="k1")
    assert mine.pk != theirs.pk


def test_an_explicit_refusal_marks_the_payment_failed_and_frees_the_meter(fake_daraja, alice_meter):
    fake_daraja.control("fail", endpoint="stkpush", status=400, body={
        "requestId": "1", "errorCode": "400.002.02", "errorMessage": "Bad Request - Invalid PhoneNumber"})
    with pytest.raises(MpesaRefused) as error:
        start(alice_meter.owner.user)
    assert error.value.code == "mpesa_refused" and error.value.http_status == 502
    failed = Payment.objects.get()
    assert failed.status == PaymentStatus.FAILED and failed.resolved_at is not None and failed.result_desc
    # The meter is free for the next attempt.
    assert start(alice_meter.owner.user).status == PaymentStatus.PENDING


def test_no_connection_at_all_fails_and_nothing_was_started(fake_daraja, alice_meter, settings):
    settings.MPESA_BASE_URL = "http://127.0.0.1:9"  # nothing listens: the request never left
    with pytest.raises(MpesaUnavailable) as error:
        start(alice_meter.owner.user)
    assert error.value.http_status == 503 and Payment.objects.get().status == PaymentStatus.FAILED


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 503},
        {"status": 500, "body": {"requestId": "1", "errorCode": "500.003.02", "errorMessage": "System busy"}},
    ],
)
def test_a_5xx_answer_is_no_proof_nothing_happened_so_the_payment_is_checking(fake_daraja, alice_meter, failure):
    fake_daraja.control("fail", endpoint="stkpush", **failure)
    payment = start(alice_meter.owner.user)
    assert payment.status == PaymentStatus.CHECKING and payment.resolved_at is None and "checking" in payment.result_desc
    assert payment.checkout_request_id is None
    # Not pending: the meter is free for another push meanwhile.
    assert start(alice_meter.owner.user).status == PaymentStatus.PENDING


@pytest.mark.parametrize("answer", ["drop", "503"])
def test_a_push_accepted_by_safaricom_whose_answer_is_lost_is_checking_not_failed(fake_daraja, alice_meter, answer):
    """Finding 2: the push request fails after Safaricom accepted it; the customer is prompted."""
    fake_daraja.control("next", outcome="hold", answer=answer)
    payment = start(alice_meter.owner.user)
    assert payment.status == PaymentStatus.CHECKING and payment.checkout_request_id is None
    assert len(fake_daraja.state()["transactions"]) == 1  # Safaricom did accept it


def test_units_round_down_and_the_remainder_is_kept(db):
    units, remainder = services.units_for_amount(amount_kes=Decimal("10.00"), kes_per_kwh=Decimal("3.0000"))
    assert units == Decimal("3.333333") and remainder == Decimal("0.000001")
    units, remainder = services.units_for_amount(amount_kes=Decimal("100.00"), kes_per_kwh=Decimal("25.0000"))
    assert units == Decimal("4") and remainder == 0
