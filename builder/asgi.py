"""ASGI entry point: HTTP through Django (request bodies refused before they are read when over their address's
limit or sent by nobody signed in: ``builder.core.body_limits``), websockets through Channels (signed-in sessions,
checked origin, port included: ``builder.core.origin``). Served by uvicorn, which hands bodies over in chunks with
flow control."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "builder.settings")
# Django must be set up before the routing modules import models and consumers.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from builder.core.body_limits import RequestBodyLimits  # noqa: E402
from builder.core.origin import SameOriginValidator  # noqa: E402
from builder.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": RequestBodyLimits(django_asgi_app),
        # The Origin's host must be allowed, and the Origin must be the address the socket was opened to (its port
        # included), or a trusted origin.
        "websocket": AllowedHostsOriginValidator(
            SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
        ),
    }
)
