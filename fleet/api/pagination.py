from rest_framework.pagination import LimitOffsetPagination


class Pages(LimitOffsetPagination):
    """``?limit=&offset=``, 100 a page by default; at most 1,000, so one request cannot pull a whole fleet."""

    max_limit = 1000
