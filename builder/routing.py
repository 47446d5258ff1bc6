"""Every app's websocket routes, in one list for asgi.py."""

from builder.core.routing import websocket_urlpatterns as core_routes
from builder.fleet.routing import websocket_urlpatterns as fleet_routes
from builder.jobs.routing import websocket_urlpatterns as job_routes
from builder.reports.routing import websocket_urlpatterns as report_routes
from builder.sweeps.routing import websocket_urlpatterns as sweep_routes

websocket_urlpatterns = [*core_routes, *job_routes, *report_routes, *sweep_routes, *fleet_routes]
