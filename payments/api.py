"""The payments part of the REST API: start an STK push, list and poll payments.

Reads go through payments.selectors (`payment_get_for_user` is the object-level check: someone
else's payment is a 404); the push goes through `payments.services.stk_push_start`, which does
its own meter check with meters.selectors.meter_get_for_user.
"""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status, throttling
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ERROR_FIELD_NAMES, IDEMPOTENCY_KEY_HEADER, ErrorSerializer, idempotency_key_from
from payments.selectors import payment_get_for_user, payments_for_user
from payments.serializers import PaymentSerializer, PaymentStartSerializer
from payments.services import stk_push_start


class PaymentStartThrottle(throttling.ScopedRateThrottle):
    """Each STK push makes the customer's phone ring with a PIN prompt: limit how often one
    user can start them. Reading payments (polling) is not limited here."""

    scope_attr = "throttle_scope"

    def allow_request(self, request, view):
        if request.method != "POST":
            return True
        return super().allow_request(request, view)


MPESA_DOWN = OpenApiResponse(
    ErrorSerializer, description="M-Pesa refused (502) or could not be reached (503); nothing was charged"
)


class PaymentListView(generics.GenericAPIView):
    serializer_class = PaymentSerializer
    throttle_classes = [PaymentStartThrottle]
    throttle_scope = "payments"
    error_field_names = ERROR_FIELD_NAMES
    may_not_find = ("POST",)  # a meterNo in the body that is not the caller's

    def get_queryset(self):
        return payments_for_user(user=self.request.user)

    @extend_schema(summary="Payments for your meters (staff: all), newest first", responses=PaymentSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(PaymentSerializer(page, many=True).data)

    @extend_schema(
        summary="Buy units: prompt the phone to pay with M-Pesa (STK push); then poll payments/{id}/",
        request=PaymentStartSerializer,
        parameters=[IDEMPOTENCY_KEY_HEADER],
        responses={
            201: PaymentSerializer,
            (200, "application/json"): OpenApiResponse(PaymentSerializer, description="A retry: the first payment"),
            502: MPESA_DOWN,
            503: MPESA_DOWN,
        },
    )
    def post(self, request):
        data = PaymentStartSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = idempotency_key_from(request)
        # Only for the status code (201 new, 200 a retry): the service itself returns the first
        # payment for a repeated key, races included.
        retry = bool(key) and self.get_queryset().filter(initiated_by=request.user, client_idempotency_key=key).exists()
        payment = stk_push_start(
            user=request.user,
            meter_no=data.validated_data["meterNo"],
            phone=data.validated_data["phone"],
            amount_kes=data.validated_data["amount"],
            idempotency_key=key,
        )
        payment = payment_get_for_user(user=request.user, payment_id=payment.pk)
        return Response(PaymentSerializer(payment).data, status=status.HTTP_200_OK if retry else status.HTTP_201_CREATED)


class PaymentDetailView(APIView):
    error_field_names = {**ERROR_FIELD_NAMES, "payment_id": "id"}

    @extend_schema(summary="One payment (poll this after starting a push)", responses=PaymentSerializer)
    def get(self, request, id: int):
        return Response(PaymentSerializer(payment_get_for_user(user=request.user, payment_id=id)).data)
