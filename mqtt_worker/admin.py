from django.contrib import admin

from core.admin import ReadOnlyAdmin
from mqtt_worker.models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    """Read-only: a dead letter is evidence of what a meter (or an impostor) sent."""

    list_display = ["received_at", "topic", "reason", "client_id"]
    list_filter = ["received_at", "client_id"]
    search_fields = ["topic", "reason"]
    fields = ["received_at", "topic", "reason", "client_id", "payload_text"]
    readonly_fields = fields
    date_hierarchy = "received_at"

    @admin.display(description="payload")
    def payload_text(self, obj: DeadLetter) -> str:
        return obj.payload_text
