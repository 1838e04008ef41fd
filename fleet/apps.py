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
        # Celery learns the tasks here, so no other module needs to import them (fleet/jobs.py).
        import fleet.tasks  # noqa: F401
