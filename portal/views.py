"""Customer-facing pages. Thin: they read through selectors, write through services, render."""

import uuid

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from core.errors import DomainError, NotFound
from meters.selectors import meter_balance_kes, meter_get_for_user, meters_for_user, recent_readings
from payments.models import PaymentStatus
from payments.selectors import payments_for_user
from payments.services import stk_push_start


class BuyUnitsForm(forms.Form):
    phone = forms.CharField(max_length=20, label="M-Pesa phone number")
    amount = forms.IntegerField(min_value=1, label="Amount (KES)")
    # A fresh key per rendered form: a double-click or a resubmitted form starts one payment.
    idempotency_key = forms.CharField(max_length=64, widget=forms.HiddenInput)


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    meters = [
        {"meter": meter, "balance_kes": meter_balance_kes(meter)}
        for meter in meters_for_user(user=request.user)
    ]
    return render(request, "portal/dashboard.html", {"meters": meters})


@login_required
def meter_detail(request: HttpRequest, meter_no: str) -> HttpResponse:
    try:
        meter = meter_get_for_user(user=request.user, meter_no=meter_no)
    except NotFound:
        raise Http404("No such meter") from None
    return render(request, "portal/meter_detail.html", _meter_context(request, meter))


def _meter_context(request: HttpRequest, meter, form: BuyUnitsForm | None = None) -> dict:
    customer = getattr(request.user, "customer", None)
    if form is None:
        form = BuyUnitsForm(initial={"phone": customer.phone if customer else "", "idempotency_key": uuid.uuid4().hex})
    return {
        "meter": meter,
        "balance_kes": meter_balance_kes(meter),
        "readings": recent_readings(meter=meter, limit=20),
        "payments": payments_for_user(user=request.user).filter(meter=meter)[:10],
        "form": form,
    }


@login_required
@require_POST
def buy_units(request: HttpRequest, meter_no: str) -> HttpResponse:
    """Start an M-Pesa STK push: the customer approves it with their PIN on the phone."""
    try:
        meter = meter_get_for_user(user=request.user, meter_no=meter_no)
    except NotFound:
        raise Http404("No such meter") from None
    form = BuyUnitsForm(request.POST)
    if form.is_valid():
        try:
            payment = stk_push_start(
                user=request.user,
                meter_no=meter.meter_no,
                phone=form.cleaned_data["phone"],
                amount_kes=form.cleaned_data["amount"],
                idempotency_key=form.cleaned_data["idempotency_key"],
            )
        except DomainError as error:
            form.add_error(error.field if error.field in form.fields else None, error.message)
        else:
            if payment.status == PaymentStatus.CHECKING:
                messages.warning(
                    request, f"M-Pesa did not answer in time, so we are checking. If your phone {payment.phone} asks for "
                    f"your PIN to pay KES {payment.amount_kes}, you can pay: your units are safe either way.",
                )
            else:
                messages.success(
                    request, f"Check your phone {payment.phone} and enter your M-Pesa PIN to pay KES {payment.amount_kes}."
                )
            return redirect("meter-detail", meter_no=meter.meter_no)
    return render(request, "portal/meter_detail.html", _meter_context(request, meter, form), status=400)


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
