"""Admin mixins shared by every app's `admin.py`."""

from django.contrib import admin


class ReadOnlyMixin:
    """Rows that are history (ledger entries, readings, payments, callbacks, dead letters):
    visible, never added, edited or deleted from the admin. Also for inlines."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyAdmin(ReadOnlyMixin, admin.ModelAdmin):
    pass
