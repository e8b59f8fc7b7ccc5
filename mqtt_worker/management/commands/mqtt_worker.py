"""`python manage.py mqtt_worker`: consume meter reports from MQTT into the database.

From the command line the command replaces its process (exec, same pid, so process managers
and signals are unaffected) with one that sets Django up with only the apps the worker uses
(WORKER_APPS). `manage.py` loads every installed app first: Daphne with Twisted, the admin,
DRF, drf-spectacular, payments with httpx…, most of the worker's memory budget before the first
report (README.md has the figures). `--all-apps` keeps the full set (e.g. to debug an import
problem).
"""

import logging
import os
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# What the worker touches: meters' models (which refer to auth's users), its own models, and
# mqtt_worker's AppConfig.ready(), which registers the outbox dispatcher (Celery).
WORKER_APPS = ("django.contrib.contenttypes", "django.contrib.auth", "meters", "mqtt_worker")
_SLIM = "MQTT_WORKER_SLIM_PROCESS"
_ROOT = Path(__file__).resolve().parents[3]


class Command(BaseCommand):
    help = "Consume meter reports (consumption, status, balance) from MQTT into the database, exactly once."

    def add_arguments(self, parser):
        parser.add_argument("--client-id", default=settings.MQTT_CLIENT_ID,
                            help="Stable MQTT client id of this worker (its persistent session); env MQTT_CLIENT_ID")
        parser.add_argument("--group", default=settings.MQTT_SHARED_GROUP,
                            help="Shared-subscription group; workers in one group split the load")
        parser.add_argument("--batch-size", type=int, default=settings.MQTT_BATCH_SIZE,
                            help="Most messages per transaction")
        parser.add_argument("--batch-wait-ms", type=int, default=settings.MQTT_BATCH_WAIT_MS,
                            help="Longest wait for a batch to fill after its first message")
        parser.add_argument("--trace-commits", default=None, metavar="PATH",
                            help="Benchmarks: append each commit's time and report seqs to PATH")
        parser.add_argument("--all-apps", action="store_true",
                            help="Run in this process with every installed app loaded (more memory)")

    def run_from_argv(self, argv):
        if os.environ.get(_SLIM) != "1" and not {"--all-apps", "-h", "--help"} & set(argv):
            # Validate the arguments here, so a mistake is reported before the exec.
            try:
                _check(vars(self.create_parser(argv[0], argv[1]).parse_args(argv[2:])))
            except CommandError:
                return super().run_from_argv(argv)  # reports it the usual way
            if "--skip-checks" not in argv:
                self.check()  # here, with every app loaded: the narrowed process skips them
            sys.stdout.flush()
            sys.stderr.flush()
            env = dict(os.environ, **{_SLIM: "1"})
            os.execve(sys.executable, [sys.executable, "-c", _SLIM_MAIN, *argv[1:], "--skip-checks"], env)
        super().run_from_argv(argv)

    def handle(self, *args, **options):
        _check(options)
        from mqtt_worker.worker import IngestWorker

        _log_in_seed_style()
        worker = IngestWorker(
            client_id=options["client_id"],
            group=options["group"],
            batch_size=options["batch_size"],
            batch_wait_ms=options["batch_wait_ms"],
            trace_path=options["trace_commits"],
        )
        worker.install_signal_handlers()
        worker.run()


def _check(options: dict) -> None:
    if options["batch_size"] < 1 or options["batch_wait_ms"] < 0:
        raise CommandError("--batch-size must be ≥ 1 and --batch-wait-ms ≥ 0")
    if not options["client_id"] or len(options["client_id"]) > 64:
        raise CommandError("--client-id must be 1-64 characters")


_SLIM_MAIN = f"import sys; sys.path.insert(0, {str(_ROOT)!r}); from {__name__} import slim_main; slim_main()"


def slim_main() -> None:
    """The exec'd process: `sys.argv` is ["-c", "mqtt_worker", options…]."""
    import django

    settings.INSTALLED_APPS  # noqa: B018 (loads the settings module before they are narrowed)
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app.split(".apps.")[0] in WORKER_APPS]
    django.setup()
    Command().run_from_argv(["manage.py", *sys.argv[1:]])


def _log_in_seed_style() -> None:
    """`[MQTT] [INFO] Consumption report - Meter: METER001, Units: 0.0048` (the seed's logs)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s [MQTT] [%(levelname)s] %(message)s"))
    logger = logging.getLogger("mqtt_worker")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(settings.LOG_LEVEL)
