"""Fixtures for the REST API tests: API clients signed in as each persona, and throttle
counters of each test's own (they live in the real Redis cache, shared across runs)."""

import uuid

import pytest
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from tests.conftest import PASSWORD


@pytest.fixture(autouse=True)
def _own_throttle_counters(settings):
    caches = {alias: dict(config) for alias, config in django_settings.CACHES.items()}
    caches["default"]["KEY_PREFIX"] = f"test-api-{uuid.uuid4().hex}"
    settings.CACHES = caches


def sign_in(username: str, password: str = PASSWORD, device: str = "") -> str:
    body = {"username": username, "password": password, "device": device}
    response = APIClient().post("/api/v1/auth/token/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["token"]


def client_with(token: str | None) -> APIClient:
    client = APIClient()
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def anon() -> APIClient:
    return APIClient()


@pytest.fixture
def alice_api(alice) -> APIClient:
    return client_with(sign_in("alice"))


@pytest.fixture
def bob_api(bob) -> APIClient:
    return client_with(sign_in("bob"))


@pytest.fixture
def staff_api(staff_user) -> APIClient:
    return client_with(sign_in("sam"))


