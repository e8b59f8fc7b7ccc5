"""The Daraja client against the fake Daraja server: OAuth sharing, the token retry, guarded
parsing, STK push/query and C2B register, with the reference's exact formats."""

from datetime import UTC, datetime

import pytest

from payments import daraja
from tests.payments.fixtures import PASSWORD_VECTOR

pytestmark = pytest.mark.django_db


def push(**overrides):
    arguments = dict(phone="254708374149", amount_kes=10, account_reference="METER-A1", description="Electricity",
                     callback_url="https://example.com/payments/callbacks/stk/s/")
    return daraja.stk_push(**{**arguments, **overrides})


def test_password_matches_the_reference_test_vector():
    vector = PASSWORD_VECTOR
    assert daraja.stk_password(vector["shortcode"], vector["passkey"], vector["timestamp"]) == vector["password"]


def test_timestamp_is_nairobi_time_whatever_the_server_zone():
    assert daraja.nairobi_timestamp(datetime(2021, 6, 28, 6, 24, 8, tzinfo=UTC)) == "20210628092408"
    assert daraja.nairobi_timestamp(datetime(2023, 12, 31, 22, 0, 0, tzinfo=UTC)) == "20240101010000"


def test_push_is_accepted_and_the_token_is_fetched_once_and_shared(fake_daraja):
    first = push()
    second = push(amount_kes=20)
    assert first.checkout_request_id.startswith("ws_CO_") and first.checkout_request_id != second.checkout_request_id
    assert first.customer_message == "Success. Request accepted for processing"
    # The fake answers expires_in as the string "3599"; one token served both calls.
    assert fake_daraja.state()["counts"] == {"oauth": 1, "stkpush": 2, "stkquery": 0, "registerurl": 0, "simulate": 0}


def test_an_invalidated_token_is_refreshed_once_and_the_call_retried(fake_daraja):
    push()
    fake_daraja.control("invalidate-token")
    assert push().checkout_request_id
    counts = fake_daraja.state()["counts"]
    assert counts["oauth"] == 2 and counts["stkpush"] == 2


def test_the_token_retry_happens_only_once(fake_daraja):
    invalid = {"requestId": "1", "errorCode": "404.001.03", "errorMessage": "Invalid Access Token"}
    fake_daraja.control("fail", endpoint="stkpush", status=404, body=invalid, count=2)
    with pytest.raises(daraja.DarajaError) as error:
        push()
    assert error.value.error_code == "404.001.03" and error.value.http_status == 404
    assert fake_daraja.state()["counts"]["oauth"] == 2


def test_a_503_html_page_is_a_clear_transient_error(fake_daraja):
    fake_daraja.control("fail", endpoint="stkpush", status=503)
    with pytest.raises(daraja.DarajaError) as error:
        push()
    assert error.value.transient and error.value.http_status == 503
    assert "non-JSON" in error.value.message


def test_an_oauth_outage_is_an_error_not_a_crash(fake_daraja):
    fake_daraja.control("fail", endpoint="oauth", status=503)
    with pytest.raises(daraja.DarajaError, match="non-JSON"):
        push()


@pytest.mark.parametrize(
    "overrides, field",
    [({"phone": "0708374149"}, "PartyA"), ({"amount_kes": 0}, "Amount"), ({"account_reference": ""}, "AccountReference")],
)
def test_invalid_fields_are_refused_with_the_daraja_error_code(fake_daraja, overrides, field):
    with pytest.raises(daraja.DarajaError) as error:
        push(**overrides)
    assert error.value.error_code == "400.002.02" and not error.value.transient
    assert f"Invalid {field}" in error.value.message


def test_busy_gateway_errors_are_transient(fake_daraja):
    busy = {"requestId": "1", "errorCode": "500.003.02", "errorMessage": "System busy"}
    fake_daraja.control("fail", endpoint="stkpush", status=500, body=busy)
    with pytest.raises(daraja.DarajaError) as error:
        push()
    assert error.value.transient and error.value.error_code == "500.003.02"


def test_query_says_processing_until_the_customer_answers_then_the_result(fake_daraja):
    fake_daraja.next("cancelled", delay=3600)
    pending = push()
    assert daraja.stk_query(checkout_request_id=pending.checkout_request_id) == daraja.StkQueryResult(processing=True)
    fake_daraja.next("cancelled", delay=0)
    done = push()
    result = daraja.stk_query(checkout_request_id=done.checkout_request_id)
    assert result == daraja.StkQueryResult(processing=False, result_code="1032", result_desc="Request cancelled by user")


def test_query_of_an_unknown_checkout_is_an_error(fake_daraja):
    with pytest.raises(daraja.DarajaError, match="Invalid CheckoutRequestID"):
        daraja.stk_query(checkout_request_id="ws_CO_nope")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_c2b_register_uses_the_configured_version(fake_daraja, settings, version):
    settings.MPESA_C2B_VERSION = version
    reply = daraja.c2b_register_urls(confirmation_url="https://example.com/c/", validation_url="https://example.com/v/")
    assert reply["ResponseCode"] == "0" and "OriginatorCoversationID" in reply
    assert fake_daraja.state()["c2b_urls"][settings.MPESA_SHORTCODE]["validation"] == "https://example.com/v/"


@pytest.mark.parametrize("word", ["mpesa", "Safaricom", "QUERY", "sql", "exe", "cmd"])
def test_c2b_urls_daraja_would_refuse_are_refused_before_calling(fake_daraja, word):
    with pytest.raises(daraja.DarajaError, match="refuses C2B URLs"):
        daraja.c2b_register_urls(confirmation_url=f"https://example.com/{word}/c/", validation_url="https://example.com/v/")
    assert fake_daraja.state()["counts"]["registerurl"] == 0
