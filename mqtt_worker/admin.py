from django.contrib import admin

from mqtt_worker.models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
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

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
