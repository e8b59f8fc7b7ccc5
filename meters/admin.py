"""The utility staff's admin for customers, meters, tariffs, the ledger and the command outbox.

The ledger, readings, status events and commands are read-only here: a balance changes only
through the "Adjust balance" action, which calls the same service as the API, with a reason,
and records who did it.
"""

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.shortcuts import render
from django.urls import reverse

from core.admin import ReadOnlyAdmin
from core.errors import DomainError
from meters import adjustments, services
from meters.consumption import registers
from meters.models import (
    AdjustmentRequest,
    AdjustmentStatus,
    Customer,
    FirebaseMirror,
    LedgerEntry,
    Meter,
    MeterCommand,
    MeterCredential,
    Reading,
    RegisterHistory,
    StatusEvent,
    Tariff,
)
from meters.ota import admin as ota_admin  # noqa: F401  (firmware releases and rollouts)
from meters.phone import normalize_phone


class CustomerChangeForm(forms.ModelForm):
    """The form checks with the same rules the services apply (so a mistake is shown on the
    form); `save_model` then writes through the service."""

    phone = forms.CharField(max_length=20, help_text="07XXXXXXXX, 01XXXXXXXX, +2547… or 2547…")

    class Meta:
        model = Customer
        fields = ["name", "phone"]

    def clean_phone(self):
        try:
            return normalize_phone(self.cleaned_data["phone"])
        except DomainError as error:
            raise ValidationError(error.message) from None


class CustomerCreationForm(CustomerChangeForm):
    """A customer and their sign-in account, created by `customer_create` (save_model)."""

    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    password = forms.CharField(widget=forms.PasswordInput, help_text="The customer's first password")

    def clean_username(self):
        username = self.cleaned_data["username"]
        if get_user_model().objects.filter(username=username).exists():
            raise ValidationError(f"Username {username!r} is taken")
        return username

    def clean(self):
        data = super().clean()
        if data.get("password") and data.get("username"):
            try:
                validate_password(data["password"], get_user_model()(username=data["username"], email=data.get("email") or ""))
            except ValidationError as error:
                self.add_error("password", error)
        return data


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    """Staff create customers and correct their name and number; both go through the services
    (the phone is normalised, the user and password validated), never a plain model save."""

    list_display = ["name", "phone", "user", "created_at"]
    search_fields = ["name", "phone", "user__username", "meters__meter_no"]
    fields = ["name", "phone", "user", "created_at"]
    readonly_fields = ["user", "created_at"]

    form = CustomerChangeForm

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = CustomerCreationForm
            kwargs["fields"] = ["username", "email", "password", "name", "phone"]
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        return ["username", "email", "password", "name", "phone"] if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        try:
            if change:
                saved = services.customer_update(customer_id=obj.pk, name=obj.name, phone=obj.phone)
            else:
                data = form.cleaned_data
                saved = services.customer_create(
                    username=data["username"], password=data["password"], name=data["name"], phone=data["phone"],
                    email=data.get("email") or "",
                )
        except DomainError as error:
            raise ValidationError(error.message) from None
        obj.pk, obj.user_id, obj.phone = saved.pk, saved.user_id, saved.phone

    def has_delete_permission(self, request, obj=None):
        return False  # a customer's payments and meters are history


@admin.register(Tariff)
class TariffAdmin(admin.ModelAdmin):
    """Tariffs are history: a price change is a new row with the same name from a date
    (`tariff_create`); an existing price is never edited or deleted."""

    list_display = ["name", "kes_per_kwh", "effective_from", "created_at"]
    list_filter = ["name"]
    fields = ["name", "kes_per_kwh", "effective_from"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        try:
            saved = services.tariff_create(name=obj.name, kes_per_kwh=obj.kes_per_kwh, effective_from=obj.effective_from)
        except DomainError as error:
            raise ValidationError(error.message) from None
        obj.pk = saved.pk


class NoteForm(forms.Form):
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), help_text="Why (kept in the audit trail)")


class ArrearsFilter(admin.SimpleListFilter):
    title = "arrears"
    parameter_name = "arrears"

    def lookups(self, request, model_admin):
        return [("yes", "In arrears (balance below zero)")]

    def queryset(self, request, queryset):
        return queryset.filter(balance_kwh__lt=0) if self.value() == "yes" else queryset


class HeldFilter(admin.SimpleListFilter):
    title = "held energy"
    parameter_name = "held"

    def lookups(self, request, model_admin):
        return [("yes", "Energy held for review")]

    def queryset(self, request, queryset):
        return queryset.filter(energy_held_kwh__gt=0) if self.value() == "yes" else queryset


class AdjustmentForm(forms.Form):
    units_kwh = forms.DecimalField(
        max_digits=18, decimal_places=6, help_text="Signed kWh: positive adds, negative removes"
    )
    reason = forms.CharField(max_length=255, help_text="Why (kept in the ledger)")


class RecentReadingInline(admin.TabularInline):
    model = Reading
    fields = ["reading_at", "units_consumed_kwh", "debit_kwh", "remaining_balance_kwh", "energy_total_kwh", "seq", "is_duplicate"]
    readonly_fields = fields
    ordering = ["-id"]
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "recent readings"

    def get_queryset(self, request):
        # The newest 20 only: a meter reports every 30 s, so its history is long.
        queryset = super().get_queryset(request)
        ids = list(queryset.order_by("-id").values_list("id", flat=True)[:20])
        return queryset.filter(id__in=ids)

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Meter)
class MeterAdmin(admin.ModelAdmin):
    list_display = [
        "meter_no", "owner", "balance_kwh", "online", "relay_state", "relay_override", "last_seen_at", "reg_id",
        "energy_held_kwh", "anomaly", "firmware", "ota_state",
    ]
    list_filter = [ArrearsFilter, HeldFilter, "online", "relay_state", "relay_override", "tariff"]
    search_fields = ["meter_no", "owner__name", "owner__phone"]
    raw_id_fields = ["owner"]
    readonly_fields = [
        "balance_kwh", "reg_id", "last_energy_total_kwh", "energy_floor_kwh", "last_energy_seq", "energy_suspect_kwh",
        "energy_held_kwh", "last_reported_balance_kwh", "last_seen_at", "online", "relay_state", "relay_override",
        "last_resync_at", "anomaly", "created_at", "firmware", "ota_state", "ota_version", "mqtt_credential",
    ]
    inlines = [RecentReadingInline]
    actions = [
        "adjust_balance", "push_balance", "release_held_energy", "dismiss_held_energy", "issue_credentials",
        "revoke_credentials",
    ]

    # Each action needs the permission of its staff role (portal's staff-roles migration).
    def has_adjust_permission(self, request):
        return request.user.has_perm("meters.adjust_balance")

    def has_resend_permission(self, request):
        return request.user.has_perm("meters.resend_balance")

    def has_review_permission(self, request):
        return request.user.has_perm("meters.review_registers")

    def has_credentials_permission(self, request):
        return request.user.has_perm("meters.manage_credentials")

    @admin.display(description="MQTT credential")
    def mqtt_credential(self, obj):
        credential = MeterCredential.objects.filter(meter=obj).first()
        if credential is None:
            return "none issued"
        if credential.revoked_at:
            return f"revoked {credential.revoked_at:%Y-%m-%d %H:%M} by {credential.revoked_by}"
        return f"issued {credential.issued_at:%Y-%m-%d %H:%M} by {credential.issued_by}"

    def _credentials_page(self, request, issued):
        return render(request, "admin/meters/credentials_issued.html", {
            **self.admin_site.each_context(request), "title": "New MQTT passwords", "issued": issued,
            "opts": self.model._meta, "back": reverse("admin:meters_meter_changelist"),
        })

    def response_add(self, request, obj, post_url_continue=None):
        # The new meter's broker password, this once (not in a message: those outlive the page).
        if getattr(obj, "issued_password", None):
            return self._credentials_page(request, [(obj.meter_no, obj.issued_password)])
        return super().response_add(request, obj, post_url_continue)

    @admin.action(description="MQTT: issue a new password (shown once)", permissions=["credentials"])
    def issue_credentials(self, request, queryset):
        issued = [(m.meter_no, services.meter_credential_issue(meter_no=m.meter_no, actor=request.user)) for m in queryset]
        return self._credentials_page(request, issued)

    @admin.action(description="MQTT: revoke the password (the broker refuses the meter)", permissions=["credentials"])
    def revoke_credentials(self, request, queryset):
        for meter in queryset:
            services.meter_credential_revoke(meter_no=meter.meter_no, actor=request.user)
        self.message_user(request, f"Revoked the MQTT password of {queryset.count()} meter(s).", messages.SUCCESS)

    def get_readonly_fields(self, request, obj=None):
        # The meter number is the device's identity: set once at provisioning.
        return self.readonly_fields + (["meter_no"] if obj else [])

    @admin.action(description="Adjust balance (with a reason)", permissions=["adjust"])
    def adjust_balance(self, request, queryset):
        if "apply" in request.POST:
            form = AdjustmentForm(request.POST)
            if form.is_valid():
                done = waiting = 0
                for meter in queryset:
                    try:
                        outcome = adjustments.adjustment_request(
                            meter_no=meter.meter_no,
                            units_kwh=form.cleaned_data["units_kwh"],
                            reason=form.cleaned_data["reason"],
                            actor=request.user,
                        )
                    except DomainError as error:
                        self.message_user(request, f"{meter.meter_no}: {error.message}", messages.ERROR)
                        continue
                    waiting += outcome.pending
                    done += not outcome.pending
                if done:
                    self.message_user(request, f"Adjusted {done} meter(s).", messages.SUCCESS)
                if waiting:
                    self.message_user(
                        request, f"{waiting} adjustment(s) above {adjustments.approval_threshold_kwh()} kWh wait for a "
                        "second staff member's approval (Adjustment requests).", messages.WARNING,
                    )
                return None
        else:
            form = AdjustmentForm()
        context = {
            **self.admin_site.each_context(request),
            "title": "Adjust balance",
            "meters": queryset,
            "form": form,
            "action": "adjust_balance",
            "opts": self.model._meta,
        }
        return render(request, "admin/meters/adjust_balance.html", context)

    def _decide(self, request, queryset, *, title: str, service, done: str):
        """A staff decision per meter, through its service, with a note (kept in the audit)."""
        if "apply" in request.POST:
            form = NoteForm(request.POST)
            if form.is_valid():
                for meter in queryset:
                    try:
                        service(meter_no=meter.meter_no, actor=request.user, note=form.cleaned_data["note"])
                    except DomainError as error:
                        self.message_user(request, f"{meter.meter_no}: {error.message}", messages.ERROR)
                        continue
                    self.message_user(request, f"{meter.meter_no}: {done}", messages.SUCCESS)
                return None
        else:
            form = NoteForm()
        return render(request, "admin/meters/note_action.html", {
            **self.admin_site.each_context(request), "title": title, "objects": queryset, "form": form,
            "action": request.POST.get("action"), "opts": self.model._meta,
        })

    @admin.action(description="Held energy: it was drawn, debit it", permissions=["review"])
    def release_held_energy(self, request, queryset):
        return self._decide(request, queryset, title="Release held energy (debit it)", service=registers.energy_held_release,
                            done="held energy debited")

    @admin.action(description="Held energy: it was not real, forget it", permissions=["review"])
    def dismiss_held_energy(self, request, queryset):
        return self._decide(request, queryset, title="Dismiss held energy (not debited)",
                            service=registers.energy_held_dismiss, done="held energy dismissed")

    @admin.action(description="Send the current balance to the meter", permissions=["resend"])
    def push_balance(self, request, queryset):
        for meter in queryset:
            services.meter_command_queue_balance(meter_no=meter.meter_no, reason="resync", actor=request.user.get_username())
        self.message_user(request, f"Queued {queryset.count()} balance command(s).", messages.SUCCESS)

    def save_model(self, request, obj, form, change):
        # Creating or re-assigning a meter goes through the services; the balance never does.
        if change:
            services.meter_update(meter_no=obj.meter_no, owner=obj.owner, tariff=obj.tariff, rated_max_kw=obj.rated_max_kw)
        else:
            saved = services.meter_provision(
                meter_no=obj.meter_no, owner=obj.owner, tariff=obj.tariff, rated_max_kw=obj.rated_max_kw,
                actor=request.user.get_username(),
            )
            obj.pk, obj.issued_password = saved.pk, saved.issued_password


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "meter", "kind", "units_kwh", "amount_kes", "actor", "approved_by", "reason"]
    list_filter = ["kind", "created_at"]
    search_fields = ["meter__meter_no", "idempotency_key", "actor", "reason"]
    list_select_related = ["meter"]


@admin.register(Reading)
class ReadingAdmin(ReadOnlyAdmin):
    list_display = [
        "id", "meter", "reading_at", "units_consumed_kwh", "debit_kwh", "remaining_balance_kwh",
        "energy_total_kwh", "seq", "is_duplicate", "time_trusted",
    ]
    list_filter = ["is_duplicate", "time_trusted"]
    search_fields = ["meter__meter_no"]
    list_select_related = ["meter"]


@admin.register(StatusEvent)
class StatusEventAdmin(ReadOnlyAdmin):
    list_display = ["id", "meter", "status", "message", "balance_kwh", "wifi_rssi", "relay", "received_at"]
    list_filter = ["status"]
    search_fields = ["meter__meter_no", "message"]
    list_select_related = ["meter"]


@admin.register(MeterCommand)
class MeterCommandAdmin(ReadOnlyAdmin):
    list_display = [
        "id", "meter", "kind", "reason", "balance_kwh", "relay_state", "status", "attempts",
        "issued_at", "sent_at", "acknowledged_at",
    ]
    list_filter = ["kind", "status", "reason"]
    search_fields = ["meter__meter_no", "cmd_id"]
    list_select_related = ["meter"]


class MirrorPendingFilter(admin.SimpleListFilter):
    title = "mirror"
    parameter_name = "pending"

    def lookups(self, request, model_admin):
        return [("yes", "Pending (changed since the last write)"), ("no", "Up to date")]

    def queryset(self, request, queryset):
        from django.db.models import F

        if self.value() == "yes":
            return queryset.filter(version__gt=F("synced_version"))
        if self.value() == "no":
            return queryset.filter(version__lte=F("synced_version"))
        return queryset


@admin.register(FirebaseMirror)
class FirebaseMirrorAdmin(ReadOnlyAdmin):
    """Where the Firebase mirror stands per meter (meters.firebase writes it; nobody edits it)."""

    list_display = ["meter", "version", "synced_version", "is_pending", "marked_at", "synced_at"]
    list_filter = [MirrorPendingFilter]
    search_fields = ["meter__meter_no"]
    list_select_related = ["meter"]
    ordering = ["-marked_at"]

    @admin.display(boolean=True, description="pending")
    def is_pending(self, obj):
        return obj.version > obj.synced_version


@admin.register(RegisterHistory)
class RegisterHistoryAdmin(ReadOnlyAdmin):
    """Register histories (PROTOCOL.md regId): resets are shown here; provisional ones (meters
    without regId) await staff: confirm the reset, or merge the history back."""

    list_display = ["meter", "reg_id", "kind", "current", "review", "floor_kwh", "high_kwh", "held_kwh", "opened_at",
                    "closed_at", "reason"]
    list_filter = ["review", "kind", "current"]
    search_fields = ["meter__meter_no", "reg_id", "reason"]
    list_select_related = ["meter"]
    actions = ["confirm_reset", "merge_back"]

    def has_decide_permission(self, request):
        return request.user.is_staff and request.user.has_perm("meters.review_registers")

    def _decide(self, request, queryset, *, title, service, done):
        if "apply" in request.POST:
            form = NoteForm(request.POST)
            if form.is_valid():
                for history in queryset.select_related("meter"):
                    try:
                        service(meter_no=history.meter.meter_no, reg_id=history.reg_id, actor=request.user,
                                note=form.cleaned_data["note"])
                    except DomainError as error:
                        self.message_user(request, f"{history}: {error.message}", messages.ERROR)
                        continue
                    self.message_user(request, f"{history.meter.meter_no} {history.reg_id}: {done}", messages.SUCCESS)
                return None
        else:
            form = NoteForm()
        return render(request, "admin/meters/note_action.html", {
            **self.admin_site.each_context(request), "title": title, "objects": queryset, "form": form,
            "action": request.POST.get("action"), "opts": self.model._meta,
        })

    @admin.action(description="Provisional history: confirm it was a reset", permissions=["decide"])
    def confirm_reset(self, request, queryset):
        return self._decide(request, queryset, title="Confirm register resets", service=registers.register_history_confirm,
                            done="confirmed")

    @admin.action(description="Provisional history: merge it back (it was no reset)", permissions=["decide"])
    def merge_back(self, request, queryset):
        return self._decide(request, queryset, title="Merge provisional histories back",
                            service=registers.register_history_merge, done="merged back")


@admin.register(AdjustmentRequest)
class AdjustmentRequestAdmin(ReadOnlyAdmin):
    """Large adjustments waiting for a second staff member (meters.adjustments): approve (it posts,
    once, with both names on the ledger entry) or reject with a note. Never edited by hand."""

    list_display = ["id", "requested_at", "meter", "units_kwh", "reason", "requested_by", "status", "decided_by",
                    "decided_at", "ledger_entry"]
    list_filter = ["status"]
    search_fields = ["meter__meter_no", "reason", "requested_by__username"]
    list_select_related = ["meter", "requested_by", "decided_by"]
    actions = ["approve", "reject"]

    def has_approve_permission(self, request):
        return request.user.has_perm("meters.approve_adjustment")

    def _decide(self, request, queryset, *, approve: bool):
        if "apply" in request.POST:
            form = NoteForm(request.POST) if not approve else None
            if approve or form.is_valid():
                for item in queryset.filter(status=AdjustmentStatus.PENDING):
                    try:
                        if approve:
                            adjustments.adjustment_approve(request_id=item.pk, approver=request.user)
                        else:
                            adjustments.adjustment_reject(request_id=item.pk, approver=request.user,
                                                          note=form.cleaned_data["note"])
                    except DomainError as error:
                        self.message_user(request, f"Request {item.pk}: {error.message}", messages.ERROR)
                        continue
                    self.message_user(request, f"Request {item.pk} {'approved and posted' if approve else 'rejected'}",
                                      messages.SUCCESS)
                return None
        return render(request, "admin/meters/note_action.html", {
            **self.admin_site.each_context(request), "title": "Approve adjustments" if approve else "Reject adjustments",
            "objects": queryset, "form": NoteForm() if not approve else forms.Form(), "action": request.POST.get("action"),
            "opts": self.model._meta,
        })

    @admin.action(description="Approve: post the adjustment (a second staff member)", permissions=["approve"])
    def approve(self, request, queryset):
        return self._decide(request, queryset, approve=True)

    @admin.action(description="Reject the adjustment (with a note)", permissions=["approve"])
    def reject(self, request, queryset):
        return self._decide(request, queryset, approve=False)
