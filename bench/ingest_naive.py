"""The naive ingester the benchmark compares with: one transaction and ORM saves per message.

What a straightforward port of the seed's `on('message')` handler does: decode, then one
transaction per report through the ORM (lock the meter, store the reading, post the debit:
`meters.consumption.ledger_debit` with the ORM store), commit, ack. Exactly-once as well (the
same rules, identities and idempotency keys), just several round trips per report.

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
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from meters.consumption import ledger_debit
    from meters.consumption.stores import OrmStore
    from mqtt_worker.client import tune_socket
    from mqtt_worker.codec import decode

    store = OrmStore()

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
            # One report, one transaction, the portable ORM strategy: the naive way, through the
            # same service and rules as the batched worker (so the ledger it leaves is the same).
            ledger_debit(report=report, store=store)
            client.ack(msg.mid, msg.qos)
            trace.write(f"{time.time_ns()} {report.meter_no}:{report.seq}\n")
            trace.flush()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    main(sys.argv[1], sys.argv[2])
