from typing import Any

from django.conf import settings
from django.http import HttpRequest


def platform(request: HttpRequest) -> dict[str, Any]:
    """Values every page's layout needs."""
    return {"signup_enabled": settings.SIGNUP_ENABLED}
