"""The Celery app: `celery -A portal worker` / `celery -A portal beat`."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_postrun.connect
def _count_task(sender=None, state=None, **kwargs):
    from portal.metrics import celery_task_finished

    celery_task_finished(sender=sender, state=state)


@signals.worker_process_shutdown.connect
def _process_gone(pid=None, **kwargs):
    from portal.metrics import process_exited

    process_exited(pid=pid)
