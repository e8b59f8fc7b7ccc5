"""OTA settings from the environment: a wrong one stops the process naming it; the beat task is
scheduled at OTA_CHECK_INTERVAL_S."""

import pytest
from django.conf import settings

from tests.test_settings_env import _start_django


@pytest.mark.parametrize(("env", "named"), [
    ({"OTA_IMAGE_BASE_URL": "ftp://fw.example.com"}, "OTA_IMAGE_BASE_URL"),
    ({"OTA_PAUSE_FAILURE_PERCENT": "150"}, "OTA_PAUSE_FAILURE_PERCENT"),
    ({"OTA_SILENCE_TIMEOUT_S": "5"}, "OTA_SILENCE_TIMEOUT_S"),
    ({"OTA_ALLOW_HTTP": "maybe"}, "OTA_ALLOW_HTTP"),
])
def test_a_bad_ota_setting_stops_the_process_and_names_it(env, named):
    result = _start_django(DEBUG="True", **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr.splitlines()[-1]


def test_the_rollout_check_is_scheduled():
    entry = settings.CELERY_BEAT_SCHEDULE["ota-rollouts-tick"]
    assert entry["task"] == "meters.tasks.ota_rollouts_tick"
    assert entry["schedule"] == float(settings.OTA_CHECK_INTERVAL_S)
    from meters.tasks import ota_rollouts_tick

    assert ota_rollouts_tick.name == entry["task"]
