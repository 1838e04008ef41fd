from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_roles(sender, using: str = "default", **kwargs) -> None:
    # Derived data only: the groups' permissions follow the models (fleet.roles).
    from fleet.roles import sync_roles

    sync_roles(using)


class FleetConfig(AppConfig):
    name = "fleet"
    verbose_name = "Edgefleet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        post_migrate.connect(_sync_roles, sender=self, dispatch_uid="fleet.sync_roles")
