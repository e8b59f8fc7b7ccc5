"""The meters endpoints: shapes, readings over time, statements, staff operations, errors."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meters import services
from meters.consumption import ledger_debit
from meters.models import CommandKind, LedgerEntry, Meter, MeterCommand, Reading
from tests.factories import consumption_report


def _reading(meter, at, units, *, duplicate=False, key=None):
    return Reading.objects.create(
        meter=meter,
        reading_at=at,
        meter_timestamp_ms=int(at.timestamp() * 1000),
        units_consumed_kwh=Decimal(units),
        remaining_balance_kwh=Decimal("0"),
        total_consumed_kwh=Decimal(units),
        dedup_key=key or f"t:{at.timestamp()}",
        is_duplicate=duplicate,
        debit_kwh=Decimal("0") if duplicate else Decimal(units),
        raw_payload="{}",
    )


def test_meter_shape_decimals_as_strings_and_utc_times(alice_api, alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="4.000001", idempotency_key="k1", actor="mpesa")
    Meter.objects.filter(pk=alice_meter.pk).update(last_seen_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), online=True)
    body = alice_api.get("/api/v1/meters/METER-A1/").json()
    assert body == {
        "meterNo": "METER-A1",
        "balance": "4.000001",
        "balanceKes": "100.00",
        "online": True,
        "relay": "unknown",
        "relayOverride": "auto",
        "lastSeen": "2024-05-01T12:00:00Z",
        "tariff": {"id": alice_meter.tariff_id, "name": "Domestic", "kesPerKwh": "25.0000"},
        "owner": alice_meter.owner_id,
    }


def test_readings_are_summed_per_hour_with_empty_hours_and_without_duplicates(alice_api, alice_meter):
    base = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    _reading(alice_meter, base + timedelta(minutes=5), "0.5")
    _reading(alice_meter, base + timedelta(minutes=35), "0.25", key="same")
    _reading(alice_meter, base + timedelta(minutes=35), "0.25", key="same", duplicate=True)
    _reading(alice_meter, base + timedelta(hours=2, minutes=1), "1.000001")
    _reading(alice_meter, base + timedelta(hours=3), "9")  # at `to`: excluded
    response = alice_api.get("/api/v1/meters/METER-A1/readings/", {"from": "2024-05-01T10:00:00Z", "to": "2024-05-01T13:00:00Z"})
    assert response.status_code == 200
    body = response.json()
    assert body["bucket"] == "hour" and body["totalUnits"] == "1.750001"
    assert [(r["start"], r["units"], r["debited"], r["reports"]) for r in body["results"]] == [
        ("2024-05-01T10:00:00Z", "0.750000", "0.750000", 2),
        ("2024-05-01T11:00:00Z", "0.000000", "0.000000", 0),
        ("2024-05-01T12:00:00Z", "1.000001", "1.000001", 1),
    ]
    day = alice_api.get(
        "/api/v1/meters/METER-A1/readings/", {"from": "2024-04-30T00:00:00+03:00", "to": "2024-05-02T00:00:00Z", "bucket": "day"}
    )
    assert [(r["start"], r["units"]) for r in day.json()["results"]] == [
        ("2024-04-29T00:00:00Z", "0.000000"),
        ("2024-04-30T00:00:00Z", "0.000000"),
        ("2024-05-01T00:00:00Z", "10.750001"),
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"bucket": "week"}, "bucket"),
        ({"bucket": ""}, "bucket"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2024-05-02T00:00:00Z", "to": "2024-05-01T00:00:00Z"}, "from"),
        ({"from": "2024-01-01T00:00:00Z", "to": "2024-03-01T00:00:00Z"}, "from"),
        ({"from": "0001-01-01T00:00:00Z"}, "from"),
    ],
)
def test_bad_readings_queries_get_a_clear_400(alice_api, alice_meter, query, field):
    response = alice_api.get("/api/v1/meters/METER-A1/readings/", query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] in ("invalid", "invalid_choice") and error["field"] == field and error["details"][field]


def test_statement_is_paginated_with_the_running_balance_of_the_whole_ledger(alice_api, alice_meter):
    for n, units in enumerate(["10", "-2.5", "3", "-0.000001"]):
        if units.startswith("-"):
            ledger_debit(report=consumption_report("METER-A1", units[1:], seq=n))
        else:
            services.ledger_credit(meter_no="METER-A1", units_kwh=units, idempotency_key=f"c{n}", actor="mpesa")
    first = alice_api.get("/api/v1/meters/METER-A1/statement/", {"limit": 2}).json()
    assert first["count"] == 4 and first["next"] and first["previous"] is None
    assert [(e["units"], e["balanceAfter"]) for e in first["results"]] == [("-0.000001", "10.499999"), ("3.000000", "10.500000")]
    second = alice_api.get("/api/v1/meters/METER-A1/statement/", {"limit": 2, "offset": 2}).json()
    # The second page's running balance still counts from the first entry, not from the page.
    assert [(e["units"], e["balanceAfter"]) for e in second["results"]] == [("-2.500000", "7.500000"), ("10.000000", "10.000000")]
    bad = alice_api.get("/api/v1/meters/METER-A1/statement/", {"limit": "0"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "limit"


def test_staff_adjustment_uses_the_ledger_service_and_an_idempotency_key(staff_api, alice_meter):
    headers = {"HTTP_IDEMPOTENCY_KEY": "adj-2024-05-01"}
    first = staff_api.post(
        "/api/v1/meters/METER-A1/adjustments/", {"units": "-1.25", "reason": "meter swap"}, format="json", **headers
    )
    assert first.status_code == 201
    assert first.json()["entry"]["actor"] == "sam" and first.json()["balance"] == "-1.250000"
    again = staff_api.post(
        "/api/v1/meters/METER-A1/adjustments/", {"units": "-1.25", "reason": "meter swap"}, format="json", **headers
    )
    assert again.status_code == 200 and again.json()["entry"]["id"] == first.json()["entry"]["id"]
    assert again.json()["created"] is False
    other = staff_api.post("/api/v1/meters/METER-A1/adjustments/", {"units": "2", "reason": "x"}, format="json", **headers)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert LedgerEntry.objects.filter(meter=alice_meter).count() == 1
    # ledger_adjust also tells the meter.
    assert MeterCommand.objects.filter(meter=alice_meter, kind=CommandKind.BALANCE, reason="adjustment").count() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"units": "0", "reason": "x"}, "units"),
        ({"units": 1.5, "reason": "x"}, "units"),
        ({"units": "1.0000001", "reason": "x"}, "units"),
        ({"units": "1", "reason": ""}, "reason"),
        ({"units": "NaN", "reason": "x"}, "units"),
    ],
)
def test_bad_adjustments_change_nothing(staff_api, alice_meter, body, field):
    response = staff_api.post("/api/v1/meters/METER-A1/adjustments/", body, format="json")
    assert response.status_code == 400 and response.json()["error"]["field"] == field
    assert not LedgerEntry.objects.exists() and not MeterCommand.objects.exists()


def test_staff_resync_and_relay_queue_commands(staff_api, alice_meter):
    resync = staff_api.post("/api/v1/meters/METER-A1/resync/")
    assert resync.status_code == 202 and resync.json()["kind"] == "balance" and resync.json()["reason"] == "resync"
    relay = staff_api.post("/api/v1/meters/METER-A1/relay/", {"state": "off", "reason": "maintenance"}, format="json")
    assert relay.status_code == 202 and relay.json()["relayState"] == "off"
    assert Meter.objects.get(pk=alice_meter.pk).relay_override == "off"
    bad = staff_api.post("/api/v1/meters/METER-A1/relay/", {"state": "sideways", "reason": "x"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "state"
    assert MeterCommand.objects.count() == 2


def test_staff_create_a_customer_then_provision_and_reassign_a_meter(staff_api, alice, tariff):
    customer = staff_api.post(
        "/api/v1/customers/",
        {
            "username": "carol",
            "password": "pw-carol-2024",
            "name": "Carol Achieng",
            "phone": "+254 722 000 111",
            "email": "c@example.com",
        },
        format="json",
    )
    assert customer.status_code == 201 and customer.json()["phone"] == "254722000111" and "password" not in customer.json()
    taken = staff_api.post(
        "/api/v1/customers/",
        {"username": "carol", "password": "pw-carol-2024", "name": "C", "phone": "0722000111"},
        format="json",
    )
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "username"
    meter = staff_api.post("/api/v1/meters/", {"meterNo": "METER-C1", "owner": customer.json()["id"]}, format="json")
    assert meter.status_code == 201 and meter.json()["tariff"]["id"] == tariff.pk  # the tariff in effect
    again = staff_api.post("/api/v1/meters/", {"meterNo": "METER-C1", "owner": None}, format="json")
    assert again.status_code == 409 and again.json()["error"]["field"] == "meterNo"
    moved = staff_api.patch("/api/v1/meters/METER-C1/", {"owner": alice.pk}, format="json")
    assert moved.status_code == 200 and moved.json()["owner"] == alice.pk
    bad_owner = staff_api.patch("/api/v1/meters/METER-C1/", {"owner": 10**9}, format="json")
    assert bad_owner.status_code == 400 and bad_owner.json()["error"]["field"] == "owner"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"meterNo": "a/b", "owner": None}, "meterNo"),
        ({"meterNo": "M" * 33, "owner": None}, "meterNo"),
        ({"owner": None}, "meterNo"),
        ({"meterNo": 12, "owner": None}, "meterNo"),
        ({"meterNo": "OK-1", "owner": None, "tariff": 10**9}, "tariff"),
    ],
)
def test_bad_meter_provisioning_changes_nothing(staff_api, tariff, body, field):
    response = staff_api.post("/api/v1/meters/", body, format="json")
    assert response.status_code == 400 and response.json()["error"]["field"] == field
    assert not Meter.objects.exists()


def test_errors_outside_views_use_the_same_format(alice_api):
    assert alice_api.get("/api/v1/no-such-thing/").json()["error"]["code"] == "not_found"
    assert alice_api.get("/api/v2/meters/").status_code == 404
    bad_json = alice_api.post("/api/v1/payments/", "{not json", content_type="application/json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "parse_error"
    form = alice_api.post("/api/v1/payments/", {"meterNo": "METER-A1"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert alice_api.put("/api/v1/me/").json()["error"]["code"] == "method_not_allowed"


def test_schema_and_docs_are_served(anon):
    schema = anon.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/api/v1/auth/token/", "/api/v1/meters/{meterNo}/readings/", "/api/v1/payments/{id}/", "/api/v1/dead-letters/"):
        assert path in paths
    assert "Error" in schema.json()["components"]["schemas"]
    assert anon.get("/api/docs/").status_code == 200
