"""The account part of the REST API: sign-in tokens and the caller's own profile.

Tokens are per device (portal.models.ApiToken): POST auth/token/ issues one, DELETE auth/token/
revokes the one the request was made with, auth/tokens/ lists and revokes the others.
"""

import hashlib

from django.contrib.auth import authenticate
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, status, throttling
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import Text
from core.errors import InvalidInput
from meters.serializers import CustomerSerializer
from portal.exceptions import error_body
from portal.models import ApiToken
from portal.tokens import token_issue, token_revoke, tokens_for_user


class SignInThrottle(throttling.SimpleRateThrottle):
    """Password guessing against one account, from any number of addresses."""

    scope = "auth"

    def get_cache_key(self, request, view):
        if request.method != "POST":
            return None
        username = request.data.get("username") if hasattr(request.data, "get") else None
        if not isinstance(username, str) or not username:
            return None
        # Hashed: the username is client text and cache keys must be plain ASCII.
        ident = hashlib.sha256(username.strip().lower().encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


class SignInAddressThrottle(throttling.SimpleRateThrottle):
    """Password spraying from one address. Looser than per-account: mobile networks put many
    customers behind one carrier-NAT address."""

    scope = "auth_ip"

    def get_cache_key(self, request, view):
        if request.method != "POST":
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class SignInSerializer(serializers.Serializer):
    username = Text(max_length=150)
    password = Text(max_length=128, style={"input_type": "password"})
    device = Text(
        max_length=64, required=False, allow_blank=True, help_text="A name for this device, shown in auth/tokens/"
    )


class IssuedTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Send as `Authorization: Bearer <token>`. Shown only once.")
    id = serializers.IntegerField()
    createdAt = serializers.DateTimeField()


class TokenSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    prefix = serializers.CharField(help_text="The token's first characters")
    device = serializers.CharField()
    createdAt = serializers.DateTimeField(source="created_at")
    lastUsed = serializers.DateTimeField(source="last_used_at", allow_null=True)
    current = serializers.SerializerMethodField(help_text="True for the token this request was made with")

    def get_current(self, token) -> bool:
        request = self.context.get("request")
        return isinstance(getattr(request, "auth", None), ApiToken) and request.auth.pk == token.pk


class TokenView(APIView):
    throttle_classes = [SignInThrottle, SignInAddressThrottle]

    def get_authenticators(self):
        # Signing in ignores any credentials sent along: a stale token must not stop a new sign-in.
        if getattr(self.request, "method", None) == "POST":
            return []
        return super().get_authenticators()

    def get_permissions(self):
        if getattr(self.request, "method", None) == "POST":
            return [permissions.AllowAny()]
        return super().get_permissions()

    @extend_schema(
        summary="Sign in: a new token for this device", request=SignInSerializer, responses={201: IssuedTokenSerializer}, auth=[]
    )
    def post(self, request):
        data = SignInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = authenticate(request, username=data.validated_data["username"], password=data.validated_data["password"])
        if user is None:
            # One message whether the user exists or not, so that usernames cannot be probed.
            raise InvalidInput("Wrong username or password", field="password", code="invalid_credentials")
        token, key = token_issue(user=user, device=data.validated_data.get("device", ""))
        body = IssuedTokenSerializer({"token": key, "id": token.pk, "createdAt": token.created_at}).data
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Sign out: revoke the token this request was made with", request=None, responses={204: None})
    def delete(self, request):
        if not isinstance(request.auth, ApiToken):
            raise InvalidInput("This request was not made with a token", field="Authorization")
        token_revoke(user=request.user, token_id=request.auth.pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenListView(APIView):
    @extend_schema(summary="Your active tokens (one per device)", responses=TokenSerializer(many=True))
    def get(self, request):
        # Not paginated: a user holds at most portal.tokens.MAX_TOKENS_PER_USER tokens.
        tokens = tokens_for_user(user=request.user)
        return Response(TokenSerializer(tokens, many=True, context={"request": request}).data)


class TokenDetailView(APIView):
    @extend_schema(summary="Revoke one of your tokens (e.g. a lost phone's)", responses={204: None})
    def delete(self, request, id: int):
        token_revoke(user=request.user, token_id=id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField()
    isStaff = serializers.BooleanField(source="is_staff")
    customer = CustomerSerializer(allow_null=True, help_text="null for staff without a customer profile")


class MeView(APIView):
    @extend_schema(summary="You and your customer profile", responses=MeSerializer)
    def get(self, request):
        user = request.user
        body = {
            "id": user.pk,
            "username": user.get_username(),
            "email": user.email,
            "is_staff": user.is_staff,
            "customer": getattr(user, "customer", None),
        }
        return Response(MeSerializer(body).data)


@csrf_exempt  # an answer for any method; without this a POST would get the CSRF failure page
def not_found(request, *args, **kwargs) -> JsonResponse:
    """Unknown paths under /api/ answer in the API's error format, not with an HTML page."""
    return JsonResponse(error_body("not_found", "No such API endpoint"), status=404)
