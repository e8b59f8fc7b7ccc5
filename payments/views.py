"""Daraja callbacks. Thin: guard, store the raw body, call a service, answer Daraja.

Callbacks are unsigned, so three checks stand in front of them (daraja.md, "Securing callbacks"):
the secret path segment (compared in constant time), an optional IP allowlist applied to the
address of the trusted proxy hop, and the services' own check that the callback names a known
pending payment and its amount. Requests failing the first two are logged and never stored:
nothing unauthenticated is written to the database.
"""

import hmac
import ipaddress
import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from payments import services
from payments.models import CallbackKind

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str | None:
    """The caller's address as seen by the outermost trusted proxy (TRUSTED_PROXY_HOPS).

    With N proxies in front of us, each appends the address it received from, so the client is
    the N-th entry from the right of X-Forwarded-For; anything left of it is client-controlled.
    """
    hops = settings.TRUSTED_PROXY_HOPS
    if hops == 0:
        candidate = request.META.get("REMOTE_ADDR", "")
    else:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) < hops:
            return None
        candidate = forwarded[-hops]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def _refusal(request: HttpRequest, secret: str, ip: str | None) -> HttpResponse | None:
    expected = settings.MPESA_CALLBACK_SECRET
    if not hmac.compare_digest(secret.encode(), expected.encode()):
        logger.warning("M-Pesa callback with a wrong secret from %s refused", ip)
        return JsonResponse({"ResultCode": 1, "ResultDesc": "Not found"}, status=404)
    allowed = settings.MPESA_CALLBACK_ALLOWED_IPS
    if allowed and ip not in allowed:
        logger.warning("M-Pesa callback from %s (not in MPESA_CALLBACK_ALLOWED_IPS) refused", ip)
        return JsonResponse({"ResultCode": 1, "ResultDesc": "Forbidden"}, status=403)
    if len(request.body) > services.MAX_CALLBACK_BYTES:
        logger.warning("Oversized M-Pesa callback (%s bytes) from %s refused", len(request.body), ip)
        return JsonResponse({"ResultCode": 1, "ResultDesc": "Too large"}, status=413)
    return None


def _callback_view(kind: str):
    """A Daraja callback endpoint: refuse unauthenticated calls without storing them, store the
    raw body before anything else, then process it and answer Daraja (always, once stored: a
    callback whose processing failed is processed again by the sweeper)."""

    @csrf_exempt
    @require_POST
    def view(request: HttpRequest, secret: str) -> HttpResponse:
        ip = client_ip(request)
        refusal = _refusal(request, secret, ip)
        if refusal:
            return refusal
        callback = services.callback_record(kind=kind, body=request.body, remote_addr=ip)
        return JsonResponse(services.callback_process(callback_id=callback.pk))

    return view


stk_callback = _callback_view(CallbackKind.STK)
c2b_validation = _callback_view(CallbackKind.C2B_VALIDATION)
c2b_confirmation = _callback_view(CallbackKind.C2B_CONFIRMATION)
