"""/api/v1/firmware/: releases and rollouts through the REST API, staff with model permissions."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from meters.ota.models import Rollout, RolloutState, RolloutTarget, TargetState
from portal.tokens import token_issue
from tests.ota.conftest import signed
from tests.ota.test_rollouts import update_ok
from tests.ota.test_staff_pages import OPERATOR_PERMS, _staff

pytestmark = pytest.mark.django_db


def api_for(user) -> APIClient:
    client = APIClient()
    _, key = token_issue(user=user, device="tests")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def operator_api(django_user_model):
    return api_for(_staff(django_user_model, "olive", OPERATOR_PERMS))


def _upload(api, version, image, signature):
    return api.post("/api/v1/firmware/releases/", {
        "version": version, "signature": signature,
        "image": SimpleUploadedFile("firmware.bin", image, content_type="application/octet-stream"),
    }, format="multipart")


def test_a_rollout_through_the_api(operator_api, ota_settings, fleet):
    image, sig = signed("1.1.0")
    bad = _upload(operator_api, "1.1.0", image, signed("1.0.0", image)[1]["signature"])
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "signature"
    response = _upload(operator_api, "1.1.0", image, sig["signature"])
    assert response.status_code == 201, response.content
    release = response.json()
    assert (release["version"], release["sha256"], release["sizeBytes"]) == ("1.1.0", sig["sha256"], len(image))
    assert release["imageUrl"].startswith("http://testserver/firmware/images/")
    assert operator_api.get("/api/v1/firmware/releases/").json()["results"][0]["id"] == release["id"]

    missing = operator_api.post("/api/v1/firmware/rollouts/", {"release": release["id"], "testMeterNo": "NOPE"},
                                format="json")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "testMeterNo"
    response = operator_api.post("/api/v1/firmware/rollouts/", {"release": release["id"], "testMeterNo": fleet[0],
                                                                "maxInFlight": 2}, format="json")
    assert response.status_code == 201, response.content
    rollout = response.json()
    assert (rollout["state"], rollout["maxInFlight"], rollout["progress"]["inFlight"]) == ("running", 2, 1)
    assert [e["action"] for e in rollout["events"]] == ["start"]
    base = f"/api/v1/firmware/rollouts/{rollout['id']}"
    early = operator_api.post(f"{base}/advance/", {"percent": 50}, format="json")
    assert early.status_code == 409 and "not finished" in early.json()["error"]["message"]
    assert operator_api.post(f"{base}/advance/", {"percent": 50, "meterNos": ["F01"]}, format="json").status_code == 400

    update_ok(Rollout.objects.get(pk=rollout["id"]), fleet[0])
    response = operator_api.post(f"{base}/advance/", {"percent": 50}, format="json")
    assert response.status_code == 200 and response.json()["progress"]["total"] == 5
    meters = operator_api.get(f"{base}/meters/").json()["results"]
    assert meters[0] == {**meters[0], "meterNo": fleet[0], "version": "1.1.0", "state": "updated", "otaState": "valid"}
    assert [m["state"] for m in meters[1:]] == ["commanded", "commanded", "waiting", "waiting"]
    assert {m["version"] for m in meters[1:]} == {"1.0.0"}
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        response = operator_api.post(f"{base}/{action}/", {"note": "api"}, format="json")
        assert response.status_code == 200 and response.json()["state"] == state, response.content
    assert operator_api.post(f"{base}/abort/", {}, format="json").status_code == 409
    assert RolloutTarget.objects.filter(state=TargetState.SKIPPED).count() == 2
    assert Rollout.objects.get().state == RolloutState.ABORTED


def test_api_permissions(ota_settings, release, fleet, django_user_model, alice):
    viewer = api_for(_staff(django_user_model, "victor", ["view_rollout", "view_firmwarerelease"]))
    assert viewer.get("/api/v1/firmware/releases/").status_code == 200
    assert viewer.get("/api/v1/firmware/rollouts/").status_code == 200
    assert viewer.post("/api/v1/firmware/rollouts/", {"release": release.pk, "testMeterNo": fleet[0]},
                       format="json").status_code == 403
    image, sig = signed("1.2.0")
    assert _upload(viewer, "1.2.0", image, sig["signature"]).status_code == 403
    # Staff without the permissions, a customer, nobody.
    plain_staff = api_for(_staff(django_user_model, "pat", []))
    assert plain_staff.get("/api/v1/firmware/rollouts/").status_code == 403
    assert api_for(alice.user).get("/api/v1/firmware/releases/").status_code == 403
    assert APIClient().get("/api/v1/firmware/releases/").status_code == 401
    assert api_for(alice.user).get("/api/v1/firmware/rollouts/1/").status_code == 403
