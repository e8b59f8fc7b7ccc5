"""Dead letters in the REST API (staff only): MQTT messages the worker refused, with why."""

import base64

from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, serializers

from core.api import StaffPermission
from mqtt_worker.models import DeadLetter


class DeadLetterSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    topic = serializers.CharField()
    payload = serializers.CharField(source="payload_text", help_text="As text; bytes that are not UTF-8 as \\xNN")
    payloadBase64 = serializers.SerializerMethodField(help_text="The exact bytes received")
    reason = serializers.CharField()
    receivedAt = serializers.DateTimeField(source="received_at")
    clientId = serializers.CharField(source="client_id", help_text="The worker that received it")

    def get_payloadBase64(self, letter) -> str:
        return base64.b64encode(bytes(letter.payload)).decode("ascii")


class DeadLetterListView(generics.GenericAPIView):
    permission_classes = [permissions.IsAdminUser, StaffPermission]
    staff_permissions = {"GET": "mqtt_worker.view_deadletter"}
    serializer_class = DeadLetterSerializer

    @extend_schema(summary="Rejected MQTT messages, newest first (staff)", responses=DeadLetterSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(DeadLetter.objects.order_by("-id"))
        return self.get_paginated_response(DeadLetterSerializer(page, many=True).data)
