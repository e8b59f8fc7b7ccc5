"""Meters that went silent: no report for longer than three report intervals means the meter
is offline, even if it never said so (its Last Will may not have come, or its connection hangs).
Part of the consumption package because the meter's reported state and its status events have
one writer, this package; the offline alert (notifications) calls it from Celery beat."""

from datetime import datetime

from django.db import transaction

from meters.events import send_meter_events_on_commit
from meters.models import Meter, StatusEvent, StatusKind
from meters.services import firebase_mirror_mark


def meters_mark_silent_offline(*, silent_since: datetime, now: datetime) -> list[StatusEvent]:
    """Mark offline every meter still online whose last report is older than `silent_since`,
    with a status event each; returns those events. Conditional on the same condition in one
    UPDATE, so a report committed meanwhile (which sets `last_seen_at`) keeps its meter online,
    and two runs at once mark a meter once."""
    with transaction.atomic():
        candidates = Meter.objects.select_for_update(skip_locked=True).filter(online=True, last_seen_at__lt=silent_since)
        ids = list(candidates.values_list("id", flat=True))
        if not ids:
            return []
        Meter.objects.filter(id__in=ids, online=True, last_seen_at__lt=silent_since).update(online=False)
        meters = list(Meter.objects.filter(id__in=ids).values_list("id", "meter_no", "last_seen_at"))
        events = StatusEvent.objects.bulk_create(
            StatusEvent(meter_id=meter_id, status=StatusKind.OFFLINE, received_at=now, raw_payload="",
                        message=f"silent since {last_seen:%Y-%m-%d %H:%M:%S} UTC (no report for 3 intervals)")
            for meter_id, _, last_seen in meters
        )
        firebase_mirror_mark(meter_ids=ids, at=now)
        send_meter_events_on_commit([
            {"meterNo": meter_no, "type": "status", "status": "offline", "online": False, "relay": None,
             "message": "silent", "at": now.isoformat()}
            for _, meter_no, _ in meters
        ])
    return events
