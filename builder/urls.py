from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from builder.core.views import api_not_found, healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("accounts/", include("builder.accounts.urls")),
    path("api/", include("builder.accounts.api")),
    path("api/", include("builder.jobs.api")),
    path("api/", include("builder.datasets.api")),
    path("api/", include("builder.configs.api")),
    path("api/", include("builder.reports.api")),
    path("api/", include("builder.checkpoints.api")),
    path("api/", include("builder.sweeps.api")),
    path("api/", include("builder.fleet.api")),
    path("api/schema", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # Last of the API: a URL below /api/ that matched nothing (a malformed id, a typo) answers JSON, not HTML.
    re_path(r"^api/", api_not_found),  # a prefix: any rest, newlines included
    path("datasets/", include("builder.datasets.urls")),
    path("jobs/", include("builder.jobs.urls")),
    path("configure/", include("builder.configs.urls")),
    path("reports/", include("builder.reports.urls")),
    path("checkpoints/", include("builder.checkpoints.urls")),
    path("sweeps/", include("builder.sweeps.urls")),
    path("workers/", include("builder.fleet.urls")),
    path("", include("builder.core.urls")),
]
