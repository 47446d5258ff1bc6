"""ASGI entry point: HTTP through Django (request bodies refused before they are read when over their address's
limit or sent by nobody signed in: ``builder.core.body_limits``), websockets through Channels (signed-in sessions,
checked origin, port included: ``builder.core.origin``; or an API token, with no origin to check:
``builder.accounts.socket_auth``). Served by uvicorn, which hands bodies over in chunks with
flow control."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "builder.settings")
# Django must be set up before the routing modules import models and consumers.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from builder.accounts.socket_auth import TokenOrSessionSockets  # noqa: E402
from builder.core.body_limits import RequestBodyLimits  # noqa: E402
from builder.core.origin import SameOriginValidator  # noqa: E402
from builder.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": RequestBodyLimits(django_asgi_app),
        # A socket that presents an API token is that token's user and nobody else's (its cookie is never read), so
        # it has no Origin to check (builder/accounts/socket_auth.py says why). A browser's socket: the Origin's host
        # must be allowed, and the Origin must be the address the socket was opened to (its port included), or a
        # trusted origin; then its session cookie says who it is.
        "websocket": TokenOrSessionSockets(
            token_app=URLRouter(websocket_urlpatterns),
            session_app=AllowedHostsOriginValidator(
                SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
            ),
        ),
    }
)
