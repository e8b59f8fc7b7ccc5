"""GET /metrics: Prometheus text format for a staff session, `Authorization: Bearer
METRICS_TOKEN`, or a client address in METRICS_ALLOWED_IPS (from the trusted proxy hop).

Two sources: the processes' own counters and histograms (core.metrics; added up over every
process on the host in prometheus-client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is
set), and gauges read from the database at scrape time (DatabaseCollector): meters online,
the command and Firebase outboxes, commands sent but not acknowledged, payments by status,
notifications by status.
"""

import hmac
import os

from django.conf import settings
from django.db.models import Count, F
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from core import metrics
from core.metrics import PREFIX
from meters.models import CommandStatus, FirebaseMirror, Meter, MeterCommand
from notifications.models import Notification
from payments.models import Payment, PaymentStatus
from payments.views import client_ip


class DatabaseCollector:
    """Gauges of what the database holds, read when Prometheus scrapes."""

    def collect(self):
        meters = GaugeMetricFamily(f"{PREFIX}_meters", "Meters by connection state (online: connected)", labels=["state"])
        online = Meter.objects.filter(online=True).count()
        meters.add_metric(["online"], online)
        meters.add_metric(["offline"], Meter.objects.count() - online)
        yield meters
        commands = GaugeMetricFamily(
            f"{PREFIX}_commands", "Meter commands by state: queued = the outbox (no PUBACK yet), sent = PUBACKed by the "
            "broker but not acknowledged by the meter", labels=["status"],
        )
        counts = dict(
            MeterCommand.objects.filter(status__in=[CommandStatus.QUEUED, CommandStatus.SENT])
            .values_list("status").annotate(n=Count("id")).values_list("status", "n")
        )
        for status in (CommandStatus.QUEUED, CommandStatus.SENT):
            commands.add_metric([status], counts.get(status, 0))
        yield commands
        yield GaugeMetricFamily(
            f"{PREFIX}_firebase_outbox_depth", "Meters whose Firebase mirror is behind the database",
            value=FirebaseMirror.objects.filter(version__gt=F("synced_version")).count(),
        )
        payments = GaugeMetricFamily(f"{PREFIX}_payments", "Payments by status", labels=["status"])
        by_status = dict(Payment.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
        for status in PaymentStatus.values:
            payments.add_metric([status], by_status.get(status, 0))
        yield payments
        notifications = GaugeMetricFamily(f"{PREFIX}_notifications", "Notifications by delivery status", labels=["status"])
        by_status = dict(Notification.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
        for status, count in sorted(by_status.items()):
            notifications.add_metric([status], count)
        yield notifications


def _process_metrics() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def _allowed(request) -> bool:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return True
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode()):
        return True
    return bool(settings.METRICS_ALLOWED_IPS) and client_ip(request) in settings.METRICS_ALLOWED_IPS


def metrics_view(request) -> HttpResponse:
    if not _allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    database = CollectorRegistry(auto_describe=True)
    database.register(DatabaseCollector())
    return HttpResponse(_process_metrics() + generate_latest(database), content_type=CONTENT_TYPE_LATEST)


class RequestMetricsMiddleware:
    """Counts each HTTP response by method and status class (2xx, 4xx, …)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        metrics.HTTP_REQUESTS.labels(request.method, f"{response.status_code // 100}xx").inc()
        return response


def celery_task_finished(sender=None, state=None, **_kwargs) -> None:
    """Celery's task_postrun signal (portal.celery)."""
    metrics.CELERY_TASKS.labels(getattr(sender, "name", "?"), str(state or "?").lower()).inc()


def process_exited(pid: int | None = None, **_kwargs) -> None:
    """A process leaves: its live gauges stop counting (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


