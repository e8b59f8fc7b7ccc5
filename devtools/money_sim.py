"""A deterministic simulation of the whole money system, with faults, checked after every step.

    python -m devtools.money_sim --seeds 200          (make soak SEEDS=200)
    python -m devtools.money_sim --seed 17            replay one seed (a failure prints this)

One seed is one seeded random walk (random.Random(seed)) through the real services on
PostgreSQL:
- meters run the firmware core's Python port (devtools.sim.meter_core) with a household load
  behind the relay: consumption, reboots, stored state wiped, the board replaced under the same
  meterNo, the energy sensor reset, offline buffering, clocks without NTP; as firmware meters
  (seq, energyTotal, regId on the wire), legacy ones (no regId) and seed-only ones (neither seq
  nor energyTotal; some with a boot counter);
- a broker model between them and the worker's ingest (mqtt_worker.ingest.ingest_batch, the
  real code) that duplicates, delays and reorders, loses QoS 0 messages, and a worker that dies
  between commit and ack (the batch is redelivered); a command publisher (the real outbox
  services) that dies mid-run, and commands that reach the meter late or twice;
- M-Pesa through the fake Daraja (devtools.fake_daraja, in-process over HTTP) and the real
  payments services: success, cancel, timeout, insufficient funds, callbacks twice, never (the
  STK query settles it), late and out of order, the C2B confirmation of the same money before or
  after the callback, a push request whose answer is lost after Safaricom accepted it, a success
  that matches nothing, Paybill payments from the M-Pesa menu, a callback stored but never
  processed (the sweeper finds it), staff resolving what needs review.

After every step the invariants hold (Invariants.check):
1. every balance equals the sum of its ledger (meters.selectors.ledger_mismatches);
2. no money (an M-Pesa receipt Safaricom took) is credited more than once, and nothing is
   credited that Safaricom did not take; at the end of the seed, once every route has been
   delivered, each is credited exactly once or sits in the staff queue, and after staff resolve
   the queue, each is credited exactly once;
3. no meter is debited more than its core measured, nor less than what the reports the backend
   has ingested prove (per register history: highest register − lowest start; seed-only: the
   units of distinct reports; minus what a seed-only meter's repeated identities hide and what
   is held for staff);
4. at the end, a meter that applies the latest balance command agrees with the ledger, less what
   it measured after its last ingested report (within the tolerance);
5. `ledger_check` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE_KWH = Decimal("0.001")
KES_PER_KWH = Decimal("25")
START_UNIX_MS = 1_780_000_000_000


class InvariantViolated(AssertionError):
    pass


# ---- the broker model ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One message a meter handed to the broker, and what the simulation knows of it."""

    topic: str
    payload: bytes
    qos: int
    meter_no: str
    history: tuple[str, int] | None = None  # (meter, the true register generation) of a report
    report: dict | None = None


class Broker:
    """Meter → worker messages wait here until a batch takes them: possibly out of order, some
    twice, QoS 0 ones possibly never."""

    def __init__(self, rng: random.Random, faults: Counter):
        self.rng, self.faults = rng, faults
        self.up: list[Sent] = []
        self.down: dict[str, list[tuple[str, bytes]]] = {}

    def publish_up(self, sent: Sent) -> None:
        if sent.qos == 0 and self.rng.random() < 0.05:
            self.faults["broker_lost_qos0"] += 1
            return
        self.up.append(sent)
        if sent.qos == 1 and self.rng.random() < 0.05:
            self.faults["broker_duplicate"] += 1
            self.up.insert(self.rng.randrange(len(self.up) + 1), sent)

    def take(self, limit: int) -> list[Sent]:
        if not self.up:
            return []
        if self.rng.random() < 0.2:
            self.faults["broker_reorder"] += 1
            self.rng.shuffle(self.up)
        batch, self.up = self.up[:limit], self.up[limit:]
        return batch


# ---- meters --------------------------------------------------------------------------------------


class SimMeter:
    """A meter as the firmware port runs it, with its hardware (clock, NVS, ring, sensor, load)."""

    def __init__(self, sim: Simulation, meter_no: str, mode: str, *, ntp: bool, boot_counter: bool):
        from devtools.sim.meter_core import ManualClock, MemoryKvStore, ReportBuffer

        self.sim, self.meter_no, self.mode, self.ntp, self.boot_counter = sim, meter_no, mode, ntp, boot_counter
        self.clock = ManualClock(sim.rng.randrange(0, 2**32))
        self.kv = MemoryKvStore()
        self.buffer = ReportBuffer(16)
        self.register = sim.rng.uniform(0, 3000)  # the PZEM's own register (kWh)
        self.power_kw = sim.rng.uniform(0.3, 3.0)
        self.relay_closed = False
        self.connected = False
        self.boots = 0
        self.generation = 0  # the true register history: a new one when the core starts from scratch
        self.measured = Decimal(0)  # what the core billed, over every board and boot
        self.core = None
        self._boot("poweron")

    def _boot(self, reason: str) -> None:
        from devtools.sim.meter_core import MeterConfig, MeterCore

        self.boots += 1
        self.clock.restart(self.sim.rng.randrange(0, 2**32))
        if self.ntp:
            self.clock.sync(self.sim.now_ms)
        previous = self.core.reg_id if self.core is not None else None
        self.core = MeterCore(
            MeterConfig(meter_no=self.meter_no, fw_version="sim", report_interval_ms=30_000, status_interval_ms=300_000),
            self.clock, self.kv, self.buffer, self._publish, self._set_relay, lambda: round(self.register, 3), reason,
            random32=lambda: self.sim.rng.getrandbits(32),
        )
        self.core.begin()
        if previous is not None and self.core.reg_id != previous:
            self.generation += 1  # the core started its register from scratch: a new true history
        self._billed = self.core.energy_total

    def _set_relay(self, closed: bool) -> None:
        self.relay_closed = closed

    def _publish(self, topic: str, payload: str, qos: int, retain: bool) -> bool:
        if not self.connected:
            return False
        data = json.loads(payload)
        if topic.endswith("/consumption"):
            if self.mode != "firmware":
                data.pop("regId", None)
            if self.mode == "seed":
                for name in ("seq", "energyTotal", "regId"):
                    data.pop(name, None)
                if self.boot_counter:
                    data["boot"] = self.boots
            sent = Sent(topic, json.dumps(data).encode(), qos, self.meter_no, (self.meter_no, self.generation), data)
        else:
            if self.mode != "firmware":
                data.pop("regId", None)
            sent = Sent(topic, json.dumps(data).encode(), qos, self.meter_no)
        self.sim.broker.publish_up(sent)
        return True

    def _track(self) -> None:
        # What the core billed: the growth of its register (a new history starts from zero).
        now = self.core.energy_total
        if now > self._billed:
            self.measured += Decimal(repr(now - self._billed))
        self._billed = now

    def run(self, ms: int) -> None:
        """Advance time: the household draws power while the relay is closed."""
        step = 1000
        for _ in range(ms // step):
            if self.relay_closed:
                self.register += self.power_kw * step / 3_600_000
            self.clock.advance(step)
            self.core.loop()
            self._track()
        self.power_kw = min(max(self.power_kw * self.sim.rng.uniform(0.8, 1.2), 0.2), 4.0)

    def connect(self) -> None:
        if not self.connected:
            self.connected = True
            self.core.on_connected()
            self._track()

    def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.core.on_disconnected()

    def deliver(self, topic: str, payload: bytes) -> None:
        if self.connected:
            self.core.on_message(topic, payload)
            self._track()

    # -- faults --

    def reboot(self) -> None:
        self.sim.faults["meter_reboot"] += 1
        was = self.connected
        self.disconnect()
        self._boot("software")
        if was:
            self.connect()

    def wipe_state(self) -> None:
        """The stored state is lost (NVS erased): the register starts from scratch."""
        from devtools.sim.meter_core import MemoryKvStore

        self.sim.faults["meter_state_wiped"] += 1
        was = self.connected
        self.disconnect()
        self.kv = MemoryKvStore()
        self._boot("poweron")
        if was:
            self.connect()

    def swap_board(self) -> None:
        """The ESP32 board is replaced under the same meterNo: empty NVS and ring, same sensor."""
        from devtools.sim.meter_core import MemoryKvStore, ReportBuffer

        self.sim.faults["meter_board_swapped"] += 1
        self.disconnect()
        self.kv, self.buffer = MemoryKvStore(), ReportBuffer(16)
        self._boot("poweron")
        self.connect()

    def reset_sensor(self) -> None:
        self.sim.faults["meter_sensor_reset"] += 1
        self.register = 0.0


# ---- M-Pesa -----------------------------------------------------------------------------------------


@dataclass
class Money:
    """Money Safaricom took: its receipt, amount and meter, and the push it belongs to."""

    receipt: str
    amount: Decimal
    meter_no: str | None
    checkout: str | None = None
    payment_id: int | None = None
    routes: list[str] = field(default_factory=list)  # still to be delivered: "stk", "stk2", "c2b"


class Mpesa:
    def __init__(self, sim: Simulation):
        from devtools.fake_daraja import FakeDaraja, serve

        self.sim = sim
        self.fake = FakeDaraja(consumer_key="sim-key", consumer_secret="sim-secret",
                               passkey="bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
                               outcome="hold", delay=0)
        self.server = serve(self.fake, "127.0.0.1", 0)
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.monies: list[Money] = []
        self.pushes: dict[int, tuple[dict, str]] = {}  # payment id → (fake transaction, outcome), undelivered

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _receipt(self) -> str:
        return "SIM" + "".join(self.sim.rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", k=7))

    def push(self, meter: SimMeter) -> None:
        from core.errors import Conflict
        from payments import services

        rng = self.sim.rng
        outcome = rng.choices(["success", "cancelled", "timeout", "insufficient"], [6, 1, 1, 1])[0]
        answer = "drop" if rng.random() < 0.15 else "ok"
        amount = Decimal(rng.choice([20, 50, 100, 250]))
        self.fake.control("next", {"outcome": outcome, "answer": answer, "deliver": False, "delay": 0})
        try:
            payment = services.stk_push_start(user=self.sim.staff, meter_no=meter.meter_no, phone="0712345678",
                                              amount_kes=amount)
        except Conflict:
            self.fake.script.clear()
            return
        self.sim.faults[f"mpesa_push_{outcome}"] += 1
        if answer == "drop":
            self.sim.faults["mpesa_push_answer_lost"] += 1
        transaction = list(self.fake.transactions.values())[-1]
        self.pushes[payment.pk] = (transaction, outcome)
        if outcome == "success":
            routes = ["stk"]
            if rng.random() < 0.15:
                routes.append("stk2")  # the callback twice
            if rng.random() < 0.3:
                routes.append("c2b")  # the same money as a C2B confirmation
                self.sim.faults["mpesa_same_money_by_c2b"] += 1
            if rng.random() < 0.15:
                routes.remove("stk")  # the callback never comes: only a query or the confirmation tell
                routes = routes or ["query"]
                self.sim.faults["mpesa_callback_never"] += 1
            self.monies.append(Money(transaction["receipt"], amount, meter.meter_no, transaction["checkout"], payment.pk,
                                     routes))
        else:  # no money: a failure callback, or only a query tells
            self.monies.append(Money("", Decimal(0), meter.meter_no, transaction["checkout"], payment.pk,
                                     ["stk"] if rng.random() < 0.8 else ["query"]))

    def paybill(self, meter: SimMeter) -> None:
        """A customer pays from the M-Pesa menu: only a C2B confirmation tells."""
        self.sim.faults["mpesa_paybill"] += 1
        amount = Decimal(self.sim.rng.choice([30, 60, 120]))
        self.monies.append(Money(self._receipt(), amount, meter.meter_no, None, None, ["c2b"]))

    def unmatched(self) -> None:
        """A success callback for a push we never made (money received, matched to nothing)."""
        self.sim.faults["mpesa_unmatched_success"] += 1
        self.monies.append(Money(self._receipt(), Decimal(40), None, f"ws_CO_SIM{self.sim.rng.randrange(10**9)}", None,
                                 ["stk"]))

    def deliver_one(self) -> None:
        """Deliver one outstanding route of one money, in random order (late, out of order)."""
        waiting = [m for m in self.monies if m.routes]
        if not waiting:
            return
        money = self.sim.rng.choice(waiting)
        route = money.routes.pop(self.sim.rng.randrange(len(money.routes)))
        self.sim.faults[f"mpesa_route_{route}"] += 1
        if route in ("stk", "stk2"):
            body = self._stk_body(money)
            self._callback("stk", body)
        elif route == "c2b":
            self._callback("c2b_confirmation", self._c2b_body(money))
        else:
            self.query(money)

    def _stk_body(self, money: Money) -> str:
        if money.payment_id is not None:
            transaction, _ = self.pushes[money.payment_id]
            return self.fake.stk_callback_body(transaction)
        return json.dumps({"Body": {"stkCallback": {
            "MerchantRequestID": "sim", "CheckoutRequestID": money.checkout, "ResultCode": 0,
            "ResultDesc": "The service request is processed successfully.",
            "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": float(money.amount)}, {"Name": "MpesaReceiptNumber", "Value": money.receipt},
                {"Name": "TransactionDate", "Value": 20260101120000}, {"Name": "PhoneNumber", "Value": 254799000111}]}}}})

    def _c2b_body(self, money: Money) -> str:
        from devtools.fake_daraja import eat_timestamp

        return json.dumps({
            "TransactionType": "Pay Bill", "TransID": money.receipt, "TransTime": eat_timestamp(),
            "TransAmount": f"{money.amount:.2f}", "BusinessShortCode": "174379", "BillRefNumber": money.meter_no,
            "InvoiceNumber": "", "OrgAccountBalance": "0.00", "ThirdPartyTransID": "", "MSISDN": "2547 ***** 678",
            "FirstName": "SIM", "MiddleName": "", "LastName": "",
        })

    def _callback(self, kind: str, body: str) -> None:
        from payments import services

        callback = services.callback_record(kind=kind, body=body.encode(), remote_addr="127.0.0.1")
        if not self.sim.quiet and self.sim.rng.random() < 0.15:
            self.sim.faults["crash_callback_stored_not_processed"] += 1
            return  # the web process died right after storing it: the sweeper finds it
        services.callback_process(callback_id=callback.pk)

    def query(self, money: Money | None = None) -> None:
        """Reconciliation: the STK push query for an open push (as the beat task would)."""
        from payments import services
        from payments.models import Payment, PaymentStatus

        open_pushes = list(Payment.objects.filter(
            checkout_request_id__isnull=False, status__in=[PaymentStatus.PENDING, PaymentStatus.NEEDS_REVIEW],
            channel="stk", meter__isnull=False,
        ).values_list("pk", flat=True))
        if money is not None and money.payment_id in open_pushes:
            pk = money.payment_id
        elif open_pushes:
            pk = self.sim.rng.choice(open_pushes)
        else:
            return
        self.sim.faults["mpesa_query"] += 1
        services.payment_query(payment_id=pk)

    def sweep(self) -> None:
        from payments import services
        from payments.models import Callback

        Callback.objects.filter(status="received").update(received_at=self.sim.clock() - timedelta(minutes=10))
        self.sim.faults["mpesa_sweeps"] += 1
        services.callbacks_sweep()


# ---- the simulation ------------------------------------------------------------------------------------


class Simulation:
    def __init__(self, seed: int, steps: int):
        from django.contrib.auth import get_user_model
        from django.utils import timezone

        from meters import services

        self.seed, self.steps = seed, steps
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.broker = Broker(self.rng, self.faults)
        self.clock = timezone.now
        self.now_ms = START_UNIX_MS
        self.tariff = services.tariff_create(name=f"Sim{seed}", kes_per_kwh=KES_PER_KWH)
        self.meters: list[SimMeter] = []
        # Staff may push for any meter (and resolve what needs review): no customer accounts needed.
        self.staff, _ = get_user_model().objects.get_or_create(username=f"simstaff{seed}", defaults={"is_staff": True})
        modes = ["firmware", "firmware", "legacy", "seed"]
        for index, mode in enumerate(modes):
            meter_no = f"S{seed}M{index}"
            services.meter_provision(meter_no=meter_no, owner=None, tariff=self.tariff)
            ntp = mode != "seed" or self.rng.random() < 0.5
            meter = SimMeter(self, meter_no, mode, ntp=ntp, boot_counter=not ntp and self.rng.random() < 0.5)
            meter.connect()
            self.meters.append(meter)
        self.mpesa = Mpesa(self)
        self.ingested: list[Sent] = []
        self.steps_run = 0
        # At the end no process crashes any more: everything in flight is delivered.
        self.quiet = False

    def close(self) -> None:
        self.mpesa.close()

    # -- the worker and the publisher --

    def ingest(self) -> None:
        from mqtt_worker.ingest import Message, ingest_batch

        batch = self.broker.take(self.rng.randint(1, 40))
        if not batch:
            return
        ingest_batch([Message(s.topic, s.payload) for s in batch], client_id="sim")
        if not self.quiet and self.rng.random() < 0.1:
            # The worker died between commit and ack: the broker delivers the batch again.
            self.faults["crash_worker_before_ack"] += 1
            self.broker.up[:0] = batch
        self.ingested.extend(s for s in batch if s.history is not None)

    def publish_commands(self) -> None:
        from meters.selectors import meter_commands_pending
        from meters.services import meter_commands_claim, meter_commands_mark_sent
        from mqtt_worker.codec import command_topic
        from mqtt_worker.publisher import _payload

        ids = meter_commands_pending(queued_before=self.clock() + timedelta(days=1), limit=100)
        if not ids:
            return
        claimed = meter_commands_claim(command_ids=ids, encode=_payload)
        if not self.quiet and self.rng.random() < 0.1:
            self.faults["crash_publisher_mid_run"] += 1
            return  # claimed (attempt counted, payload fixed) but never published: the sweep retries
        for command in claimed:
            topic = command_topic(command.meter_no, command.kind)
            self.broker.down.setdefault(command.meter_no, []).append((topic, command.payload))
            if self.rng.random() < 0.05:
                self.faults["broker_command_duplicate"] += 1
                self.broker.down[command.meter_no].append((topic, command.payload))
        meter_commands_mark_sent(command_ids=[c.id for c in claimed])

    def deliver_commands(self) -> None:
        for meter in self.meters:
            queue = self.broker.down.get(meter.meter_no, [])
            while queue and meter.connected:
                topic, payload = queue.pop(0)
                meter.deliver(topic, payload)

    # -- a step --

    def step(self) -> None:
        rng = self.rng
        meter = rng.choice(self.meters)
        action = rng.choices(
            ["run", "ingest", "commands", "pay", "deliver_money", "query", "sweep", "offline", "online", "paybill",
             "reboot", "wipe", "swap", "sensor", "unmatched"],
            [30, 25, 8, 6, 14, 2, 2, 3, 4, 1, 2, 0.7, 0.5, 0.7, 0.4],
        )[0]
        if action == "run":
            ms = rng.choice([30_000, 60_000, 120_000])
            self.now_ms += ms
            for m in self.meters:
                m.run(ms)
        elif action == "ingest":
            self.ingest()
        elif action == "commands":
            self.publish_commands()
            self.deliver_commands()
        elif action == "pay":
            self.mpesa.push(meter)
        elif action == "deliver_money":
            self.mpesa.deliver_one()
        elif action == "query":
            self.mpesa.query()
        elif action == "sweep":
            self.mpesa.sweep()
        elif action == "offline":
            self.faults["meter_offline"] += 1
            meter.disconnect()
        elif action == "online":
            meter.connect()
            self.deliver_commands()
        elif action == "paybill":
            self.mpesa.paybill(meter)
        elif action == "reboot":
            meter.reboot()
        elif action == "wipe":
            meter.wipe_state()
        elif action == "swap":
            meter.swap_board()
        elif action == "sensor":
            meter.reset_sensor()
        elif action == "unmatched":
            self.mpesa.unmatched()
        self.steps_run += 1
        Invariants(self).check(final=False)

    def finish(self) -> None:
        """Quiescence: every meter online, everything delivered and ingested, staff resolve."""
        self.quiet = True
        for meter in self.meters:
            meter.connect()
        for _ in range(50):
            for money in self.mpesa.monies:
                while money.routes:
                    self.mpesa.deliver_one()
            self.mpesa.sweep()
            self.checking_to_review()
            while self.broker.up:
                self.ingest()
            self.publish_commands()
            self.deliver_commands()
            if not self.broker.up and not any(self.broker.down.values()) and not any(m.routes for m in self.mpesa.monies):
                break
        Invariants(self).check(final=True)
        self.resolve_staff_queue()
        Invariants(self).check(final=True, resolved=True)
        self.check_meters_agree()

    def checking_to_review(self) -> None:
        """Pushes still `checking` when nothing more will come: as if their review delay passed."""
        from payments import services
        from payments.models import Payment

        stale = self.clock() - timedelta(seconds=services.CHECKING_REVIEW_AFTER_S + 60)
        if Payment.objects.filter(status="checking").update(created_at=stale):
            services.payments_reconcile()

    def resolve_staff_queue(self) -> None:
        """Staff resolve every payment needing review, as the admin lets them, in one action each."""
        from payments import services
        from payments.models import Payment

        staff = self.staff
        for payment in Payment.objects.filter(status="needs_review").order_by("id"):
            money = self._money_of(payment)
            if money is None or not money.receipt:
                services.payment_resolve_close(payment_id=payment.pk, actor=staff, note="no money behind it")
                continue
            credited = Invariants(self).credits(money)
            if credited:
                primary = _payment_with_entry(credited[0])
                services.payment_resolve_same_money(payment_id=payment.pk, actor=staff, note="same money",
                                                    same_as_id=primary)
            else:
                services.payment_resolve_credit(payment_id=payment.pk, actor=staff, note="money seen in the portal",
                                                meter_no=money.meter_no or self.meters[0].meter_no)
            self.faults["staff_resolutions"] += 1

    def _money_of(self, payment) -> Money | None:
        for money in self.mpesa.monies:
            if money.receipt and payment.mpesa_receipt == money.receipt:
                return money
            if money.payment_id == payment.pk or (money.checkout and money.checkout == payment.checkout_request_id):
                return money
        return None

    def check_meters_agree(self) -> None:
        from meters import services
        from meters.models import Meter

        for meter in self.meters:
            meter.core.loop()
            while self.broker.up:
                self.ingest()
            services.meter_command_queue_balance(meter_no=meter.meter_no, reason="sim-final")
            self.publish_commands()
            self.deliver_commands()
            ledger = Meter.objects.get(meter_no=meter.meter_no).balance_kwh
            last = self._last_ingested_register(meter)
            unreported = Decimal(repr(meter.core.energy_total)) - last if last is not None else Decimal(0)
            expected = ledger - unreported
            local = Decimal(repr(meter.core.balance))
            if abs(local - expected) > Decimal("0.01") + TOLERANCE_KWH:
                raise InvariantViolated(
                    f"{meter.meter_no} ({meter.mode}) local balance {local} disagrees with the ledger {ledger} "
                    f"less {unreported} kWh unreported (expected {expected})")

    def _last_ingested_register(self, meter: SimMeter) -> Decimal | None:
        if meter.mode == "seed":
            return None
        registers = [Decimal(str(s.report["energyTotal"])) for s in self.ingested
                     if s.history == (meter.meter_no, meter.generation)]
        return max(registers) if registers else None


def _payment_with_entry(entry_id: int) -> int:
    from payments.models import Payment

    return Payment.objects.filter(ledger_entry_id=entry_id, same_money_as__isnull=True).values_list("pk", flat=True).first()


class Invariants:
    def __init__(self, sim: Simulation):
        self.sim = sim

    def fail(self, message: str) -> None:
        raise InvariantViolated(message)

    def credits(self, money: Money) -> list[int]:
        """Distinct ledger entries that credited this money."""
        from meters.models import LedgerEntry
        from payments.models import Payment

        keys = {f"mpesa:{money.receipt}"} if money.receipt else set()
        if money.checkout:
            keys.add(f"mpesa:checkout:{money.checkout}")
        payments = Payment.objects.filter(mpesa_receipt=money.receipt) if money.receipt else Payment.objects.none()
        pks = set(payments.values_list("pk", flat=True))
        if money.payment_id:
            pks.add(money.payment_id)
        keys.update(f"mpesa:review:{pk}" for pk in pks)
        return list(LedgerEntry.objects.filter(idempotency_key__in=keys).values_list("pk", flat=True))

    def check(self, *, final: bool, resolved: bool = False) -> None:
        from django.db.models import Sum

        from meters.models import LedgerEntry, LedgerKind, Meter, RegisterHistory
        from meters.selectors import ledger_mismatches
        from payments.models import Payment

        mismatches = ledger_mismatches()
        if mismatches:
            self.fail(f"balances differ from their ledgers: {mismatches}")
        # 2. money.
        real = 0
        for money in self.sim.mpesa.monies:
            if not money.receipt:
                continue
            credits = self.credits(money)
            if len(credits) > 1:
                self.fail(f"money {money.receipt} (KES {money.amount}) credited {len(credits)} times: entries {credits}")
            real += len(credits)
            if final and not credits:
                waiting = Payment.objects.filter(status="needs_review", mpesa_receipt=money.receipt).exists() or (
                    money.payment_id and Payment.objects.filter(pk=money.payment_id, status="needs_review").exists())
                if resolved or not waiting:
                    self.fail(f"money {money.receipt} (KES {money.amount}, routes delivered) neither credited nor "
                              "waiting for staff")
        meter_ids = Meter.objects.filter(meter_no__in=[m.meter_no for m in self.sim.meters]).values_list("pk", flat=True)
        mpesa_credits = LedgerEntry.objects.filter(meter_id__in=meter_ids, kind=LedgerKind.PAYMENT_CREDIT).count()
        if mpesa_credits != real:
            self.fail(f"{mpesa_credits} M-Pesa credits in the ledger for {real} credited monies: a credit from nowhere")
        # 3. energy.
        for meter in self.sim.meters:
            row = Meter.objects.get(meter_no=meter.meter_no)
            debited = -(LedgerEntry.objects.filter(meter=row, kind=LedgerKind.CONSUMPTION_DEBIT)
                        .aggregate(total=Sum("units_kwh"))["total"] or Decimal(0))
            reports = sum(1 for s in self.sim.ingested if s.meter_no == meter.meter_no)
            slack = TOLERANCE_KWH + Decimal("0.000001") * reports
            if debited > meter.measured + slack:
                self.fail(f"{meter.meter_no} ({meter.mode}) debited {debited} kWh, more than it measured "
                          f"({meter.measured} kWh)")
            held = row.energy_held_kwh + (RegisterHistory.objects.filter(meter=row, current=False)
                                          .aggregate(total=Sum("held_kwh"))["total"] or Decimal(0))
            proven = self.proven(meter)
            if debited + held < proven - slack:
                self.fail(f"{meter.meter_no} ({meter.mode}) debited {debited} kWh (+{held} held), less than its "
                          f"ingested reports prove ({proven} kWh)")

    def proven(self, meter: SimMeter) -> Decimal:
        """What the ingested reports prove the meter drew: per true register history (regId),
        highest register − lowest start; without regId, the register span the histories cover
        together; for a seed-only meter, the units of distinct reports (a report whose identity
        repeats an earlier one is what such a meter cannot tell apart: not counted)."""
        mine = [s for s in self.sim.ingested if s.meter_no == meter.meter_no]
        if meter.mode == "seed":
            seen, total = {}, Decimal(0)
            for s in mine:
                r = s.report
                key = (r.get("boot"), r["timestamp"], str(r["totalConsumed"]))
                content = (str(r["unitsConsumed"]), str(r["totalConsumed"]))
                if key in seen:
                    continue
                seen[key] = content
                total += Decimal(str(r["unitsConsumed"]))
            return total
        spans: dict[tuple, tuple[Decimal, Decimal]] = {}
        for s in mine:
            energy = Decimal(str(s.report["energyTotal"]))
            start = energy - Decimal(str(s.report["unitsConsumed"]))
            low, high = spans.get(s.history, (start, energy))
            spans[s.history] = (min(low, start), max(high, energy))
        if meter.mode == "firmware":
            return sum((high - low for low, high in spans.values()), Decimal(0))
        # Without regId, a register that started again inside the range of an earlier one cannot
        # be told apart from it (PROTOCOL.md: a reset can only be suspected): what is proven is
        # the register span the histories cover together.
        covered, reach = Decimal(0), None
        for low, high in sorted(spans.values()):
            if reach is None or low > reach:
                covered += high - low
                reach = high
            elif high > reach:
                covered += high - reach
                reach = high
        return covered


def run_seed(seed: int, steps: int) -> Counter:
    """One seed against the configured database (the caller provides Django and a clean state)."""
    from django.conf import settings

    from meters import outbox

    settings.MPESA_CALLBACK_SECRET = settings.MPESA_CALLBACK_SECRET or "sim"
    previous = (settings.MPESA_BASE_URL, settings.MPESA_CONSUMER_KEY, settings.MPESA_CONSUMER_SECRET,
                list(outbox._command_dispatchers))
    outbox._command_dispatchers.clear()  # the simulation publishes commands itself
    sim = Simulation(seed, steps)
    settings.MPESA_BASE_URL, settings.MPESA_CONSUMER_KEY, settings.MPESA_CONSUMER_SECRET = (
        sim.mpesa.url, "sim-key", "sim-secret")
    try:
        from django.core.cache import cache

        from payments import daraja

        cache.delete(daraja._token_key())
        for _ in range(steps):
            sim.step()
        sim.finish()
        sim.faults["steps"] += sim.steps_run
        return sim.faults
    except InvariantViolated as error:
        raise InvariantViolated(f"seed {seed}, step {sim.steps_run}: {error}\n  replay: python -m devtools.money_sim "
                                f"--seed {seed} --steps {steps}") from None
    finally:
        sim.close()
        settings.MPESA_BASE_URL, settings.MPESA_CONSUMER_KEY, settings.MPESA_CONSUMER_SECRET = previous[:3]
        outbox._command_dispatchers[:] = previous[3]


# ---- the command line: a database of its own --------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="deterministic simulation of the money system with faults")
    parser.add_argument("--seeds", type=int, default=20, help="run seeds 1..N")
    parser.add_argument("--seed", type=int, help="run this one seed (replay)")
    parser.add_argument("--steps", type=int, default=250, help="steps per seed")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    admin_url, url = _database()
    os.environ.update(DJANGO_SETTINGS_MODULE="portal.settings", DATABASE_URL=url, DEBUG="False",
                      SECRET_KEY="money-sim-secret-key-not-for-production-0123456789",
                      MPESA_CALLBACK_SECRET="money-sim-callback-secret-0123456789abcdef", LOG_LEVEL="ERROR")
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    call_command("migrate", verbosity=0)
    seeds = [args.seed] if args.seed is not None else list(range(1, args.seeds + 1))
    totals: Counter = Counter()
    started = time.monotonic()
    try:
        for seed in seeds:
            totals.update(run_seed(seed, args.steps))
    except InvariantViolated as error:
        print(f"VIOLATION: {error}", flush=True)
        sys.exit(1)
    finally:
        from django.db import connections

        connections.close_all()
        _drop(admin_url)
    print(f"{len(seeds)} seeds, {totals.pop('steps')} steps, no invariant violated "
          f"({time.monotonic() - started:.0f} s). Faults and routes covered:")
    for name, count in sorted(totals.items()):
        print(f"  {name:40s} {count}")


DB_NAME = "money_sim"


def _database() -> tuple[str, str]:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    parts = urlsplit(base)
    if parts.scheme not in ("postgres", "postgresql"):
        sys.exit("the money simulation needs PostgreSQL: set DATABASE_URL=postgres://…")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    return admin, urlunsplit((parts.scheme, parts.netloc, f"/{DB_NAME}", "", ""))


def _drop(admin_url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
