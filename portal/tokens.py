"""Issuing, using and revoking API tokens: the only code that writes `ApiToken` rows."""

import hashlib
import secrets
from datetime import timedelta

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from core.errors import InvalidInput, NotFound
from portal.models import ApiToken

# Writing last_used_at on every request would turn every read into a write; once a minute is
# enough to tell a user which device was used recently.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# A bound on tokens per user, so that a script signing in in a loop cannot grow the table
# without limit: the oldest tokens are dropped first.
MAX_TOKENS_PER_USER = 20


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@transaction.atomic
def token_issue(*, user, device: str = "") -> tuple[ApiToken, str]:
    """A new token for `user`; returns the row and the key (the only time the key is known)."""
    if not user.is_active:
        raise InvalidInput("This account is disabled", field="username")
    device = (device or "").strip()
    if len(device) > 64:
        raise InvalidInput("device is longer than 64 characters", field="device")
    key = secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, key_hash=_hash(key), prefix=key[:8], device=device)
    stale = ApiToken.objects.filter(user=user).order_by("-id").values_list("id", flat=True)[MAX_TOKENS_PER_USER:]
    ApiToken.objects.filter(id__in=list(stale)).delete()
    return token, key


def token_authenticate(*, key: str) -> ApiToken | None:
    """The token with this key, or None. Marks it used (at most once a minute)."""
    if not key or len(key) > 128:
        return None
    token = ApiToken.objects.select_related("user").filter(key_hash=_hash(key)).first()
    if token is None:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def tokens_for_user(*, user) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-id")


def token_revoke(*, user, token_id: int) -> None:
    """Revoke one of the user's own tokens; someone else's token is reported as not found."""
    deleted, _ = ApiToken.objects.filter(user=user, pk=token_id).delete()
    if not deleted:
        raise NotFound(f"Unknown token {token_id}", field="id")
