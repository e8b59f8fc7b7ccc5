"""Every write to customers, meters, the ledger and the command outbox goes through here.

Views, the API, admin actions, Celery tasks, payments and the MQTT worker all call these
functions; none of them writes the models directly.

Concurrency: a posting locks its meter row (`SELECT … FOR UPDATE`) before it reads or writes
anything else, so every posting on one meter is serialised and two postings never lock rows in
different orders (no deadlocks). The idempotency key is checked under that lock, and the unique
constraint on it is the backstop when two meters race for one key.
"""

import uuid
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from meters.errors import Conflict, InvalidInput, NotFound
from meters.events import send_meter_events_on_commit
from meters.models import (
    KES_QUANTUM,
    KWH_QUANTUM,
    CommandKind,
    Customer,
    FirebaseMirror,
    LedgerEntry,
    LedgerKind,
    Meter,
    MeterCommand,
    RelayOverride,
    Tariff,
)
from meters.outbox import dispatch_commands_on_commit
from meters.phone import normalize_phone
from meters.validation import validate_meter_no

# Largest magnitude one posting may move: far above any real purchase, far below the column's
# 12 integer digits, so an absurd number is refused rather than stored.
MAX_POSTING_KWH = Decimal("1000000")


@dataclass(frozen=True)
class Posting:
    entry: LedgerEntry
    created: bool
    balance_kwh: Decimal


def to_decimal(value, *, field: str, places: Decimal, allow_zero: bool = False) -> Decimal:
    """An exact Decimal from int, str or Decimal. Floats are refused: they are not exact.

    More decimal places than the ledger keeps is an error, not a silent rounding.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidInput(f"{field} must be a decimal number (a string or Decimal), not {type(value).__name__}", field=field)
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"{field} is not a number: {value!r}", field=field) from None
    if not number.is_finite():
        raise InvalidInput(f"{field} must be finite, got {value!r}", field=field)
    if number != number.quantize(places, rounding=ROUND_DOWN):
        raise InvalidInput(f"{field} has more than {abs(places.as_tuple().exponent)} decimal places: {value!r}", field=field)
    if number == 0 and not allow_zero:
        raise InvalidInput(f"{field} must not be zero", field=field)
    if abs(number) > MAX_POSTING_KWH and places == KWH_QUANTUM:
        raise InvalidInput(f"{field} is out of range: {value!r}", field=field)
    return number.quantize(places)


def _positive_kwh(value, field: str = "units_kwh") -> Decimal:
    units = to_decimal(value, field=field, places=KWH_QUANTUM)
    if units <= 0:
        raise InvalidInput(f"{field} must be positive, got {value!r}", field=field)
    return units


def _check_key(idempotency_key: str) -> str:
    if not isinstance(idempotency_key, str) or not idempotency_key.strip():
        raise InvalidInput("An idempotency key is required", field="idempotency_key")
    if len(idempotency_key) > 160:
        raise InvalidInput("Idempotency key is longer than 160 characters", field="idempotency_key")
    return idempotency_key


def meter_lock(*, meter_no: str) -> Meter:
    """The meter row, locked until the surrounding transaction ends. Call inside atomic()."""
    validate_meter_no(meter_no)
    try:
        return Meter.objects.select_for_update().get(meter_no=meter_no)
    except Meter.DoesNotExist:
        raise NotFound(f"Unknown meter {meter_no}", field="meter_no") from None


def _same_posting(entry: LedgerEntry, meter: Meter, kind: str, units: Decimal) -> None:
    if entry.meter_id != meter.pk or entry.kind != kind or entry.units_kwh != units:
        raise Conflict(
            f"Idempotency key {entry.idempotency_key!r} was already used for a different posting",
            field="idempotency_key",
        )


def _post(
    *,
    meter_no: str,
    kind: str,
    units_kwh: Decimal,
    idempotency_key: str,
    actor: str,
    reason: str,
    amount_kes: Decimal | None,
) -> Posting:
    key = _check_key(idempotency_key)
    if not actor:
        raise InvalidInput("An actor is required", field="actor")
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        existing = LedgerEntry.objects.filter(idempotency_key=key).first()
        if existing is not None:
            _same_posting(existing, meter, kind, units_kwh)
            return Posting(existing, False, meter.balance_kwh)
        try:
            # A savepoint: if another meter's transaction took this key meanwhile, the unique
            # constraint fails here and the outer transaction is still usable.
            with transaction.atomic():
                entry = LedgerEntry.objects.create(
                    meter=meter,
                    kind=kind,
                    units_kwh=units_kwh,
                    amount_kes=amount_kes,
                    idempotency_key=key,
                    reason=reason[:255],
                    actor=actor[:150],
                )
        except IntegrityError:
            existing = LedgerEntry.objects.get(idempotency_key=key)
            _same_posting(existing, meter, kind, units_kwh)
            return Posting(existing, False, meter.balance_kwh)
        Meter.objects.filter(pk=meter.pk).update(balance_kwh=F("balance_kwh") + units_kwh)
        balance = meter.balance_kwh + units_kwh
        # The Firebase mirror learns of every posting (payments, adjustments) in the same transaction.
        firebase_mirror_mark(meter_ids=[meter.pk])
        send_meter_events_on_commit(
            [{"meterNo": meter.meter_no, "type": "balance", "balance": str(balance), "kind": kind}]
        )
        return Posting(entry, True, balance)


def ledger_credit(
    *,
    meter_no: str,
    units_kwh,
    idempotency_key: str,
    actor: str,
    reason: str = "",
    amount_kes=None,
) -> Posting:
    """Credit units bought with money (M-Pesa). Idempotent on `idempotency_key`."""
    units = _positive_kwh(units_kwh)
    amount = None
    if amount_kes is not None:
        amount = to_decimal(amount_kes, field="amount_kes", places=KES_QUANTUM)
        if amount <= 0:
            raise InvalidInput("amount_kes must be positive", field="amount_kes")
    return _post(
        meter_no=meter_no,
        kind=LedgerKind.PAYMENT_CREDIT,
        units_kwh=units,
        idempotency_key=idempotency_key,
        actor=actor,
        reason=reason,
        amount_kes=amount,
    )


def ledger_debit(
    *, meter_no: str, units_kwh, idempotency_key: str, actor: str = "meter", reason: str = ""
) -> Posting:
    """Debit consumed units. Idempotent on `idempotency_key`. The MQTT worker's batched path
    writes the same rows set-wise (mqtt_worker.ingest) under the same locks and keys."""
    units = _positive_kwh(units_kwh)
    return _post(
        meter_no=meter_no,
        kind=LedgerKind.CONSUMPTION_DEBIT,
        units_kwh=-units,
        idempotency_key=idempotency_key,
        actor=actor,
        reason=reason,
        amount_kes=None,
    )


def ledger_adjust(
    *, meter_no: str, units_kwh, reason: str, actor, idempotency_key: str | None = None
) -> Posting:
    """A staff correction: signed units, a reason and who did it. Also tells the meter."""
    units = to_decimal(units_kwh, field="units_kwh", places=KWH_QUANTUM)
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("An adjustment needs a reason", field="reason")
    actor_name = getattr(actor, "get_username", lambda: actor)()
    if not actor_name:
        raise InvalidInput("An adjustment needs the staff member who made it", field="actor")
    key = idempotency_key or f"adjust:{uuid.uuid4()}"
    with transaction.atomic():
        posting = _post(
            meter_no=meter_no,
            kind=LedgerKind.ADJUSTMENT,
            units_kwh=units,
            idempotency_key=key,
            actor=str(actor_name),
            reason=reason.strip(),
            amount_kes=None,
        )
        if posting.created:
            meter_command_queue_balance(meter_no=meter_no, reason="adjustment", actor=str(actor_name))
    return posting


def meter_command_queue_balance(*, meter_no: str, reason: str, actor: str = "system") -> MeterCommand:
    """Queue a balance command carrying the ledger balance and the register it accounts up to.

    The pair is read under the meter's lock so the meter's reconciliation
    (`local = balance − (myEnergyTotal − energyTotal)`) is exact.
    """
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        command = MeterCommand.objects.create(
            meter=meter,
            kind=CommandKind.BALANCE,
            cmd_id=uuid.uuid4().hex,
            reason=reason[:32],
            balance_kwh=meter.balance_kwh,
            energy_total_kwh=meter.last_energy_total_kwh,
            actor=actor[:150],
        )
        dispatch_commands_on_commit([command.pk])
    return command


def meter_command_queue_relay(*, meter_no: str, state: str, reason: str, actor: str) -> MeterCommand:
    """Staff override of a meter's relay: `on`, `off` or `auto` (on while balance > 0)."""
    if state not in RelayOverride.values:
        raise InvalidInput(f"Relay state must be one of {', '.join(RelayOverride.values)}", field="state")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("A relay command needs a reason", field="reason")
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        Meter.objects.filter(pk=meter.pk).update(relay_override=state)
        command = MeterCommand.objects.create(
            meter=meter,
            kind=CommandKind.RELAY,
            cmd_id=uuid.uuid4().hex,
            reason=reason.strip()[:32],
            relay_state=state,
            actor=str(actor)[:150],
        )
        dispatch_commands_on_commit([command.pk])
    return command


def tariff_create(*, name: str, kes_per_kwh, effective_from=None) -> Tariff:
    rate = to_decimal(kes_per_kwh, field="kes_per_kwh", places=Decimal("0.0001"))
    if rate <= 0:
        raise InvalidInput("kes_per_kwh must be positive", field="kes_per_kwh")
    return Tariff.objects.create(name=name, kes_per_kwh=rate, effective_from=effective_from or timezone.now())


@transaction.atomic
def customer_create(*, username: str, password: str, name: str, phone: str, email: str = "") -> Customer:
    User = get_user_model()
    if not username or User.objects.filter(username=username).exists():
        raise Conflict(f"Username {username!r} is taken or empty", field="username")
    if not name or not name.strip():
        raise InvalidInput("A customer needs a name", field="name")
    normalized = normalize_phone(phone)
    user = User(username=username, email=email or "")
    try:
        validate_password(password, user)
    except ValidationError as error:
        raise InvalidInput(" ".join(error.messages), field="password") from None
    user.set_password(password)
    user.save()
    return Customer.objects.create(user=user, name=name.strip(), phone=normalized)


def meter_provision(*, meter_no: str, owner: Customer | None, tariff: Tariff) -> Meter:
    validate_meter_no(meter_no)
    try:
        with transaction.atomic():
            return Meter.objects.create(meter_no=meter_no, owner=owner, tariff=tariff)
    except IntegrityError:
        raise Conflict(f"Meter {meter_no} already exists", field="meter_no") from None


def meter_update(*, meter_no: str, owner: Customer | None = None, tariff: Tariff | None = None) -> Meter:
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        fields = []
        if owner is not None:
            meter.owner = owner
            fields.append("owner")
        if tariff is not None:
            meter.tariff = tariff
            fields.append("tariff")
        if fields:
            meter.save(update_fields=fields)
        return meter


def firebase_mirror_mark(*, meter_ids: list[int], at=None) -> None:
    """Mark meters for the Firebase mirror (meters.models.FirebaseMirror): one row per meter,
    its version bumped by any number of changes, in one statement for the whole list.

    Call inside the transaction that changed the meters, so the mark commits with the change.
    """
    ids = sorted({int(meter_id) for meter_id in meter_ids})
    if not ids:
        return
    at = at or timezone.now()
    table = FirebaseMirror._meta.db_table
    upsert = (
        f" ON CONFLICT (meter_id) DO UPDATE SET version = {table}.version + 1, marked_at = excluded.marked_at"
    )
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"INSERT INTO {table} (meter_id, version, synced_version, marked_at)"
                " SELECT id, 1, 0, %s FROM unnest(%s::bigint[]) AS t(id)" + upsert,
                [at, ids],
            )
        else:
            cursor.executemany(
                f"INSERT INTO {table} (meter_id, version, synced_version, marked_at) VALUES (%s, 1, 0, %s)" + upsert,
                [(meter_id, at) for meter_id in ids],
            )
