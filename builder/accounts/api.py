"""Account endpoints of the API: obtain a token, who am I, and the audit log."""

from __future__ import annotations

from collections.abc import Mapping

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import api_view
from rest_framework.exceptions import AuthenticationFailed, Throttled, ValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from builder.accounts import audit
from builder.accounts.models import AuditAction, AuditEvent, visible_events
from builder.accounts.signin import TOO_MANY, wait_before_signin
from builder.core.openapi import DETAIL
from builder.core.parsers import BoundedJSONParser

AUDIT_LIMIT = 500


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()


@extend_schema(responses=MeSerializer, summary="The signed-in user")
@api_view(["GET"])
def me(request: Request) -> Response:
    return Response(MeSerializer({"id": request.user.pk, "username": request.user.get_username()}).data)


class TokenView(ObtainAuthToken):
    """``POST {"username", "password"}`` → ``{"token"}``; send it as ``Authorization: Token <token>``.

    A username that failed too often from this address is refused (429, ``Retry-After``) before its password is
    checked (``builder.accounts.signin``); every issue is in the audit log.
    """

    # DRF's view lists its own JSONParser, which has no depth limit.
    parser_classes = (FormParser, MultiPartParser, BoundedJSONParser)

    def get_authenticate_header(self, request: Request) -> str:
        # A 401 carries a challenge (RFC 9110); DRF would otherwise answer 403 for this unauthenticated view.
        return 'Token realm="api"'

    @extend_schema(
        request=inline_serializer(
            "TokenRequest", {"username": serializers.CharField(), "password": serializers.CharField()}
        ),
        responses={
            200: inline_serializer("TokenResponse", {"token": serializers.CharField()}),
            401: OpenApiResponse(
                DETAIL,
                description="Wrong username or password (or an inactive account).",
            ),
            429: OpenApiResponse(description="Too many failed attempts for this username from this address."),
        },
        summary="Obtain an API token",
    )
    def post(self, request: Request, *args: object, **kwargs: object) -> Response:
        data = request.data if isinstance(request.data, Mapping) else {}
        wait = wait_before_signin(request, str(data.get("username") or ""))
        if wait is not None:
            raise Throttled(wait, TOO_MANY)  # DRF adds "Expected available in N seconds."
        serializer = self.get_serializer(data=request.data)
        if not serializer.is_valid():  # a failed sign-in is counted and audited by the auth signal
            if serializer.errors.get("non_field_errors"):
                # Well-formed credentials that do not match an account: 401 (a malformed body stays 400).
                raise AuthenticationFailed(serializer.errors["non_field_errors"][0])
            raise ValidationError(serializer.errors)
        user = serializer.validated_data["user"]
        token, _ = Token.objects.get_or_create(user=user)
        audit.record(request, AuditAction.TOKEN_ISSUED, actor=user)
        return Response({"token": token.key})


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.SerializerMethodField(help_text="Who acted (null: nobody signed in).")
    owner = serializers.SerializerMethodField(help_text="Whose account or object the event concerns.")
    ip = serializers.SerializerMethodField(help_text="The client's address; only of your own actions and of "
                                           "attempts on your account by someone not signed in.")  # fmt: skip

    class Meta:
        model = AuditEvent
        fields = ["id", "created_at", "action", "actor", "actor_name", "owner", "object_type", "object_id",
                  "object_name", "detail", "ip"]  # fmt: skip
        read_only_fields = fields

    def get_actor(self, event: AuditEvent) -> str | None:
        return event.actor.get_username() if event.actor is not None else None

    def get_owner(self, event: AuditEvent) -> str | None:
        return event.owner.get_username() if event.owner is not None else None

    def get_ip(self, event: AuditEvent) -> str | None:
        viewer = self.context["request"].user
        # Another person's address is theirs: alice sees bob's download of her job, not where bob was.
        return event.ip if event.actor_id in (None, viewer.pk) else None


@extend_schema(
    responses=AuditEventSerializer(many=True),
    summary="Your audit log, newest first",
    description=f"Sign-ins (failed ones too), API tokens, jobs launched, downloads and deletions that you did or "
    f"that concern your account or your objects; the latest {AUDIT_LIMIT}.",
)
@api_view(["GET"])
def audit_events(request: Request) -> Response:
    events = visible_events(request.user).select_related("actor", "owner")[:AUDIT_LIMIT]
    return Response(AuditEventSerializer(events, many=True, context={"request": request}).data)


urlpatterns = [
    path("auth/token", TokenView.as_view(), name="api-token"),
    path("me", me, name="api-me"),
    path("audit", audit_events, name="api-audit"),
]
