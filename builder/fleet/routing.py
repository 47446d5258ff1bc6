from django.urls import path

from builder.fleet.consumers import WorkersConsumer

websocket_urlpatterns = [
    path("ws/workers/", WorkersConsumer.as_asgi()),
]
