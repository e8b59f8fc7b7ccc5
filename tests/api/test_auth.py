"""Tokens: one per device, stored hashed, revocable one by one; sign-in is throttled."""

import hashlib

from portal.models import ApiToken
from tests.api.conftest import client_with, sign_in
from tests.conftest import PASSWORD


def test_sign_in_gives_a_token_that_is_stored_only_as_a_hash(alice, anon):
    response = anon.post("/api/v1/auth/token/", {"username": "alice", "password": PASSWORD, "device": "Pixel 7"}, format="json")
    assert response.status_code == 201
    key = response.json()["token"]
    token = ApiToken.objects.get(pk=response.json()["id"])
    assert token.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {token.key_hash, token.prefix} and token.prefix == key[:8]
    assert client_with(key).get("/api/v1/me/").json()["username"] == "alice"


def test_wrong_password_and_unknown_user_get_the_same_error(alice, anon):
    wrong = anon.post("/api/v1/auth/token/", {"username": "alice", "password": "nope"}, format="json")
    unknown = anon.post("/api/v1/auth/token/", {"username": "mallory", "password": "nope"}, format="json")
    assert wrong.status_code == unknown.status_code == 400
    assert (
        wrong.json()
        == unknown.json()
        == {
            "error": {
                "code": "invalid_credentials",
                "message": "Wrong username or password",
                "field": "password",
                "details": None,
            }
        }
    )
    assert not ApiToken.objects.exists()


def test_a_disabled_account_cannot_sign_in_and_its_tokens_stop_working(alice, anon):
    key = sign_in("alice")
    alice.user.is_active = False
    alice.user.save()
    assert anon.post("/api/v1/auth/token/", {"username": "alice", "password": PASSWORD}, format="json").status_code == 400
    assert client_with(key).get("/api/v1/me/").status_code == 401


def test_one_token_per_device_listed_and_revoked_one_by_one(alice):
    phone, tablet = sign_in("alice", device="phone"), sign_in("alice", device="tablet")
    listed = client_with(phone).get("/api/v1/auth/tokens/").json()
    assert [(t["device"], t["current"]) for t in listed] == [("tablet", False), ("phone", True)]
    # The phone revokes the lost tablet's token; the phone's own keeps working.
    tablet_id = listed[0]["id"]
    assert client_with(phone).delete(f"/api/v1/auth/tokens/{tablet_id}/").status_code == 204
    assert client_with(tablet).get("/api/v1/me/").status_code == 401
    # Signing out revokes only the token the request was made with.
    assert client_with(phone).delete("/api/v1/auth/token/").status_code == 204
    assert client_with(phone).get("/api/v1/me/").status_code == 401
    assert not ApiToken.objects.exists()


def test_a_stale_token_does_not_block_signing_in_again(alice):
    stale = client_with("not-a-real-token")
    assert stale.get("/api/v1/me/").status_code == 401
    assert stale.post("/api/v1/auth/token/", {"username": "alice", "password": PASSWORD}, format="json").status_code == 201


def test_malformed_authorization_headers_get_401(alice, anon):
    for header in ("Bearer", "Bearer a b", "Bearer \u00e9t\u00e9"):
        anon.credentials(HTTP_AUTHORIZATION=header)
        response = anon.get("/api/v1/me/")
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "authentication_failed"


def test_guessing_one_accounts_password_is_throttled(alice, anon):
    for _ in range(10):
        assert anon.post("/api/v1/auth/token/", {"username": "alice", "password": "guess"}, format="json").status_code == 400
    response = anon.post("/api/v1/auth/token/", {"username": "Alice ", "password": PASSWORD}, format="json")
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "throttled" and error["details"]["retryAfter"] > 0
    assert int(response.headers["Retry-After"]) > 0
    # Another account is not locked by attempts on Alice's.
    assert anon.post("/api/v1/auth/token/", {"username": "bob", "password": "guess"}, format="json").status_code == 400


def test_the_client_address_for_throttling_ignores_a_forged_forwarded_header(alice, bob, anon):
    # 60 attempts from one address across accounts, each claiming a different X-Forwarded-For.
    for attempt in range(60):
        username = "alice" if attempt % 2 else "bob"
        response = anon.post(
            "/api/v1/auth/token/",
            {"username": f"{username}{attempt}", "password": "x"},
            format="json",
            HTTP_X_FORWARDED_FOR=f"10.0.0.{attempt}",
        )
        assert response.status_code == 400
    response = anon.post(
        "/api/v1/auth/token/", {"username": "carol", "password": "x"}, format="json", HTTP_X_FORWARDED_FOR="10.9.9.9"
    )
    assert response.status_code == 429
