"""Dead letters: messages the worker could not accept, kept raw for staff (PROTOCOL.md "Bad input")."""

from django.db import models
from django.utils import timezone


class DeadLetter(models.Model):
    topic = models.CharField(max_length=255)
    # The exact bytes received (possibly not UTF-8, possibly oversized): evidence, and replayable.
    payload = models.BinaryField()
    reason = models.CharField(max_length=255)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    client_id = models.CharField(max_length=64, blank=True, help_text="The worker that received it")

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.topic}: {self.reason}"

    @property
    def payload_text(self) -> str:
        """The payload as text, with bytes that are not UTF-8 escaped (\\xNN), for display."""
        return bytes(self.payload).decode("utf-8", errors="backslashreplace")


class BrokerServiceUser(models.Model):
    """A backend process's broker user (`backend.ingest`, `backend.publisher`): what it may do on
    the broker and its password as the broker's hash (core.broker_auth). The meters' own users
    are meters.MeterCredential; `manage.py mqtt_auth export` writes both into the broker's files."""

    username = models.CharField(max_length=48, unique=True)
    can_ingest = models.BooleanField(default=False, help_text="Reads the meters' reports")
    can_publish = models.BooleanField(default=False, help_text="Publishes commands to meters")
    password_hash = models.CharField(max_length=200)
    changed_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username
