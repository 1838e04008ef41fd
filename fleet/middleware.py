"""Request middleware of the fleet app."""

from django.conf import settings

from fleet.http import request_address
from fleet.lib.addresses import is_trusted
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


class UntrustedForwardingMiddleware:
    """Forwarding headers are a proxy's word: from any peer not in TRUSTED_PROXIES they are dropped.

    Django believes SECURE_PROXY_SSL_HEADER from every peer; a client could otherwise claim
    HTTPS (and get secure cookies, HSTS, no redirect) over plain HTTP.
    """

    HEADERS = ("HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not is_trusted(request.META.get("REMOTE_ADDR") or "", settings.TRUSTED_PROXIES):
            for header in self.HEADERS:
                request.META.pop(header, None)
        return self.get_response(request)
