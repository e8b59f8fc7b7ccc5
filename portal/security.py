"""Who is calling: the client address from the trusted proxy hop (for django-axes and the
/metrics allowlist), the same rule the M-Pesa callbacks use."""

from payments.views import client_ip


def axes_client_ip(request) -> str | None:
    return client_ip(getattr(request, "_request", request))
