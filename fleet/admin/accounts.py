"""Users, groups and API tokens in the admin, with every change in the audit log.

Django's and DRF's own admins write only the admin's LogEntry, which any admin can
hide; a change of who holds which role belongs in the audit trail like any other write.
"""

import secrets

from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.db import models
from rest_framework.authtoken.admin import TokenAdmin
from rest_framework.authtoken.models import TokenProxy

from fleet.auth import TOKEN_PREFIX_LENGTH, stored_token_key
from fleet.services.audit import record


def _permissions(permissions) -> list[str]:
    return sorted(f"{p.content_type.app_label}.{p.codename}" for p in permissions.select_related("content_type"))


def user_state(user: User) -> dict:
    """What the audit log keeps of a user: standing and roles, never the password hash."""
    return {
        "username": user.username,
        "is_active": user.is_active,
        "is_staff": user.is_staff,
        "is_superuser": user.is_superuser,
        "groups": sorted(user.groups.values_list("name", flat=True)),
        "permissions": _permissions(user.user_permissions.all()),
    }


def group_state(group: Group) -> dict:
    return {"name": group.name, "permissions": _permissions(group.permissions.all())}


def token_state(token: TokenProxy) -> dict:
    # The key is a secret: only whose token it is.
    return {"user": token.user.get_username()}


class AuditedAdminMixin:
    """Audits additions, changes and deletions with the object's state before and after."""

    audit_name: str
    state: staticmethod

    def audit_object(self, obj: models.Model) -> models.Model:
        return obj

    def _record(self, request, action: str, obj: models.Model, **changes) -> None:
        record(request.user, f"{self.audit_name}.{action}", self.audit_object(obj), **changes)

    def save_model(self, request, obj, form, change):
        if change:
            # The form has already changed ``obj`` in memory: read "before" from the database.
            obj._audit_before = self.state(type(obj).objects.get(pk=obj.pk))
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        obj = form.instance
        before = getattr(obj, "_audit_before", None)
        self._record(request, "changed" if change else "added", obj, before=before, after=self.state(obj))

    def delete_model(self, request, obj):
        self._record(request, "deleted", obj, before=self.state(obj))
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset: models.QuerySet):
        for obj in queryset:
            self._record(request, "deleted", obj, before=self.state(obj))
        super().delete_queryset(request, queryset)  # type: ignore[misc]  # a mixin: the ModelAdmin comes next


class AuditedUserAdmin(AuditedAdminMixin, UserAdmin):
    audit_name = "user"
    state = staticmethod(user_state)

    def user_change_password(self, request, id, form_url=""):
        response = super().user_change_password(request, id, form_url)
        if request.method == "POST" and response.status_code == 302:
            user = User.objects.get(pk=id)
            record(request.user, "user.password_set", user, after={"username": user.username})
        return response


class AuditedGroupAdmin(AuditedAdminMixin, GroupAdmin):
    audit_name = "group"
    state = staticmethod(group_state)


class AuditedTokenAdmin(AuditedAdminMixin, TokenAdmin):
    """API tokens by their first characters: the plane keeps only a hash of the rest (fleet.auth)."""

    audit_name = "token"
    state = staticmethod(token_state)
    list_display = ("prefix", "user", "created")

    @admin.display(description="token")
    def prefix(self, token: TokenProxy) -> str:
        return f"{token.key[:TOKEN_PREFIX_LENGTH]}…"

    def save_model(self, request, obj, form, change):
        if not change:
            secret = secrets.token_hex(20)
            obj.key = stored_token_key(secret)
            # Shown once, here: what is stored cannot give it back.
            messages.warning(
                request,
                f"The API token of {obj.user.get_username()} is {secret} — copy it now: it will not be shown again.",
            )
        super().save_model(request, obj, form, change)

    def audit_object(self, obj: models.Model) -> models.Model:
        # A token's primary key is the secret itself: the row names its user instead.
        assert isinstance(obj, TokenProxy)
        return obj.user


for model, model_admin in ((User, AuditedUserAdmin), (Group, AuditedGroupAdmin), (TokenProxy, AuditedTokenAdmin)):
    if admin.site.is_registered(model):
        admin.site.unregister(model)
    admin.site.register(model, model_admin)
