"""Shared pieces of the admin: read-only bases, service error handling."""

from django.contrib import admin, messages
from django.db import models
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect

from fleet.errors import ServiceError

RECENT_ROWS = 10


def _adopt(obj: models.Model, saved: models.Model) -> None:
    """Let the admin carry on (log, redirect) with the row a service saved in ``obj``'s place."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding = False


class ServiceErrorsMixin:
    """A service that refuses a change shows its reason instead of a server error."""

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())


class ReadOnlyAdmin(admin.ModelAdmin):
    """State that devices and services write: the admin shows it and never edits it."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class RecentFormSet(BaseInlineFormSet):
    """Only the newest rows: a device has thousands of heartbeats."""

    def get_queryset(self):
        if not hasattr(self, "_recent"):
            self._recent = super().get_queryset()[:RECENT_ROWS]
        return self._recent
