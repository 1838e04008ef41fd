"""Request middleware of the fleet app."""

from fleet.http import request_address
from fleet.services import audit


class AuditSourceMiddleware:
    """Every audit row a request writes, through the API or the admin, records the client's address.

    The address is the web server's peer (REMOTE_ADDR), or, when that peer is a proxy in
    TRUSTED_PROXIES, the client it names in X-Forwarded-For (fleet.http.request_address).
    X-Forwarded-For from any other peer is ignored, as any client can set it.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit.source_address(request_address(request)):
            return self.get_response(request)
