"""Secrets never reach a log. The M-Pesa callback secret is a path segment of every callback
URL, and Django's request logger writes the path of every 4xx/5xx ("Forbidden: /payments/…");
daphne's access log writes every path. Both go through `mask_secrets`."""

import logging

from django.conf import settings

MASK = "********"
# Settings whose values are masked wherever they appear in a log line.
MASKED_SETTINGS = ("MPESA_CALLBACK_SECRET",)


def _secrets() -> list[str]:
    if not settings.configured:
        return []
    return [value for name in MASKED_SETTINGS if len(value := str(getattr(settings, name, "") or "")) >= 4]


def mask_secrets(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, MASK)
    return text


class MaskSecrets(logging.Filter):
    """A logging filter (settings.LOGGING: django.request and the console handler): the
    record's message is formatted once, masked, and kept as its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _secrets()
        if not secrets:
            return True
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True
