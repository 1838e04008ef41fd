"""Enrollment tokens in the admin."""

from datetime import timedelta

from django import forms
from django.contrib import admin, messages

from fleet.admin.base import _adopt
from fleet.models import (
    EnrollmentToken,
)
from fleet.services import enrollment


class EnrollmentTokenForm(forms.ModelForm):
    expires_in_hours = forms.IntegerField(min_value=1, max_value=24 * 365, initial=24)

    class Meta:
        model = EnrollmentToken
        fields = ["name", "auto_approve", "max_devices"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    """Tokens are created here and shown once; afterwards only their prefix is known."""

    form = EnrollmentTokenForm
    list_display = ["name", "prefix", "auto_approve", "max_devices", "expires_at", "revoked_at", "created_by"]
    list_filter = ["auto_approve"]
    readonly_fields = ["prefix", "expires_at", "revoked_at", "created_by", "created_at"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "auto_approve", "max_devices", "expires_in_hours"]
        return ["name", "auto_approve", "max_devices", *self.readonly_fields]

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        token, secret = enrollment.create_token(
            name=data["name"],
            expires_in=timedelta(hours=data["expires_in_hours"]),
            auto_approve=data["auto_approve"],
            max_devices=data["max_devices"],
            actor=request.user,
        )
        _adopt(obj, token)
        self.message_user(request, f"The token, shown this once: {secret}", messages.WARNING)

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        for token in queryset:
            enrollment.revoke_token(token, actor=request.user)
        self.message_user(request, f"Revoked {queryset.count()} token(s).", messages.SUCCESS)
