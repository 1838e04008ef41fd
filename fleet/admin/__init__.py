"""The admin, one module per part of the fleet; importing them registers their ModelAdmins."""

from fleet.admin import accounts, devices, enrollment, pipeline, records, registry, rollouts  # noqa: F401
