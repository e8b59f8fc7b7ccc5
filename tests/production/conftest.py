"""Fixtures of the production tests: the Africa's Talking stand-in as a real subprocess."""

import pytest

from devtools.services import FakeServerProcess, module_server

AT_KEY = "test-at-api-key"


@pytest.fixture(scope="session")
def fake_sms_server():
    with module_server("devtools.fake_africastalking", "--api-key", AT_KEY, "--username", "sandbox",
                       name="fake-africastalking") as (port, process):
        yield FakeServerProcess(port, process)


@pytest.fixture
def fake_sms(fake_sms_server, settings):
    """SMS on, through the official SDK, to a fresh stand-in."""
    fake_sms_server.control("reset")
    settings.AFRICASTALKING_API_KEY = AT_KEY
    settings.AFRICASTALKING_USERNAME = "sandbox"
    settings.AFRICASTALKING_BASE_URL = fake_sms_server.url
    return fake_sms_server
