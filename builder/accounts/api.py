"""Account endpoints of the API: obtain a token, and who am I."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()


@extend_schema(responses=MeSerializer, summary="The signed-in user")
@api_view(["GET"])
def me(request: Request) -> Response:
    return Response(MeSerializer({"id": request.user.pk, "username": request.user.get_username()}).data)


class TokenView(ObtainAuthToken):
    """``POST {"username", "password"}`` → ``{"token"}``; send it as ``Authorization: Token <token>``."""

    @extend_schema(
        request=inline_serializer(
            "TokenRequest", {"username": serializers.CharField(), "password": serializers.CharField()}
        ),
        responses=inline_serializer("TokenResponse", {"token": serializers.CharField()}),
        summary="Obtain an API token",
    )
    def post(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().post(request, *args, **kwargs)


urlpatterns = [
    path("auth/token", TokenView.as_view(), name="api-token"),
    path("me", me, name="api-me"),
]
