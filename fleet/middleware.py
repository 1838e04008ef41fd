"""Request middleware of the fleet app."""

from fleet.services import audit


class AuditSourceMiddleware:
    """Every audit row a request writes, through the API or the admin, records the client's address.

    REMOTE_ADDR is the peer of the web server: behind a reverse proxy it is the proxy's
    address. X-Forwarded-For is not trusted, as any client can set it.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit.source_address(request.META.get("REMOTE_ADDR")):
            return self.get_response(request)
