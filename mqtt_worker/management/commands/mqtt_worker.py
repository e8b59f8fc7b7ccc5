"""`python manage.py mqtt_worker`: consume meter reports from MQTT into the database."""

import logging
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from mqtt_worker.worker import IngestWorker


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

    def handle(self, *args, **options):
        if options["batch_size"] < 1 or options["batch_wait_ms"] < 0:
            raise CommandError("--batch-size must be ≥ 1 and --batch-wait-ms ≥ 0")
        if not options["client_id"] or len(options["client_id"]) > 64:
            raise CommandError("--client-id must be 1-64 characters")
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


def _log_in_seed_style() -> None:
    """`[MQTT] [INFO] Consumption report - Meter: METER001, Units: 0.0048` (the seed's logs)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s [MQTT] [%(levelname)s] %(message)s"))
    logger = logging.getLogger("mqtt_worker")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(settings.LOG_LEVEL)
