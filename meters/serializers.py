"""Input and output shapes of the meters API. camelCase names as the mobile app's contract says;
Decimal values as strings (kWh with 6 places, KES with 2), times ISO 8601 UTC.

Serializers only shape and type-check; the rules live in the services (meters.services).
"""

from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.api import KES_FIELD, KWH_FIELD, DecimalText, Text
from core.rules import METER_NO_HELP, METER_NO_REGEX
from meters.models import Customer, RelayOverride, Tariff
from meters.selectors import meter_balance_kes


class TariffSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kesPerKwh = serializers.DecimalField(source="kes_per_kwh", max_digits=10, decimal_places=4)


class MeterSerializer(serializers.Serializer):
    meterNo = serializers.CharField(source="meter_no")
    balance = serializers.DecimalField(source="balance_kwh", help_text="Units (kWh) from the ledger", **KWH_FIELD)
    balanceKes = serializers.SerializerMethodField(help_text="What the balance is worth at the meter's tariff")
    online = serializers.BooleanField()
    relay = serializers.CharField(source="relay_state", help_text="on, off or unknown (last reported)")
    relayOverride = serializers.CharField(source="relay_override", help_text="auto, on or off (staff override)")
    lastSeen = serializers.DateTimeField(source="last_seen_at", allow_null=True)
    tariff = TariffSerializer()
    owner = serializers.IntegerField(source="owner_id", allow_null=True, help_text="Customer id")

    @extend_schema_field(serializers.DecimalField(**KES_FIELD))
    def get_balanceKes(self, meter) -> str:
        return str(meter_balance_kes(meter))


class MeterCreateSerializer(serializers.Serializer):
    meterNo = Text(validators=[RegexValidator(METER_NO_REGEX, METER_NO_HELP)])
    owner = serializers.PrimaryKeyRelatedField(queryset=Customer.objects.all(), allow_null=True)
    tariff = serializers.PrimaryKeyRelatedField(
        queryset=Tariff.objects.all(), required=False, help_text="Default: the newest tariff in effect"
    )


class MeterUpdateSerializer(serializers.Serializer):
    owner = serializers.PrimaryKeyRelatedField(
        queryset=Customer.objects.all(), required=False, allow_null=True, help_text="Customer id; null: no owner"
    )
    tariff = serializers.PrimaryKeyRelatedField(queryset=Tariff.objects.all(), required=False)


class LedgerEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField(help_text="payment_credit, consumption_debit or adjustment")
    units = serializers.DecimalField(source="units_kwh", help_text="Signed: credits positive, debits negative", **KWH_FIELD)
    amountKes = serializers.DecimalField(source="amount_kes", allow_null=True, **KES_FIELD)
    reason = serializers.CharField()
    actor = serializers.CharField()
    approvedBy = serializers.CharField(source="approved_by", help_text="The second staff member of a large adjustment")
    createdAt = serializers.DateTimeField(source="created_at")


class StatementEntrySerializer(LedgerEntrySerializer):
    balanceAfter = serializers.DecimalField(source="balance_after_kwh", **KWH_FIELD)


class AdjustmentSerializer(serializers.Serializer):
    units = DecimalText(help_text="Signed kWh, not zero", **KWH_FIELD)
    reason = Text(max_length=255)


class AdjustmentResultSerializer(serializers.Serializer):
    entry = LedgerEntrySerializer()
    balance = serializers.DecimalField(help_text="The meter's balance after the adjustment", **KWH_FIELD)
    created = serializers.BooleanField(help_text="False when an Idempotency-Key repeated an earlier adjustment")


class PendingAdjustmentSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    meterNo = serializers.CharField(source="meter.meter_no")
    units = serializers.DecimalField(source="units_kwh", **KWH_FIELD)
    reason = serializers.CharField()
    status = serializers.CharField(help_text="pending (awaiting a second staff member), approved, rejected")
    requestedBy = serializers.CharField(source="requested_by.username")
    requestedAt = serializers.DateTimeField(source="requested_at")
    decidedBy = serializers.CharField(source="decided_by.username", allow_null=True, default=None)
    decidedAt = serializers.DateTimeField(source="decided_at", allow_null=True)
    entryId = serializers.IntegerField(source="ledger_entry_id", allow_null=True, help_text="The posting, once approved")


class AdjustmentDecisionSerializer(serializers.Serializer):
    note = Text(max_length=255, required=False, allow_blank=True, help_text="Why (required to reject)")


class CredentialIssuedSerializer(serializers.Serializer):
    username = serializers.CharField(help_text="The meter's broker username: its meterNo")
    password = serializers.CharField(help_text="Shown this once; stored only as the broker's hash")


class RelaySerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=RelayOverride.values)
    reason = Text(max_length=32)


class CommandSerializer(serializers.Serializer):
    cmdId = serializers.CharField(source="cmd_id")
    kind = serializers.CharField()
    reason = serializers.CharField()
    status = serializers.CharField()
    balance = serializers.DecimalField(source="balance_kwh", allow_null=True, **KWH_FIELD)
    relayState = serializers.CharField(source="relay_state")
    issuedAt = serializers.DateTimeField(source="issued_at")


class ReadingsQuerySerializer(serializers.Serializer):
    # `from` is a Python keyword: the field is declared as from_ and renamed in get_fields.
    from_ = serializers.DateTimeField(
        required=False, help_text="Start (inclusive), ISO 8601. Default: `to` minus 1 day (hour) or 30 days (day)"
    )
    to = serializers.DateTimeField(required=False, help_text="End (exclusive), ISO 8601. Default: now")
    bucket = serializers.ChoiceField(choices=["hour", "day"], default="hour")

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields

    @staticmethod
    def _in_range(value):
        # Far-off years would overflow date arithmetic (defaults, bucket steps) and mean nothing here.
        if not 2000 <= value.year <= 2999:
            raise serializers.ValidationError("Must be between the years 2000 and 2999")
        return value

    def validate_from(self, value):
        return self._in_range(value)

    def validate_to(self, value):
        return self._in_range(value)


class ReadingBucketSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    units = serializers.DecimalField(help_text="Units the meter reported consumed (duplicates excluded)", **KWH_FIELD)
    debited = serializers.DecimalField(help_text="Units debited from the ledger for these reports", **KWH_FIELD)
    reports = serializers.IntegerField()


class ReadingsSerializer(serializers.Serializer):
    meterNo = serializers.CharField()
    bucket = serializers.CharField()
    start = serializers.DateTimeField(help_text="Start of the first bucket")
    end = serializers.DateTimeField(help_text="End of the range (exclusive)")
    totalUnits = serializers.DecimalField(**KWH_FIELD)
    results = ReadingBucketSerializer(many=True)


class CustomerCreateSerializer(serializers.Serializer):
    username = Text(max_length=150, validators=[UnicodeUsernameValidator()])
    password = Text(write_only=True, min_length=8, max_length=128, style={"input_type": "password"})
    name = Text(max_length=120)
    phone = Text(max_length=20, help_text="07XXXXXXXX, 01XXXXXXXX, +2547… or 2547…")
    email = serializers.EmailField(required=False, allow_blank=True, default="")


class CustomerSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField(source="user.username")
    name = serializers.CharField()
    phone = serializers.CharField()
    email = serializers.CharField(source="user.email")
    createdAt = serializers.DateTimeField(source="created_at")
