"""The staff pages (admin) for releases and rollouts, their permissions, and the image view
meters download from."""

import re

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from meters.models import Meter
from meters.ota import services as ota
from meters.ota.models import FirmwareRelease, Rollout, RolloutState, RolloutTarget, TargetState
from tests.ota.conftest import signed
from tests.ota.test_rollouts import roll_back, update_ok

pytestmark = pytest.mark.django_db

OPERATOR_PERMS = ["view_firmwarerelease", "add_firmwarerelease", "view_rollout", "add_rollout", "change_rollout",
                  "view_rollouttarget", "view_meter"]


def _staff(django_user_model, name: str, perms: list[str]):
    """Staff as the staff-roles work will make them: is_staff plus a group's model permissions."""
    user = django_user_model.objects.create_user(name, f"{name}@example.com", "pw-for-tests-only-42", is_staff=True)
    group = Group.objects.create(name=f"role-{name}")
    group.permissions.set(Permission.objects.filter(content_type__app_label="meters", codename__in=perms))
    user.groups.add(group)
    return user


@pytest.fixture
def operator(django_user_model):
    return _staff(django_user_model, "olive", OPERATOR_PERMS)


@pytest.fixture
def viewer(django_user_model):
    return _staff(django_user_model, "victor", ["view_firmwarerelease", "view_rollout", "view_rollouttarget"])


def _upload(client, version, image, signature):
    return client.post(reverse("admin:meters_firmwarerelease_add"), {
        "version": version, "signature": signature, "notes": "field fix",
        "image_file": SimpleUploadedFile(f"meter-{version}.bin", image, content_type="application/octet-stream"),
    })


def test_staff_upload_a_release_and_the_backend_checks_it(client, ota_settings, operator):
    client.force_login(operator)
    image, sig = signed("1.1.0")
    # A signature for another version: refused on the form, with the reason; nothing stored.
    _, other = signed("1.0.9", image)
    response = _upload(client, "1.1.0", image, other["signature"])
    assert response.status_code == 200
    assert "does not verify with OTA_PUBLIC_KEY" in response.content.decode()
    assert not FirmwareRelease.objects.exists()
    response = _upload(client, "1.1.0", image, sig["signature"])
    assert response.status_code == 302, response.content.decode()[:2000]
    release = FirmwareRelease.objects.get()
    assert (release.version, release.sha256, release.uploaded_by, release.notes) == ("1.1.0", sig["sha256"], "olive",
                                                                                     "field fix")
    page = client.get(reverse("admin:meters_firmwarerelease_change", args=[release.pk])).content.decode()
    assert sig["sha256"] in page and ota.release_image_url(release) in page
    # A release is never edited or deleted.
    response = client.post(reverse("admin:meters_firmwarerelease_change", args=[release.pk]), {"version": "6.6.6"})
    assert response.status_code == 403
    assert client.post(reverse("admin:meters_firmwarerelease_delete", args=[release.pk])).status_code == 403


def test_the_rollout_page_shows_each_meters_version_and_state(client, ota_settings, operator, release, fleet):
    client.force_login(operator)
    url = reverse("admin:meters_firmwarerelease_changelist")
    base = {"action": "start_rollout", "_selected_action": [release.pk]}
    assert client.post(url, base).status_code == 200  # the form
    response = client.post(url, {**base, "apply": "1", "test_meter_no": fleet[0], "max_in_flight": "2"})
    assert response.status_code == 302
    rollout = Rollout.objects.get()
    assert (rollout.created_by, rollout.max_in_flight) == ("olive", 2)
    update_ok(rollout, fleet[0])

    url = reverse("admin:meters_rollout_changelist")
    base = {"action": "advance", "_selected_action": [rollout.pk]}
    response = client.post(url, {**base, "apply": "1", "percent": "50"})
    assert response.status_code == 302
    first, second = RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED).select_related("meter")
    roll_back(rollout, first.meter.meter_no)

    page = client.get(reverse("admin:meters_rollout_change", args=[rollout.pk])).content.decode()
    rows = {}
    for target in RolloutTarget.objects.filter(rollout=rollout).select_related("meter"):
        meter_no = target.meter.meter_no
        # The meter's row: its number, the version it runs now, its state in the update.
        row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*>{meter_no}</a>(?:(?!</tr>).)*</tr>", page, re.S)
        assert row, meter_no
        rows[meter_no] = row.group(0)
        assert target.get_state_display() in rows[meter_no]
        assert (Meter.objects.get(pk=target.meter_id).firmware or "?") in rows[meter_no]
    assert "1.1.0" in rows[fleet[0]] and "Updated" in rows[fleet[0]]
    assert "Rolled back" in rows[first.meter.meter_no] and "the new image crashed (panic)" in rows[first.meter.meter_no]
    assert "Command sent, no answer yet" in rows[second.meter.meter_no]
    assert "Waiting for its turn" in page
    assert "1 of 3" in page  # the failure share the pause rule counts

    # The meters list shows the same (the full list, paginated).
    listing = client.get(reverse("admin:meters_rollouttarget_changelist") + f"?rollout__id__exact={rollout.pk}")
    assert listing.status_code == 200 and first.meter.meter_no in listing.content.decode()
    assert "1.1.0" in client.get(reverse("admin:meters_meter_changelist")).content.decode()

    for action, state in (("pause", RolloutState.PAUSED), ("resume", RolloutState.RUNNING), ("abort", RolloutState.ABORTED)):
        response = client.post(url, {"action": action, "_selected_action": [rollout.pk], "apply": "1", "note": "x"})
        assert response.status_code == 302
        rollout.refresh_from_db()
        assert rollout.state == state, action
    assert [e.actor for e in rollout.events.all()] == ["olive"] * 5


def test_a_refused_action_says_why(client, ota_settings, operator, release, fleet):
    client.force_login(operator)
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    response = client.post(reverse("admin:meters_rollout_changelist"), {
        "action": "advance", "_selected_action": [rollout.pk], "apply": "1", "percent": "50"}, follow=True)
    assert "have not finished" in response.content.decode()
    assert RolloutTarget.objects.count() == 1


def test_permissions(client, ota_settings, viewer, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    client.force_login(viewer)
    # Seeing is allowed; uploading, starting and operating are not.
    assert client.get(reverse("admin:meters_rollout_change", args=[rollout.pk])).status_code == 200
    assert client.get(reverse("admin:meters_firmwarerelease_add")).status_code == 403
    changelist = client.get(reverse("admin:meters_rollout_changelist")).content.decode()
    assert 'value="pause"' not in changelist and 'value="abort"' not in changelist
    response = client.post(reverse("admin:meters_rollout_changelist"), {
        "action": "abort", "_selected_action": [rollout.pk], "apply": "1", "note": ""})
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.RUNNING, response.status_code
    releases = client.get(reverse("admin:meters_firmwarerelease_changelist")).content.decode()
    assert 'value="start_rollout"' not in releases


def test_non_staff_get_no_staff_pages(client, alice, ota_settings, release):
    client.force_login(alice.user)
    response = client.get(reverse("admin:meters_rollout_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_image_is_served_at_its_secret_url(client, ota_settings, release):
    url = ota.release_image_url(release).removeprefix("http://testserver")
    response = client.get(url)
    assert response.status_code == 200
    assert response.content == bytes(FirmwareRelease.objects.get().image)
    assert response["Content-Type"] == "application/octet-stream"
    assert response["ETag"] == f'"{release.sha256}"'
    assert client.get(url, HTTP_IF_NONE_MATCH=f'"{release.sha256}"').status_code == 304
    assert client.head(url).status_code == 200
    assert client.post(url).status_code == 405
    wrong_token = url.replace(release.download_token, "A" * 43)
    assert client.get(wrong_token).status_code == 404
    assert client.get(url.replace("1.1.0.bin", "1.1.1.bin")).status_code == 404
