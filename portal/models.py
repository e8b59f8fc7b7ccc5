"""API tokens for the mobile app and the utility's tools.

One user may hold several tokens (one per device), each revocable on its own. Only a SHA-256
hash of the key is stored: a leaked database backup does not hand out working credentials, and
the key is shown exactly once, when it is issued.
"""

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    # hex SHA-256 of the key; the key itself is never stored.
    key_hash = models.CharField(max_length=64, unique=True)
    # The first characters of the key, so that a user can tell their devices' tokens apart.
    prefix = models.CharField(max_length=8)
    device = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["user", "id"], name="apitoken_user_id")]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user_id}, {self.device or 'no device'})"
