"""Django model permissions for every method, reads included."""

from rest_framework.permissions import DjangoModelPermissions


class ModelPermissions(DjangoModelPermissions):
    """Reads need the view permission; a custom action names its own in ``view.action_permissions``.

    DRF's DjangoModelPermissions lets any signed-in user read everything, and would ask
    for ``add_modelversion`` to publish; neither fits a fleet.
    """

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request, view) -> bool:
        perms = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if perms is None:
            return super().has_permission(request, view)
        user = request.user
        return bool(user and user.is_authenticated and user.has_perms(perms))
