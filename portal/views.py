"""Customer-facing pages. Thin: they read through selectors and render."""

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from meters.errors import NotFound
from meters.selectors import meter_balance_kes, meter_get_for_user, meters_for_user, recent_readings


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    meters = [
        {"meter": meter, "balance_kes": meter_balance_kes(meter)}
        for meter in meters_for_user(user=request.user)
    ]
    return render(request, "portal/dashboard.html", {"meters": meters})


@login_required
def meter_detail(request: HttpRequest, meter_no: str) -> HttpResponse:
    try:
        meter = meter_get_for_user(user=request.user, meter_no=meter_no)
    except NotFound:
        raise Http404("No such meter") from None
    context = {
        "meter": meter,
        "balance_kes": meter_balance_kes(meter),
        "readings": recent_readings(meter=meter, limit=20),
    }
    return render(request, "portal/meter_detail.html", context)


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
