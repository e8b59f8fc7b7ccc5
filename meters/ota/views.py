"""The image download meters are sent to (the OTA command's `url`).

Meters cannot sign in: the URL's secret token (one per release, known only to the meters that
were sent the command and to staff) is what keeps images from being listed. In production the
URL is https behind the web's TLS (OTA_IMAGE_BASE_URL); a meter verifies that server with the
broker's CA and refuses http. The meter checks the bytes itself (sha256 and signature), so
this view only has to serve them.
"""

from django.http import Http404, HttpResponse
from django.views.decorators.http import require_safe

from meters.ota.selectors import release_image


@require_safe
def firmware_image(request, token: str, version: str) -> HttpResponse:
    release = release_image(token=token, version=version)
    if release is None:
        raise Http404("No such image")
    etag = f'"{release.sha256}"'
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        response = HttpResponse(bytes(release.image), content_type="application/octet-stream")
        response["Content-Disposition"] = f'attachment; filename="meter-{release.version}.bin"'
    response["ETag"] = etag
    response["Cache-Control"] = "private, max-age=86400, immutable"
    response["X-Content-Type-Options"] = "nosniff"
    return response
