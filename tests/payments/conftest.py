"""Fixtures for the payments tests (the fake Daraja fixtures are in tests/conftest.py)."""


import pytest


@pytest.fixture(autouse=True)
def dispatched_commands(monkeypatch) -> list[int]:
    """Command ids handed to the outbox dispatchers after commit, recorded instead of sent.

    These tests are about payments; sending Celery tasks from them would leave messages on the
    shared Redis broker for some other run's worker. The end-to-end test runs the web process
    and the Celery worker as subprocesses with a private broker, where the real dispatcher runs.
    """
    from meters import outbox

    recorded: list[int] = []
    monkeypatch.setattr(outbox, "_command_dispatchers", [recorded.extend])
    return recorded
