"""`python manage.py mqtt_auth …`: the broker's accounts, from the database to Mosquitto.

    mqtt_auth export [--dir D] [--reload]   write the password and ACL files (MQTT_AUTH_DIR); SIGHUP the broker
    mqtt_auth watch [--interval S]          keep them in step: export and reload whenever an account changes
    mqtt_auth from-settings                 the backend users of MQTT_URL / MQTT_PUBLISHER_URL, with their passwords
    mqtt_auth service-user NAME --ingest|--publish   create or rotate a backend user; prints its new password once
    mqtt_auth issue METER                   a new password for a meter (printed once); revoke METER: refuse it

Mosquitto reads the files at start and again on SIGHUP, disconnecting clients whose password is
gone, so credentials change without restarting the broker. `watch` runs beside the broker
(`make run`'s `mqttauth` process, deploy/systemd/smartmeter-mqtt-auth.service).
"""

import signal
import threading
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, close_old_connections

from core.errors import DomainError
from meters import services as meter_services
from mqtt_worker import services


class Command(BaseCommand):
    help = "Export the broker's accounts (password and ACL files) from the database; manage backend and meter users."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        for name in ("export", "watch"):
            action = sub.add_parser(name)
            action.add_argument("--dir", type=Path, default=None, help="where the files go (default MQTT_AUTH_DIR)")
            action.add_argument("--pid-file", type=Path, default=None, help="the broker's pid file (MQTT_BROKER_PID_FILE)")
        sub.choices["export"].add_argument("--reload", action="store_true", help="SIGHUP the broker when the files changed")
        sub.choices["watch"].add_argument("--interval", type=float, default=settings.MQTT_AUTH_POLL_S,
                                          help="seconds between looks at the database")
        sub.add_parser("from-settings")
        user = sub.add_parser("service-user")
        user.add_argument("username")
        user.add_argument("--ingest", action="store_true", help="may read the meters' reports")
        user.add_argument("--publish", action="store_true", help="may publish commands to meters")
        for name in ("issue", "revoke"):
            sub.add_parser(name).add_argument("meter_no")

    def handle(self, *args, action, **options):
        try:
            getattr(self, f"_{action.replace('-', '_')}")(**options)
        except DomainError as error:
            raise CommandError(error.message) from None

    def _export(self, dir, pid_file, reload, **_):
        changed = services.broker_accounts_export(directory=dir, reload=reload, pid_file=pid_file)
        self.stdout.write(f"Broker accounts {'written' if changed else 'unchanged'} in {dir or settings.MQTT_AUTH_DIR}")

    def _watch(self, dir, pid_file, interval, **_):
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        seen = None
        self.stdout.write(f"Watching broker accounts (every {interval:g} s) for {dir or settings.MQTT_AUTH_DIR}")
        while not stop.is_set():
            close_old_connections()
            try:
                marker = services.broker_accounts_marker()
                if marker != seen:
                    # The first look always exports: the files may predate a change made while
                    # nothing watched.
                    if services.broker_accounts_export(directory=dir, reload=True, pid_file=pid_file):
                        self.stdout.write("Broker accounts changed: files written, broker reloaded")
                    seen = marker
            except OperationalError as error:
                self.stderr.write(f"Database unavailable ({error}); trying again")
            stop.wait(interval)

    def _from_settings(self, **_):
        names = services.service_users_from_settings()
        self.stdout.write(f"Backend broker users from settings: {', '.join(names) or 'none (MQTT_URL has no user)'}")

    def _service_user(self, username, ingest, publish, **_):
        password = services.service_user_set(username=username, can_ingest=ingest, can_publish=publish)
        self.stdout.write(f"{username}: {password}\n(shown once; put it in that process's broker URL)")

    def _issue(self, meter_no, **_):
        password = meter_services.meter_credential_issue(meter_no=meter_no, actor="manage.py mqtt_auth")
        self.stdout.write(f"{meter_no}: {password}\n(shown once; put it on the meter)")

    def _revoke(self, meter_no, **_):
        meter_services.meter_credential_revoke(meter_no=meter_no, actor="manage.py mqtt_auth")
        self.stdout.write(f"{meter_no}: revoked (refused from the broker's next reload)")
