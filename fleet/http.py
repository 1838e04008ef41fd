"""Who is asking: the client's address, the same for sign-in limits, throttles and the audit log."""

from django.conf import settings
from rest_framework.throttling import ScopedRateThrottle

from fleet.lib.addresses import client_address


def request_address(request) -> str | None:
    """REMOTE_ADDR, or the client behind a proxy listed in TRUSTED_PROXIES (fleet/lib/addresses.py)."""
    meta = request.META
    return client_address(meta.get("REMOTE_ADDR"), meta.get("HTTP_X_FORWARDED_FOR"), settings.TRUSTED_PROXIES)


class ClientScopedRateThrottle(ScopedRateThrottle):
    """DRF's scoped throttle keyed on ``request_address``.

    DRF's own key reads X-Forwarded-For from any peer (NUM_PROXIES unset), so a client
    could name a new address in each request and never be throttled.
    """

    def get_ident(self, request):
        return request_address(request) or ""
