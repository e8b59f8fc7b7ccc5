"""The naive ingester the benchmark compares with: one transaction and ORM saves per message.

What a straightforward port of the seed's `on('message')` handler does: decode, lock the meter,
store the reading, post the debit through `ledger_debit`, commit, ack. Exactly-once as well (the
same identities and idempotency keys), just one round trip per step per report.

Run by bench.ingest as `python -m bench.ingest_naive <client-id> <trace-file>` with the
benchmark's environment (DATABASE_URL, MQTT_URL, DJANGO_SETTINGS_MODULE).
"""

import os
import queue
import sys
import time


def main(client_id: str, trace_path: str) -> None:
    import django

    django.setup()
    import paho.mqtt.client as mqtt
    from django.conf import settings
    from django.db import transaction
    from django.utils import timezone
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from meters.models import Meter, Reading
    from meters.services import ledger_debit
    from mqtt_worker.codec import decode
    from mqtt_worker.worker import tune_socket

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
    client.on_socket_open = lambda c, u, sock: tune_socket(sock)
    client.on_message = lambda c, u, msg: inbox.put(msg)
    client.on_connect = lambda c, u, f, rc, p: (c.subscribe("$share/naive/smartmeter/+/consumption", 1),
                                                print("Subscribed to: naive", flush=True))
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect(settings.MQTT["host"], settings.MQTT["port"], clean_start=False, properties=properties)
    client.loop_start()
    with open(trace_path, "a") as trace:
        while True:
            msg = inbox.get()
            report = decode(msg.topic, msg.payload)
            with transaction.atomic():
                meter = Meter.objects.select_for_update().get(meter_no=report.meter_no)
                duplicate = Reading.objects.filter(meter=meter, dedup_key=report.dedup_key, is_duplicate=False).exists()
                Reading.objects.create(
                    meter=meter, reading_at=timezone.now(), time_trusted=report.time_trusted,
                    meter_timestamp_ms=report.timestamp_ms, units_consumed_kwh=report.units_consumed_kwh,
                    remaining_balance_kwh=report.remaining_balance_kwh, total_consumed_kwh=report.total_consumed_kwh,
                    seq=report.seq, energy_total_kwh=report.energy_total_kwh, dedup_key=report.dedup_key,
                    is_duplicate=duplicate, debit_kwh=0 if duplicate else report.units_consumed_kwh,
                    raw_payload=msg.payload.decode(),
                )
                if not duplicate and report.units_consumed_kwh > 0:
                    ledger_debit(meter_no=report.meter_no, units_kwh=report.units_consumed_kwh,
                                 idempotency_key=f"reading:{meter.pk}:{report.dedup_key}")
                meter.last_reported_balance_kwh = report.remaining_balance_kwh
                meter.last_seen_at = timezone.now()
                meter.save(update_fields=["last_reported_balance_kwh", "last_seen_at"])
            client.ack(msg.mid, msg.qos)
            trace.write(f"{time.time_ns()} {report.meter_no}:{report.seq}\n")
            trace.flush()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    main(sys.argv[1], sys.argv[2])
