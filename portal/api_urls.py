"""/api/v1/: the REST API for the mobile app and the utility's tools. The paths are a contract."""

from django.urls import include, path, register_converter

from core.rules import METER_NO_PATTERN
from meters import api as meters_api
from mqtt_worker import api as mqtt_api
from payments import api as payments_api
from portal import api as portal_api


class MeterNoConverter:
    # PROTOCOL.md meterNo; anything else cannot name a meter, so it is a 404 like any unknown path.
    regex = METER_NO_PATTERN

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(MeterNoConverter, "meter_no")

urlpatterns = [
    path("auth/token/", portal_api.TokenView.as_view(), name="api-token"),
    path("auth/tokens/", portal_api.TokenListView.as_view(), name="api-tokens"),
    path("auth/tokens/<int:id>/", portal_api.TokenDetailView.as_view(), name="api-token-detail"),
    path("me/", portal_api.MeView.as_view(), name="api-me"),
    path("customers/", meters_api.CustomerCreateView.as_view(), name="api-customers"),
    path("meters/", meters_api.MeterListView.as_view(), name="api-meters"),
    path("meters/<meter_no:meterNo>/", meters_api.MeterDetailView.as_view(), name="api-meter"),
    path("meters/<meter_no:meterNo>/readings/", meters_api.ReadingsView.as_view(), name="api-meter-readings"),
    path("meters/<meter_no:meterNo>/statement/", meters_api.StatementView.as_view(), name="api-meter-statement"),
    path("meters/<meter_no:meterNo>/adjustments/", meters_api.AdjustmentView.as_view(), name="api-meter-adjustments"),
    path("meters/<meter_no:meterNo>/resync/", meters_api.ResyncView.as_view(), name="api-meter-resync"),
    path("meters/<meter_no:meterNo>/relay/", meters_api.RelayView.as_view(), name="api-meter-relay"),
    path("meters/<meter_no:meterNo>/credentials/", meters_api.CredentialView.as_view(), name="api-meter-credentials"),
    path("adjustment-requests/", meters_api.AdjustmentRequestListView.as_view(), name="api-adjustment-requests"),
    path("adjustment-requests/<int:id>/approve/", meters_api.AdjustmentDecisionView.as_view(decision="approve"),
         name="api-adjustment-approve"),
    path("adjustment-requests/<int:id>/reject/", meters_api.AdjustmentDecisionView.as_view(decision="reject"),
         name="api-adjustment-reject"),
    path("payments/", payments_api.PaymentListView.as_view(), name="api-payments"),
    path("payments/<int:id>/", payments_api.PaymentDetailView.as_view(), name="api-payment"),
    path("dead-letters/", mqtt_api.DeadLetterListView.as_view(), name="api-dead-letters"),
    path("firmware/", include("meters.ota.api_urls")),  # OTA releases and rollouts (meters.ota.api)
]
