"""Input and output shapes of the payments API (camelCase, Decimal values as strings)."""

from django.core.validators import RegexValidator
from drf_spectacular.utils import OpenApiExample, extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from core.api import KES_FIELD, KWH_FIELD, DecimalText, Text
from core.rules import METER_NO_HELP, METER_NO_REGEX
from payments.selectors import payment_delivered_to_meter


class PaymentSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    meterNo = serializers.CharField(source="meter.meter_no", allow_null=True)
    channel = serializers.CharField(help_text="stk (pushed to the phone) or c2b (paid from the M-Pesa menu)")
    amount = serializers.DecimalField(source="amount_kes", help_text="KES", **KES_FIELD)
    phone = serializers.CharField(help_text="2547XXXXXXXX; empty when M-Pesa masks it")
    status = serializers.CharField(
        help_text="pending (waiting for the PIN), checking (M-Pesa's answer was lost: we are checking), succeeded, "
        "failed, cancelled, timed_out or needs_review"
    )
    paidVia = serializers.CharField(
        source="paid_via", help_text="How the money was confirmed: callback, query, c2b or staff; empty until paid"
    )
    receipt = serializers.CharField(source="mpesa_receipt", allow_null=True, help_text="M-Pesa receipt number")
    checkoutRequestId = serializers.CharField(source="checkout_request_id", allow_null=True)
    units = serializers.DecimalField(source="units_kwh", allow_null=True, help_text="kWh credited; null until then", **KWH_FIELD)
    deliveredToMeter = serializers.SerializerMethodField(help_text="The meter has acknowledged a balance including this credit")
    resultDesc = serializers.CharField(source="result_desc", help_text="M-Pesa's words about the outcome")
    createdAt = serializers.DateTimeField(source="created_at")
    resolvedAt = serializers.DateTimeField(source="resolved_at", allow_null=True)

    @extend_schema_field(serializers.BooleanField())
    def get_deliveredToMeter(self, payment) -> bool:
        return payment_delivered_to_meter(payment)


@extend_schema_serializer(
    examples=[OpenApiExample("Buy KES 100 of units", value={"meterNo": "METER001", "phone": "0712345678", "amount": "100"})]
)
class PaymentStartSerializer(serializers.Serializer):
    meterNo = Text(validators=[RegexValidator(METER_NO_REGEX, METER_NO_HELP)])
    phone = Text(max_length=20, help_text="The M-Pesa number to prompt: 07XXXXXXXX, 01XXXXXXXX, +2547… or 2547…")
    amount = DecimalText(max_digits=9, decimal_places=2, help_text="Whole KES, as a string, e.g. \"100\"")
