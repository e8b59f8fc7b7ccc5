"""/firmware/: the images meters fetch (meters.ota.views)."""

from django.urls import re_path

from core.rules import FW_VERSION_PATTERN
from meters.ota import views

urlpatterns = [
    re_path(
        rf"^images/(?P<token>[A-Za-z0-9_-]{{43}})/(?P<version>{FW_VERSION_PATTERN})\.bin$",
        views.firmware_image, name="ota-image",
    ),
]
