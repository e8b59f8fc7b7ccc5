"""Writes to customers, meters, tariffs, the ledger and the command outbox.

Views, the API, admin actions, Celery tasks and payments call these functions; what meter reports
cause (readings, consumption debits, status events, the meter's reported state) is written by
`meters.consumption`, which queues its balance commands through `balance_commands_queue_locked`
here. Nothing outside `meters` writes these models.

Concurrency: a posting locks its meter row (`SELECT … FOR UPDATE`) before it reads or writes
anything else, so every posting on one meter is serialised and two postings never lock rows in
different orders (no deadlocks). The idempotency key is checked under that lock, and the unique
constraint on it is the backstop when two meters race for one key.
"""

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from core.broker_auth import mosquitto_hash, new_password
from core.errors import Conflict, InvalidInput, NotFound
from core.rules import KES_QUANTUM, KWH_QUANTUM, MAX_POSTING_KWH
from meters.events import send_meter_events_on_commit
from meters.models import (
    CommandKind,
    CommandStatus,
    Customer,
    FirebaseMirror,
    LedgerEntry,
    LedgerKind,
    Meter,
    MeterCommand,
    MeterCredential,
    RelayOverride,
    Tariff,
)
from meters.outbox import dispatch_commands_on_commit
from meters.phone import normalize_phone
from meters.selectors import tariff_rate_in_effect
from meters.validation import validate_meter_no

# `meter_update(owner=…)`: the difference between "leave the owner as it is" and "no owner".
UNCHANGED = object()
TARIFF_QUANTUM = Decimal("0.0001")


@dataclass(frozen=True)
class Posting:
    entry: LedgerEntry
    created: bool
    balance_kwh: Decimal
    # The balance command that tells the meter, for postings that queue one (None otherwise,
    # and for a repeated idempotency key, which changes nothing).
    command: MeterCommand | None = None


@dataclass(frozen=True)
class Purchase:
    """Money turned into units at the meter's tariff (`ledger_credit_purchase`)."""

    posting: Posting
    units_kwh: Decimal
    kes_per_kwh: Decimal
    remainder_kes: Decimal


@dataclass(frozen=True)
class OutgoingCommand:
    """A queued command, claimed for publishing: its exact payload is stored on the row."""

    id: int
    meter_no: str
    kind: str
    payload: bytes


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


def _post_entry_locked(
    meter: Meter,
    *,
    kind: str,
    units_kwh: Decimal,
    idempotency_key: str,
    actor: str,
    reason: str,
    amount_kes: Decimal | None,
    approved_by: str = "",
) -> Posting:
    """Append one entry to the ledger of `meter`, whose row the caller has locked."""
    key = _check_key(idempotency_key)
    if not actor:
        raise InvalidInput("An actor is required", field="actor")
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
                approved_by=approved_by[:150],
            )
    except IntegrityError:
        existing = LedgerEntry.objects.get(idempotency_key=key)
        _same_posting(existing, meter, kind, units_kwh)
        return Posting(existing, False, meter.balance_kwh)
    Meter.objects.filter(pk=meter.pk).update(balance_kwh=F("balance_kwh") + units_kwh)
    meter.balance_kwh += units_kwh
    # The Firebase mirror learns of every posting (payments, adjustments) in the same transaction.
    firebase_mirror_mark(meter_ids=[meter.pk])
    send_meter_events_on_commit(
        [{"meterNo": meter.meter_no, "type": "balance", "balance": str(meter.balance_kwh), "kind": kind}]
    )
    return Posting(entry, True, meter.balance_kwh)


def post_entry_and_tell_meter_locked(meter: Meter, *, command_reason: str, **entry) -> Posting:
    """A posting and the balance command that carries it to the meter (the caller holds the
    meter's lock; for meters' own services: purchases, adjustments, staff register decisions)."""
    posting = _post_entry_locked(meter, **entry)
    if not posting.created:
        return posting
    (command,) = balance_commands_queue_locked(
        meters=[(meter.pk, meter.balance_kwh, meter.last_energy_total_kwh, meter.reg_id)], reason=command_reason,
        actor=entry["actor"],
    )
    return Posting(posting.entry, True, posting.balance_kwh, command)


def ledger_credit(
    *,
    meter_no: str,
    units_kwh,
    idempotency_key: str,
    actor: str,
    reason: str = "",
    amount_kes=None,
) -> Posting:
    """Credit units (an opening balance, a simulator, tests). Idempotent on `idempotency_key`.
    Money is credited with `ledger_credit_purchase`, which prices it and tells the meter."""
    units = _positive_kwh(units_kwh)
    amount = None
    if amount_kes is not None:
        amount = to_decimal(amount_kes, field="amount_kes", places=KES_QUANTUM)
        if amount <= 0:
            raise InvalidInput("amount_kes must be positive", field="amount_kes")
    with transaction.atomic():
        return _post_entry_locked(
            meter_lock(meter_no=meter_no),
            kind=LedgerKind.PAYMENT_CREDIT,
            units_kwh=units,
            idempotency_key=idempotency_key,
            actor=actor,
            reason=reason,
            amount_kes=amount,
        )


def units_for_amount(*, amount_kes: Decimal, kes_per_kwh: Decimal) -> tuple[Decimal, Decimal]:
    """Units bought with `amount_kes` at `kes_per_kwh`, and the money rounding left over.

    The rule: units = amount / rate, rounded DOWN to the ledger's 6 places (the customer is never
    given energy that was not paid for). The remainder (amount − units × rate, exact, always
    below rate × 0.000001) is returned so it can be recorded with the payment and in the ledger
    entry's reason: nothing is lost silently.
    """
    if amount_kes <= 0 or kes_per_kwh <= 0:
        raise InvalidInput("Amount and tariff must be positive", field="amount_kes")
    units = (amount_kes / kes_per_kwh).quantize(KWH_QUANTUM, rounding=ROUND_DOWN)
    remainder = amount_kes - units * kes_per_kwh
    return units, remainder


def ledger_credit_purchase(
    *, meter_no: str, amount_kes: Decimal, idempotency_key: str, actor: str, reference: str
) -> Purchase:
    """Money received for a meter: priced at the tariff in effect, credited once (idempotent on
    `idempotency_key`) and carried to the meter by a balance command, all under one lock of the
    meter row. `reference` names the money in the ledger entry's reason (e.g. "M-Pesa NLJ7RT61SV")."""
    amount = to_decimal(amount_kes, field="amount_kes", places=KES_QUANTUM)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        rate = tariff_rate_in_effect(tariff=meter.tariff)
        units, remainder = units_for_amount(amount_kes=amount, kes_per_kwh=rate)
        if units <= 0:
            raise InvalidInput(f"KES {amount} buys no units at KES {rate}/kWh", field="amount_kes")
        reason = f"{reference}: KES {amount} at {rate}/kWh = {units} kWh"
        if remainder:
            reason += f" (remainder KES {remainder.normalize():f} not credited)"
        if meter.balance_kwh < 0:
            # The meter was in arrears: the credit pays them first (by arithmetic), said here so
            # that the statement shows it.
            reason += f"; {min(units, -meter.balance_kwh)} kWh pays arrears"
        posting = post_entry_and_tell_meter_locked(
            meter, command_reason="payment", kind=LedgerKind.PAYMENT_CREDIT, units_kwh=units,
            idempotency_key=idempotency_key, actor=actor, reason=reason, amount_kes=amount,
        )
    return Purchase(posting, units, rate, remainder)


def ledger_adjust(
    *, meter_no: str, units_kwh, reason: str, actor, idempotency_key: str | None = None, approved_by: str = ""
) -> Posting:
    """A staff correction: signed units, a reason and who did it (and, for a four-eyes
    adjustment, who approved it: meters.adjustments). Also tells the meter."""
    units = to_decimal(units_kwh, field="units_kwh", places=KWH_QUANTUM)
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("An adjustment needs a reason", field="reason")
    actor_name = getattr(actor, "get_username", lambda: actor)()
    if not actor_name:
        raise InvalidInput("An adjustment needs the staff member who made it", field="actor")
    with transaction.atomic():
        return post_entry_and_tell_meter_locked(
            meter_lock(meter_no=meter_no), command_reason="adjustment", kind=LedgerKind.ADJUSTMENT, units_kwh=units,
            idempotency_key=idempotency_key or f"adjust:{uuid.uuid4()}", actor=str(actor_name), reason=reason.strip(),
            amount_kes=None, approved_by=approved_by,
        )


# ---- the command outbox -----------------------------------------------------------------------


def balance_commands_queue_locked(
    *, meters: Iterable[tuple[int, Decimal, Decimal | None, str]], reason: str, actor: str, at: datetime | None = None
) -> list[MeterCommand]:
    """Queue one balance command per (meter id, ledger balance, accounted register, register
    history), for meters whose rows the caller has locked, so that the three are consistent (the
    meter reconciles with `local = balance − (myEnergyTotal − energyTotal)` for its own regId
    only). A provisional or implicit history has no regId on the wire. Published after commit."""
    commands = MeterCommand.objects.bulk_create(
        MeterCommand(
            meter_id=meter_id, kind=CommandKind.BALANCE, cmd_id=uuid.uuid4().hex, reason=reason[:32],
            balance_kwh=balance, energy_total_kwh=energy_total, actor=actor[:150], issued_at=at or timezone.now(),
            reg_id=reg_id if reg_id and not reg_id.startswith("~") else "",
        )
        for meter_id, balance, energy_total, reg_id in meters
    )
    dispatch_commands_on_commit([command.pk for command in commands])
    return commands


def meter_command_queue_balance(*, meter_no: str, reason: str, actor: str = "system") -> MeterCommand:
    """Queue a balance command carrying the ledger balance and the register it accounts up to."""
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        (command,) = balance_commands_queue_locked(
            meters=[(meter.pk, meter.balance_kwh, meter.last_energy_total_kwh, meter.reg_id)], reason=reason, actor=actor
        )
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


def meter_commands_claim(*, command_ids: list[int], encode: Callable[[MeterCommand], bytes]) -> list[OutgoingCommand]:
    """Claim queued commands for publishing: older queued balance commands of the same meters are
    superseded (the newest carries the current balance), each command gets its payload once
    (`encode`, the wire format's business) and its attempt is counted. Rows another publisher
    holds are skipped."""
    with transaction.atomic():
        commands = list(
            MeterCommand.objects.select_for_update(skip_locked=True)
            .filter(id__in=command_ids, status=CommandStatus.QUEUED)
            .select_related("meter")
            .order_by("id")
        )
        balance_meters = {c.meter_id for c in commands if c.kind == CommandKind.BALANCE}
        queued_balance = MeterCommand.objects.filter(
            meter_id__in=balance_meters, kind=CommandKind.BALANCE, status=CommandStatus.QUEUED
        )
        newest: dict[int, int] = {}
        for meter_id, command_id in queued_balance.values_list("meter_id", "id"):
            newest[meter_id] = max(command_id, newest.get(meter_id, 0))
        if balance_meters:
            queued_balance.exclude(id__in=newest.values()).update(status=CommandStatus.SUPERSEDED)
        claimed = []
        for command in commands:
            if command.kind == CommandKind.BALANCE and command.id != newest.get(command.meter_id):
                continue
            payload = command.payload.encode() if command.payload else encode(command)
            MeterCommand.objects.filter(id=command.id).update(payload=payload.decode(), attempts=F("attempts") + 1)
            claimed.append(OutgoingCommand(command.id, command.meter.meter_no, command.kind, payload))
    return claimed


def meter_commands_mark_sent(*, command_ids: list[int], at: datetime | None = None) -> int:
    """The broker acknowledged these (PUBACK). Conditional: a meter may have acknowledged a
    command before its PUBACK was processed here."""
    if not command_ids:
        return 0
    return MeterCommand.objects.filter(id__in=command_ids, status=CommandStatus.QUEUED).update(
        status=CommandStatus.SENT, sent_at=at or timezone.now()
    )


# ---- customers, tariffs, meters ----------------------------------------------------------------


def tariff_create(*, name: str, kes_per_kwh, effective_from=None) -> Tariff:
    """A price from a date. Tariffs are history: a price change is a new row with the same name
    from its date (meters on that tariff pay it from then on), never an edit of an old row."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("A tariff needs a name", field="name")
    rate = to_decimal(kes_per_kwh, field="kes_per_kwh", places=TARIFF_QUANTUM)
    if rate <= 0:
        raise InvalidInput("kes_per_kwh must be positive", field="kes_per_kwh")
    effective_from = effective_from or timezone.now()
    if Tariff.objects.filter(name=name.strip(), effective_from=effective_from).exists():
        raise Conflict(f"Tariff {name} already has a price from {effective_from}", field="effective_from")
    return Tariff.objects.create(name=name.strip(), kes_per_kwh=rate, effective_from=effective_from)


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


def customer_update(*, customer_id: int, name: str, phone: str) -> Customer:
    """Staff correct a customer's name or M-Pesa number (the sign-in account is the user's own)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("A customer needs a name", field="name")
    normalized = normalize_phone(phone)
    with transaction.atomic():
        customer = Customer.objects.select_for_update().filter(pk=customer_id).first()
        if customer is None:
            raise NotFound(f"Unknown customer {customer_id}", field="customer_id")
        customer.name, customer.phone = name.strip(), normalized
        customer.save(update_fields=["name", "phone"])
    return customer


def _rated_power(value) -> Decimal:
    rated = to_decimal(value, field="rated_max_kw", places=Decimal("0.001"))
    if not Decimal("0.1") <= rated <= Decimal("1000"):
        raise InvalidInput("rated_max_kw must be between 0.1 and 1000 kW", field="rated_max_kw")
    return rated


def meter_provision(
    *, meter_no: str, owner: Customer | None, tariff: Tariff, rated_max_kw=None, actor: str = "provisioning"
) -> Meter:
    """A new meter with its MQTT credential. The password exists in clear only on the returned
    object (`meter.issued_password`), for the admin and the API to show once; it is not stored."""
    validate_meter_no(meter_no)
    extra = {} if rated_max_kw is None else {"rated_max_kw": _rated_power(rated_max_kw)}
    try:
        with transaction.atomic():
            meter = Meter.objects.create(meter_no=meter_no, owner=owner, tariff=tariff, **extra)
            meter.issued_password = _credential_issue_locked(meter, actor=actor)
            return meter
    except IntegrityError:
        raise Conflict(f"Meter {meter_no} already exists", field="meter_no") from None


def meter_provision_many(*, meter_nos: list[str], tariff: Tariff) -> int:
    """Provision a fleet without owners in few statements (an import, a benchmark); refuses the
    whole list if any number is invalid or already exists. No MQTT credentials are issued here
    (nobody could see them): staff issue each meter's with `meter_credential_issue`."""
    for meter_no in meter_nos:
        validate_meter_no(meter_no)
    try:
        with transaction.atomic():
            return len(Meter.objects.bulk_create([Meter(meter_no=n, tariff=tariff) for n in meter_nos], batch_size=5000))
    except IntegrityError:
        raise Conflict("Some of these meters already exist", field="meter_no") from None


def meter_update(*, meter_no: str, owner=UNCHANGED, tariff=UNCHANGED, rated_max_kw=UNCHANGED) -> Meter:
    """Change a meter's owner (None: no owner), tariff or rated power (the physical bound on a
    debit, meters.consumption.rules); an argument left out stays as it is."""
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        fields = []
        if rated_max_kw is not UNCHANGED:
            meter.rated_max_kw = _rated_power(rated_max_kw)
            fields.append("rated_max_kw")
        if owner is not UNCHANGED:
            meter.owner = owner
            fields.append("owner")
        if tariff is not UNCHANGED:
            if tariff is None:
                raise InvalidInput("A meter needs a tariff", field="tariff")
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


# ---- MQTT credentials (meters.MeterCredential; the broker's files: `manage.py mqtt_auth`) ------


def _credential_issue_locked(meter: Meter, *, actor: str) -> str:
    password = new_password()
    now = timezone.now()
    MeterCredential.objects.update_or_create(
        meter=meter,
        defaults={"password_hash": mosquitto_hash(password), "issued_at": now, "issued_by": str(actor)[:150],
                  "revoked_at": None, "revoked_by": "", "changed_at": now},
    )
    return password


def meter_credential_issue(*, meter_no: str, actor) -> str:
    """A new MQTT password for the meter (first issue, rotation or re-issue after a revocation);
    the old one stops working at the broker's next reload. Returns the password: the only time
    it exists in clear (it is to be shown once and put on the device)."""
    with transaction.atomic():
        return _credential_issue_locked(meter_lock(meter_no=meter_no), actor=_actor_name(actor))


def meter_credential_revoke(*, meter_no: str, actor) -> MeterCredential:
    """The meter may no longer connect: its hash is dropped (the row stays, saying who and when).
    The broker disconnects it at its next reload (`mqtt_auth export --reload` / `watch`)."""
    name = _actor_name(actor)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        now = timezone.now()
        credential, _ = MeterCredential.objects.update_or_create(
            meter=meter,
            defaults={"password_hash": "", "revoked_at": now, "revoked_by": name, "changed_at": now},
            create_defaults={"password_hash": "", "issued_by": name, "revoked_at": now, "revoked_by": name,
                             "changed_at": now},
        )
    return credential


def _actor_name(actor) -> str:
    name = str(getattr(actor, "get_username", lambda: actor)() or "")
    if not name:
        raise InvalidInput("Say who does this", field="actor")
    return name[:150]
