"""Hooks through which the layers above learn that outbox rows are waiting.

`meters` knows nothing of MQTT or Celery (imports point down only). The MQTT side registers a
dispatcher at start-up (`mqtt_worker.apps`); services call `dispatch_commands_on_commit` in the
transaction that wrote the rows, so nothing is published for a transaction that rolls back. If
a dispatch is lost (a crash right after commit), the rows are still `queued` and the periodic
sweep publishes them: the outbox, not the hook, is what makes delivery reliable.
"""

import logging
from collections.abc import Callable, Iterable

from django.db import transaction

logger = logging.getLogger(__name__)

_command_dispatchers: list[Callable[[list[int]], None]] = []


def register_command_dispatcher(dispatcher: Callable[[list[int]], None]) -> None:
    if dispatcher not in _command_dispatchers:
        _command_dispatchers.append(dispatcher)


def dispatch_commands_on_commit(command_ids: Iterable[int]) -> None:
    ids = list(command_ids)
    if not ids:
        return

    def _dispatch() -> None:
        for dispatcher in _command_dispatchers:
            try:
                dispatcher(ids)
            except Exception:  # the sweep retries; a failed hint must not fail the caller
                logger.exception("Command dispatcher failed for %s; the sweep will retry", ids)

    transaction.on_commit(_dispatch)
