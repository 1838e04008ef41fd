"""Serializer fields the API's serializers share."""

import re

from django.urls import NoReverseMatch
from rest_framework import serializers


class IdentityUrlField(serializers.HyperlinkedIdentityField):
    """DRF's HyperlinkedIdentityField, but it reverses the URL once per request, not once per object.

    ``reverse()`` and ``build_absolute_uri()`` were about a fifth of a page of 100 devices (three
    links each). The URL is reversed once with a marker for the id; each object's id then fills
    the marker's place. Only ids made of characters a URL keeps as they are (letters, digits,
    ``-``, ``_``, ``.``; not ``.`` or ``..``) do so: any other takes DRF's own path. (Ids with
    dots are device ids and model names, whose routes take dots.)
    """

    _MARKER = "0identityurlmarker0"
    _PLAIN = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]+")

    def get_url(self, obj, view_name, request, format):
        value = getattr(obj, self.lookup_field)
        text = str(value) if value is not None else ""
        template = self._template(view_name, request, format) if self._PLAIN.fullmatch(text) else None
        if template is None:
            return super().get_url(obj, view_name, request, format)
        head, tail = template
        return head + text + tail

    def _template(self, view_name, request, format) -> tuple[str, str] | None:
        # One field serves a whole page (a ListSerializer binds its child once); a serializer and
        # its fields live for one request, but the key names the request all the same.
        cached = getattr(self, "_cached_template", None)
        if cached is not None and cached[0] is request and cached[1] == format:
            return cached[2]
        try:
            url = self.reverse(view_name, kwargs={self.lookup_url_kwarg: self._MARKER}, request=request, format=format)
        except NoReverseMatch:
            parts = None
        else:
            parts = url.split(self._MARKER)
        template = (parts[0], parts[1]) if parts is not None and len(parts) == 2 else None
        self._cached_template = (request, format, template)
        return template
