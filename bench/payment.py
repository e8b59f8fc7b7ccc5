"""Benchmark: M-Pesa callback received → balance command acknowledged by the broker (issue 4).

`python -m bench.payment` (or `make bench-payment`). It runs the real processes on this machine:
daphne (the web), a Celery worker (as the Procfile starts it), a private Redis and a private
Mosquitto with the project's config, the fake Daraja server in-process, and PostgreSQL (a
`bench_payment` database, dropped and re-created, on the server named by DATABASE_URL or
127.0.0.1:5432). For each payment it starts an STK push (held by the fake), then posts the
success callback to the web process and waits until the meter's subscriber has the command.

Two latencies per payment, p50/p99/max:
- callback received → PUBACK: `Callback.received_at` (web process) → `MeterCommand.sent_at` (set by
  the Celery worker on the broker's PUBACK); the figure the issue asks for.
- POST sent → meter has it: wall time at this process, from sending the callback to a paho
  subscriber (the meter) receiving the command; includes HTTP and the broker's delivery.
Payments run one after another (each at an idle system), after a warm-up that is not counted.
"""

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def _database_url() -> str:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    parts = urlsplit(base)
    if parts.scheme not in ("postgres", "postgresql"):
        base, parts = "postgres://postgres@127.0.0.1:5432/postgres", urlsplit("postgres://postgres@127.0.0.1:5432/postgres")
    import psycopg

    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS bench_payment")
        connection.execute("CREATE DATABASE bench_payment")
    return parts._replace(path="/bench_payment").geturl()


def main() -> None:
    parser = argparse.ArgumentParser(description="callback received → balance command acknowledged by the broker")
    parser.add_argument("--payments", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from devtools.services import PrivateMosquitto, PrivateRedis, free_port, wait_for_port

    redis, broker = PrivateRedis().start(), PrivateMosquitto().start()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DEBUG": "False",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "DATABASE_URL": _database_url(),
        "REDIS_URL": redis.url,
        "MQTT_URL": broker.url,
        "MPESA_CALLBACK_SECRET": "bench-" + secrets.token_urlsafe(32),
        "LOG_LEVEL": "WARNING",
        # Plain HTTP on loopback, and nothing from a checkout's .env.
        "HTTPS_ONLY": "False",
        "ENV_FILE": "",
    }
    os.environ.update(env)
    processes: list[subprocess.Popen] = []
    try:
        _run(args, env, processes, free_port, wait_for_port, broker)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.close()
        broker.close()


def _run(args, env, processes, free_port, wait_for_port, broker) -> None:
    import django

    django.setup()
    import httpx
    import paho.mqtt.client as mqtt
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from paho.mqtt.enums import CallbackAPIVersion

    from devtools.fake_daraja import FakeDaraja, serve
    from meters import services as meter_services
    from meters.models import MeterCommand
    from payments import services
    from payments.models import Callback, Payment

    call_command("migrate", verbosity=0)
    fake_port = free_port()
    fake = FakeDaraja(consumer_key=settings.MPESA_CONSUMER_KEY, consumer_secret=settings.MPESA_CONSUMER_SECRET,
                      passkey=settings.MPESA_PASSKEY, outcome="hold", delay=0)
    fake_server = serve(fake, "127.0.0.1", fake_port)
    threading.Thread(target=fake_server.serve_forever, daemon=True).start()
    settings.MPESA_BASE_URL = f"http://127.0.0.1:{fake_port}"

    web_port = free_port()
    logs = ROOT / "var"
    logs.mkdir(exist_ok=True)
    for name, command in {
        "web": [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(web_port), "portal.asgi:application"],
        "celery": [str(BIN / "celery"), "-A", "portal", "worker", "--concurrency=2", "--without-gossip",
                   "--without-mingle", "--loglevel=WARNING"],
    }.items():
        log = open(logs / f"bench-payment-{name}.log", "wb")
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    wait_for_port("127.0.0.1", web_port, timeout=60)
    settings.MPESA_CALLBACK_BASE_URL = f"http://127.0.0.1:{web_port}"

    total = args.warmup + args.payments
    tariff = meter_services.tariff_create(name="Bench", kes_per_kwh="25")
    staff = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(), is_staff=True)
    print(f"Starting {total} STK pushes against the fake Daraja…", flush=True)
    payments = []
    for number in range(total):
        meter_services.meter_provision(meter_no=f"BENCH-{number:04d}", owner=None, tariff=tariff)
        payments.append(services.stk_push_start(user=staff, meter_no=f"BENCH-{number:04d}", phone="0712345678",
                                                amount_kes=100))

    received: dict[str, float] = {}
    arrived = threading.Condition()
    host, port = urlsplit(broker.url).hostname, urlsplit(broker.url).port

    def on_message(client, userdata, message):
        with arrived:
            received[message.topic.split("/")[1]] = time.perf_counter()
            arrived.notify_all()

    meter = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-meters", protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    meter.on_connect = lambda client, *a: client.subscribe("smartmeter/+/command/balance", qos=1)
    meter.on_subscribe = lambda *a: subscribed.set()
    meter.on_message = on_message
    meter.connect(host, port)
    meter.loop_start()
    subscribed.wait(30)

    url = services.stk_callback_url()
    wall = []
    with httpx.Client(timeout=30) as http:
        for number, payment in enumerate(payments):
            body = fake.stk_callback_body({
                "merchant": payment.merchant_request_id, "checkout": payment.checkout_request_id, "result_code": 0,
                "result_desc": "The service request is processed successfully.", "receipt": f"BENCH{number:05d}",
                "amount": int(payment.amount_kes), "phone": payment.phone,
            })
            meter_no = f"BENCH-{number:04d}"
            started = time.perf_counter()
            response = http.post(url, content=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            with arrived:
                if not arrived.wait_for(lambda meter_no=meter_no: meter_no in received, timeout=60):
                    raise SystemExit(f"payment {payment.pk}: no command at the meter after 60 s (see var/bench-payment-*.log)")
            if number >= args.warmup:
                wall.append((received[meter_no] - started) * 1000)
    meter.disconnect()
    meter.loop_stop()

    measured = [p.pk for p in payments[args.warmup:]]
    # The worker marks `sent_at` right after the PUBACKs it waits for; wait for the last rows.
    deadline = time.monotonic() + 60
    while MeterCommand.objects.filter(sent_at__isnull=True).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    received_at = dict(Callback.objects.filter(payment_id__in=measured).values_list("payment_id", "received_at"))
    server = [
        (sent_at - received_at[pk]).total_seconds() * 1000
        for pk, sent_at in Payment.objects.filter(pk__in=measured).values_list("pk", "command__sent_at")
    ]
    credited = Payment.objects.filter(pk__in=measured, status="succeeded").count()

    print(f"\n{len(measured)} payments ({args.warmup} warm-up not counted), {credited} credited; "
          f"Celery worker --concurrency=2, PostgreSQL, private Redis and Mosquitto on this machine")
    for label, values in (("callback received → broker PUBACK (DB clocks)", server),
                          ("callback POST sent → meter subscriber has it", wall)):
        print(f"{label:48s} p50 {statistics.median(values):6.1f} ms   p99 {percentile(values, 0.99):6.1f} ms   "
              f"max {max(values):6.1f} ms")


if __name__ == "__main__":
    main()
