"""Rate limits: one cache-based counter behind the API's throttles and the HTML forms.

A ``RateLimit`` counts hits of one scope per identity (a user id, an address and a username...) in fixed windows
of the scope's period, in Django's cache: Redis in every real deployment (``CACHES``), so every web process counts
into the same counter, and the count is Redis's atomic ``INCR`` (no read-modify-write race between processes, where
DRF's own throttles keep a list per identity that concurrent requests overwrite). A fixed window lets at most twice
the rate through across a window boundary: enough for what these limits are for (brute-forcing passwords, flooding
the queue), and one key per identity instead of one entry per request.

Rates are DRF's ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (``"10/min"``), read at each use so tests can change
them. Over the limit, an API view answers DRF's ``Throttled`` (429 with ``Retry-After``) and a page answers 429 with
the same header and a message; ``Retry-After`` is the time left in the window.

When the cache cannot be reached the limit lets requests through (and logs it): signing in and submitting while
Redis is down matters more than counting. Django's cache raises the client's own errors, so any exception counts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from rest_framework.exceptions import Throttled
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from builder.env import RATE_PERIODS

log = logging.getLogger(__name__)
KEY_PREFIX = "ratelimit"


@dataclass(frozen=True)
class Rate:
    """``count`` hits per ``period`` seconds."""

    count: int
    period: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        count, _, period = text.partition("/")
        return cls(int(count), RATE_PERIODS[period])


def client_ip(request: Any) -> str:
    """The client's address as DRF's throttles see it (``REST_FRAMEWORK["NUM_PROXIES"]`` trusted proxies)."""
    return str(BaseThrottle().get_ident(request) or "")


class RateLimit:
    """A fixed-window counter of one ``scope`` (see the module docstring)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    @property
    def rate(self) -> Rate:
        return Rate.parse(str(api_settings.DEFAULT_THROTTLE_RATES[self.scope]))

    def _window(self, identity: str) -> tuple[str, int]:
        """The cache key of ``identity``'s current window, and the seconds left in it (at least 1)."""
        period = self.rate.period
        now = time.time()
        window = int(now // period)
        return f"{KEY_PREFIX}:{self.scope}:{identity}:{window}", max(1, math.ceil((window + 1) * period - now))

    def hit(self, identity: str) -> int | None:
        """Count one hit; the seconds to wait when this hit is over the limit, else None."""
        key, left = self._window(identity)
        try:
            # add() creates the window's counter with its expiry only if it is missing; incr() is atomic.
            cache.add(key, 0, timeout=left + 1)
            count = int(cache.incr(key))
        except Exception:
            log.warning(
                "rate limit %s: the cache is unreachable; letting the request through", self.scope, exc_info=True
            )
            return None
        return left if count > self.rate.count else None

    def wait(self, identity: str) -> int | None:
        """The seconds to wait when ``identity`` has used up the window, else None (counts nothing)."""
        key, left = self._window(identity)
        try:
            count = int(cache.get(key) or 0)
        except Exception:
            log.warning(
                "rate limit %s: the cache is unreachable; letting the request through", self.scope, exc_info=True
            )
            return None
        return left if count >= self.rate.count else None

    def check(self, identity: str) -> None:
        """Count one hit; raise DRF's ``Throttled`` (429, ``Retry-After``) when it is over the limit."""
        wait = self.hit(identity)
        if wait is not None:
            raise Throttled(wait)


def retry_message(wait: int) -> str:
    return f"too many attempts: try again in {wait} second{'s' if wait != 1 else ''}"


class CounterThrottle(BaseThrottle):
    """A DRF throttle over ``RateLimit``: each request counts one hit for the signed-in user (or the address).

    Subclasses name the ``scope``; views list them in ``throttle_classes`` (or return them from
    ``get_throttles`` for some methods only).
    """

    scope = ""

    def __init__(self) -> None:
        self.limit = RateLimit(self.scope)
        self._wait: int | None = None

    def identity(self, request: Any) -> str:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return f"user-{user.pk}"
        return f"ip-{client_ip(request)}"

    def allow_request(self, request: Any, view: Any) -> bool:
        self._wait = self.limit.hit(self.identity(request))
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait
