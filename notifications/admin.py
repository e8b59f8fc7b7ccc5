from django.contrib import admin

from core.admin import ReadOnlyAdmin
from notifications.models import Notification


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    """Every notification sent or tried (customers' e-mail and SMS, staff alerts): read-only."""

    list_display = ["created_at", "kind", "audience", "channel", "recipient", "meter", "status", "attempts", "sent_at",
                    "last_error"]
    list_filter = ["status", "kind", "channel", "audience"]
    search_fields = ["recipient", "meter__meter_no", "subject", "key"]
    list_select_related = ["meter"]
    date_hierarchy = "created_at"
