"""Staff view of M-Pesa: payments with their raw callbacks and audit trail, and the only staff
changes to them, each through a service: "Query M-Pesa now", and for payments that need review
"Credit", "Same money as payment …" and "Close with note". Payments, callbacks and audit rows are
never edited by hand here.
"""

from django import forms
from django.contrib import admin, messages
from django.shortcuts import render

from core.admin import ReadOnlyMixin
from core.errors import DomainError, InvalidInput
from payments import services
from payments.models import Callback, Payment, PaymentAudit, PaymentStatus


class CallbackInline(ReadOnlyMixin, admin.TabularInline):
    model = Callback
    fields = ["received_at", "kind", "status", "outcome", "error", "remote_addr", "body"]
    readonly_fields = fields
    extra = 0
    show_change_link = True


class AuditInline(ReadOnlyMixin, admin.TabularInline):
    model = PaymentAudit
    fields = ["created_at", "actor_name", "action", "from_status", "to_status", "note"]
    readonly_fields = fields
    extra = 0


class ResolutionForm(forms.Form):
    note = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), help_text="Why (kept with the payment and in the audit trail)"
    )
    receipt = forms.CharField(
        required=False, max_length=32, help_text="Credit only: the M-Pesa receipt, if known (e.g. from the M-Pesa portal)"
    )
    meter_no = forms.CharField(
        required=False, max_length=32, label="Meter",
        help_text="Credit only: the meter to credit, for money that named none (or named the wrong one)",
    )
    same_as = forms.IntegerField(
        required=False, label="Same money as payment", help_text="Same money only: the id of the payment this money is"
    )


@admin.register(Payment)
class PaymentAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = [
        "id", "created_at", "meter", "channel", "status", "paid_via", "amount_kes", "units_kwh", "phone",
        "mpesa_receipt", "checkout_request_id", "same_money_as", "review_reason",
    ]
    list_filter = ["status", "channel", "paid_via", "created_at"]
    search_fields = ["meter__meter_no", "mpesa_receipt", "checkout_request_id", "c2b_trans_id", "phone", "bill_ref"]
    date_hierarchy = "created_at"
    inlines = [CallbackInline, AuditInline]
    actions = ["query_now", "resolve_credit", "resolve_same_money", "resolve_close"]

    def has_resolve_permission(self, request):
        # The form stays read-only (no change permission in the admin's sense); the actions,
        # which change payments only through services, need staff with payments.change_payment.
        return request.user.is_staff and request.user.has_perm("payments.change_payment")

    @admin.action(description="Query M-Pesa now (STK pushes)", permissions=["resolve"])
    def query_now(self, request, queryset):
        for payment in queryset:
            try:
                result = services.payment_query(payment_id=payment.pk, actor=request.user)
            except DomainError as error:
                self.message_user(request, f"Payment {payment.pk}: {error.message}", messages.ERROR)
                continue
            self.message_user(request, f"Payment {payment.pk}: {result.get_status_display()}", messages.INFO)

    _RESOLUTIONS = {
        "credit": ("Credit payments that need review", "credited"),
        "same_money": ("Record payments that need review as the same money as another payment", "recorded"),
        "close": ("Close payments that need review", "closed"),
    }

    def _resolve(self, request, queryset, *, how: str):
        title, done = self._RESOLUTIONS[how]
        if "apply" in request.POST:
            form = ResolutionForm(request.POST)
            if form.is_valid():
                data = form.cleaned_data
                for payment in queryset:
                    try:
                        if how == "credit":
                            services.payment_resolve_credit(
                                payment_id=payment.pk, actor=request.user, note=data["note"],
                                receipt=data["receipt"] or None, meter_no=data["meter_no"] or None,
                            )
                        elif how == "same_money":
                            if not data["same_as"]:
                                raise InvalidInput("Say which payment this money is")
                            services.payment_resolve_same_money(
                                payment_id=payment.pk, actor=request.user, note=data["note"], same_as_id=data["same_as"]
                            )
                        else:
                            services.payment_resolve_close(payment_id=payment.pk, actor=request.user, note=data["note"])
                    except DomainError as error:
                        self.message_user(request, f"Payment {payment.pk}: {error.message}", messages.ERROR)
                        continue
                    self.message_user(request, f"Payment {payment.pk} {done}", messages.SUCCESS)
                return None
        else:
            form = ResolutionForm()
        return render(request, "admin/payments/resolve.html", {
            **self.admin_site.each_context(request), "title": title, "form": form, "payments": queryset,
            "action": request.POST.get("action"), "how": how, "opts": self.model._meta,
            "needs_review": PaymentStatus.NEEDS_REVIEW,
        })

    @admin.action(description="Resolve: credit the money (needs review only)", permissions=["resolve"])
    def resolve_credit(self, request, queryset):
        return self._resolve(request, queryset, how="credit")

    @admin.action(description="Resolve: same money as another payment (needs review only)", permissions=["resolve"])
    def resolve_same_money(self, request, queryset):
        return self._resolve(request, queryset, how="same_money")

    @admin.action(description="Resolve: close as failed with a note (needs review only)", permissions=["resolve"])
    def resolve_close(self, request, queryset):
        return self._resolve(request, queryset, how="close")


@admin.register(Callback)
class CallbackAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["id", "received_at", "kind", "status", "outcome", "error", "remote_addr", "payment"]
    list_filter = ["kind", "status", "received_at"]
    search_fields = ["body", "error"]
    date_hierarchy = "received_at"


@admin.register(PaymentAudit)
class PaymentAuditAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["created_at", "payment", "actor_name", "action", "from_status", "to_status", "note"]
    list_filter = ["action"]
    search_fields = ["note", "actor_name"]
