"""`python -m devtools.simulate_meters`: a fleet of simulated meters speaking PROTOCOL.md over MQTT.

    python -m devtools.simulate_meters --meters METER001,METER002,METER003 --interval 5
    python -m devtools.simulate_meters --count 1000 --prefix SIM --connections 4 --interval 30 --speed 10 \\
        --provision --credit 50 --drop-rate 0.02 --duplicate-rate 0.05 --garbage-rate 0.01 --duration 120

Each meter runs the Python port of the firmware core (devtools/sim/meter_core.py); see
devtools/sim/fleet.py for the design, the load model and the faults. With OTA_PUBLIC_KEY set
(or --ota) the meters also take firmware updates (command/ota) signed with that key, fetching
images over http only when OTA_ALLOW_HTTP is True (`make run`: the web process, plain HTTP);
--ota-fail-boot / --ota-fail-rate make some of them fail to boot a new image (they roll back). Meters that the database
already knows resume from the register and seq the backend last accounted (as if their flash had
survived the simulator's restart), so `make run` can be restarted without the register on the
wire going backwards. Unknown meters are simulated anyway (the worker dead-letters their reports)
unless `--provision` creates them.
"""

import argparse
import json
import math
import os
import signal
import threading
from decimal import Decimal

import django
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

if __name__ == "__main__":
    # `python -m devtools.simulate_meters`: Django is set up before the models below are imported.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    django.setup()

from core.errors import DomainError, NotFound  # noqa: E402
from core.rules import METER_NO_HELP, valid_fw_version, valid_meter_no  # noqa: E402
from devtools.sim.fleet import Broker, Fleet, FleetOptions, OtaOptions, Resume  # noqa: E402
from meters import selectors, services  # noqa: E402
from meters.models import Meter, Tariff  # noqa: E402
from meters.ota.signing import public_key_point  # noqa: E402

# The next boot of a real meter resumes one reserved block above the last seq it stored.
SEQ_BLOCK = 64


def _as_meter_double(value: Decimal) -> float:
    # The meter keeps its register as an IEEE double: read the Decimal as its JSON parser would.
    return json.loads(format(value, "f"))


class Command(BaseCommand):
    help = "Simulate a fleet of prepaid meters over MQTT (same protocol and rules as the firmware)."

    def add_arguments(self, parser):
        which = parser.add_argument_group("meters")
        which.add_argument("--meters", help="comma-separated meter numbers, e.g. METER001,METER002")
        which.add_argument("--count", type=int, help="simulate N meters named <prefix>00001…")
        which.add_argument("--prefix", default="SIM", help="meter number prefix for --count (default SIM)")
        which.add_argument("--provision", action="store_true",
                           help="create meters missing from the database (meters.services.meter_provision)")
        which.add_argument("--tariff", default=None, help="tariff name for --provision (default: the only/first)")
        which.add_argument("--credit", type=Decimal, default=Decimal("0"),
                           help="opening credit in kWh for meters that --provision creates")
        which.add_argument("--issue-credentials", action="store_true",
                           help="give each meter a new broker password, as a technician flashing it would "
                                "(meters.services.meter_credential_issue), write the broker's files and reload it "
                                "(manage.py mqtt_auth export --reload); each meter then connects as itself")
        run = parser.add_argument_group("running")
        run.add_argument("--interval", type=float, default=30.0,
                         help="report interval in simulated seconds (default 30, as the firmware)")
        run.add_argument("--connections", type=int, default=None, help="MQTT connections (default: 1 per 250 meters)")
        run.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
        run.add_argument("--duration", type=float, default=None, help="stop after this many real seconds")
        run.add_argument("--reports", type=int, default=None, help="stop after this many consumption reports")
        run.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines")
        run.add_argument("--stop-timeout", type=float, default=60.0,
                         help="on stop, seconds to wait for the final reports' PUBACKs (default 60)")
        run.add_argument("--mqtt-url", default=None, help="broker URL (default: settings.MQTT, i.e. MQTT_URL)")
        run.add_argument("--client-id-prefix", default=None, help="MQTT client ids <prefix>-0… (default sim-<pid>)")
        run.add_argument("--seed", type=int, default=None, help="random seed (load model and faults)")
        faults = parser.add_argument_group("faults (probabilities per report interval)")
        faults.add_argument("--drop-rate", type=float, default=0.0,
                            help="per connection: cut the socket; meters buffer and replay")
        faults.add_argument("--outage", type=float, default=None,
                            help="real seconds a dropped connection stays down (default: 2 intervals)")
        faults.add_argument("--duplicate-rate", type=float, default=0.0, help="per report: publish it twice")
        faults.add_argument("--register-reset-rate", type=float, default=0.0,
                            help="per meter: the PZEM energy register resets to 0")
        faults.add_argument("--garbage-rate", type=float, default=0.0,
                            help="per meter: a malformed payload on one of its report topics")
        ota = parser.add_argument_group("firmware updates (command/ota)")
        ota.add_argument("--ota", action=argparse.BooleanOptionalAction, default=None,
                         help="meters take OTA updates signed with OTA_PUBLIC_KEY (default: when it is set)")
        ota.add_argument("--ota-fail-boot", default="",
                         help="comma-separated meters whose new image panics at boot (they roll back)")
        ota.add_argument("--ota-fail-rate", type=float, default=0.0,
                         help="or: each meter's new image panics at boot with this probability (per image, --seed)")

    def handle(self, *args, **options):
        for name in ("interval", "speed", "duration", "progress"):
            value = options[name]
            if value is not None and not (math.isfinite(value) and value > 0):
                raise CommandError(f"--{name} must be a positive number, got {value}")
        for name in ("drop_rate", "duplicate_rate", "register_reset_rate", "garbage_rate"):
            if not 0 <= options[name] <= 1:
                raise CommandError(f"--{name.replace('_', '-')} is a probability between 0 and 1, got {options[name]}")
        if options["outage"] is not None and not (math.isfinite(options["outage"]) and options["outage"] >= 0):
            raise CommandError("--outage must be a non-negative number of seconds")
        meter_nos = self._meter_nos(options)
        if options["provision"]:
            self._provision(meter_nos, options["tariff"], options["credit"])
        resume = self._resume(meter_nos)
        credentials = self._issue_credentials(meter_nos) if options["issue_credentials"] else None
        if options["mqtt_url"]:
            try:
                broker = Broker.from_url(options["mqtt_url"], ca_file=settings.MQTT_CA_FILE)
            except ValueError as error:
                raise CommandError(str(error)) from None
        else:
            config = settings.MQTT
            broker = Broker(host=config["host"], port=config["port"], username=config.get("username"),
                            password=config.get("password"), tls=bool(config.get("tls")), ca_file=settings.MQTT_CA_FILE)
        if options["reports"] is not None and options["reports"] < 1:
            raise CommandError("--reports must be at least 1")
        connections = options["connections"]
        if connections is None:
            connections = max(1, min(8, (len(meter_nos) + 249) // 250))
        elif connections < 1:
            raise CommandError("--connections must be at least 1")
        fleet_options = FleetOptions(
            meter_nos=meter_nos, broker=broker, interval_s=options["interval"], connections=connections,
            speed=options["speed"], drop_rate=options["drop_rate"], outage_s=options["outage"],
            duplicate_rate=options["duplicate_rate"], register_reset_rate=options["register_reset_rate"],
            garbage_rate=options["garbage_rate"], seed=options["seed"],
            client_id_prefix=options["client_id_prefix"] or f"sim-{os.getpid()}", resume=resume,
            ota=self._ota(options),
            # A restarted simulator's meters still run the firmware they last reported.
            firmware={m: v for m, v in Meter.objects.filter(meter_no__in=meter_nos).values_list("meter_no", "firmware")
                      if valid_fw_version(v)},
            credentials=credentials,
        )
        try:
            fleet = Fleet(fleet_options)
        except ValueError as error:
            raise CommandError(str(error)) from None

        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.stdout.write(
            f"[sim] {len(meter_nos)} meters over {len(fleet.connections)} connection(s) to "
            f"{broker.host}:{broker.port}, report every {options['interval']:g} s simulated, speed ×{options['speed']:g}"
            + (f", {len(resume)} resuming from the ledger's register" if resume else "")
        )
        fleet.start()
        try:
            fleet.run(duration_s=options["duration"], reports=options["reports"], progress_s=options["progress"],
                      out=self.stdout.write, stop_requested=stop)
        finally:
            self.stdout.write("[sim] stopping: final reports, waiting for PUBACKs…")
            delivered = fleet.stop(flush_timeout=options["stop_timeout"])
            self.stdout.write(fleet.progress_line())
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not delivered:
            if stop.is_set():
                # Stopped by a signal, typically with the broker (make run's Ctrl-C stops all).
                # The next start resumes each meter from the register the ledger accounted.
                self.stderr.write("[sim] stopped before the broker acknowledged every final report")
                return
            raise CommandError("some reports were not acknowledged by the broker before the timeout")

    def _meter_nos(self, options) -> list[str]:
        if options["meters"] and options["count"] is not None:
            raise CommandError("give either --meters or --count, not both")
        if options["meters"]:
            meter_nos = [m.strip() for m in options["meters"].split(",") if m.strip()]
        elif options["count"] is not None:
            if not 1 <= options["count"] <= 100_000:
                raise CommandError("--count must be between 1 and 100000")
            meter_nos = [f"{options['prefix']}{i:05d}" for i in range(1, options["count"] + 1)]
        else:
            raise CommandError("say which meters: --meters METER001,METER002 or --count N [--prefix SIM]")
        bad = [m for m in meter_nos if not valid_meter_no(m)]
        if bad:
            raise CommandError(f"invalid meter number(s) {', '.join(bad[:5])}: must be {METER_NO_HELP}")
        if len(set(meter_nos)) != len(meter_nos):
            raise CommandError("meter numbers must be unique")
        return meter_nos

    def _provision(self, meter_nos: list[str], tariff_name: str | None, credit: Decimal) -> None:
        if not credit.is_finite() or credit < 0:
            raise CommandError("--credit must be a non-negative number of kWh")
        tariffs = Tariff.objects.order_by("id")
        tariff = tariffs.filter(name=tariff_name).first() if tariff_name else tariffs.first()
        if tariff is None:
            names = ", ".join(tariffs.values_list("name", flat=True)) or "none (run seed_demo)"
            raise CommandError(f"no tariff {tariff_name or ''} to provision meters with; tariffs: {names}")
        created = 0
        for meter_no in meter_nos:
            try:
                selectors.meter_get(meter_no=meter_no)
                continue
            except NotFound:
                pass
            try:
                services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff)
                if credit > 0:
                    services.ledger_credit(meter_no=meter_no, units_kwh=credit, idempotency_key=f"sim-opening:{meter_no}",
                                           actor="simulate_meters", reason="Simulator opening credit")
            except DomainError as error:
                raise CommandError(f"{meter_no}: {error.message}") from None
            created += 1
        self.stdout.write(f"[sim] provisioned {created} meter(s) on tariff {tariff.name}")

    def _ota(self, options) -> OtaOptions | None:
        if options["ota"] is False or (options["ota"] is None and not settings.OTA_PUBLIC_KEY):
            if options["ota_fail_boot"] or options["ota_fail_rate"]:
                raise CommandError("--ota-fail-boot and --ota-fail-rate need OTA (OTA_PUBLIC_KEY)")
            return None
        if not settings.OTA_PUBLIC_KEY:
            raise CommandError("--ota needs OTA_PUBLIC_KEY (the key the meters' firmware trusts)")
        try:
            key = public_key_point(settings.OTA_PUBLIC_KEY)
        except DomainError as error:
            raise CommandError(error.message) from None
        if not 0 <= options["ota_fail_rate"] <= 1:
            raise CommandError("--ota-fail-rate is a probability between 0 and 1")
        fail = {m.strip() for m in options["ota_fail_boot"].split(",") if m.strip()}
        return OtaOptions(public_key=key, ca_file=settings.MQTT_CA_FILE, require_https=not settings.OTA_ALLOW_HTTP,
                          fail_boot_meters=fail, fail_boot_rate=options["ota_fail_rate"])
    def _issue_credentials(self, meter_nos: list[str]) -> dict[str, str]:
        try:
            credentials = {m: services.meter_credential_issue(meter_no=m, actor="simulate_meters") for m in meter_nos}
        except DomainError as error:
            raise CommandError(f"{error.message} (provision the meters first, e.g. --provision)") from None
        call_command("mqtt_auth", "export", "--reload", stdout=self.stdout)
        return credentials

    def _resume(self, meter_nos: list[str]) -> dict[str, Resume]:
        resume = {}
        for meter_no in meter_nos:
            try:
                meter = selectors.meter_get(meter_no=meter_no)
            except NotFound:
                continue
            if meter.last_energy_total_kwh is None:
                continue  # never reported: a new meter, starting from zero
            seqs = [r.seq for r in selectors.recent_readings(meter=meter, limit=200) if r.seq is not None]
            last_seq = max([meter.last_energy_seq or 0, *seqs])
            resume[meter_no] = Resume(
                energy_total=_as_meter_double(meter.last_energy_total_kwh),
                balance=_as_meter_double(meter.balance_kwh),
                next_seq=last_seq + 1 + SEQ_BLOCK,
                # The register history the backend accounts (a regId the meter reported): the
                # restarted simulator continues it instead of opening a new one.
                reg_id=meter.reg_id if meter.reg_id and not meter.reg_id.startswith("~") else None,
            )
        return resume


def main(argv: list[str] | None = None) -> None:
    """A development command, not one of the apps' management commands: the apps never import
    the simulator. It sets Django up itself, with the same settings as `manage.py`."""
    import sys

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    django.setup()
    Command().run_from_argv(["simulate_meters", "simulate_meters", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
