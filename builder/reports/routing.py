from django.urls import path

from builder.reports.consumers import PlaygroundConsumer

websocket_urlpatterns = [
    path("ws/playground/<int:job_id>/", PlaygroundConsumer.as_asgi()),
]
