"""Roles as Django groups, kept in step with the permissions the models define.

A data migration would freeze the permission list at one moment: models added later
would belong to no role, and a test database flush would drop the groups. Instead
``sync_roles`` runs after every ``migrate`` and ``flush`` (post_migrate, see apps.py)
and sets each group's permissions from the rules below. It is idempotent.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission
from django.db.models import Q

from fleet.choices import Role

# Models an operator writes: the devices themselves and how they are labelled.
OPERATOR_MODELS = ("device", "tag")
# Models a release manager writes: the registry, its pipelines and pins, and what runs where.
RELEASE_MODELS = (
    "model",
    "modelversion",
    "artifact",
    "alias",
    "aliasmove",
    "versiontag",
    "deployment",
    "rollout",
    "rolloutstage",
    "pipeline",
    "pipelinestep",
    "variantevaluation",
    "variantpin",
)
RELEASE_PERMISSIONS = ("release_rollout",)
# The audit log is written by services only: no role may add, change or delete an event.
NEVER = Q(content_type__app_label="fleet", content_type__model="auditevent") & ~Q(codename__startswith="view_")


def _writes(models: tuple[str, ...]) -> Q:
    return Q(content_type__app_label="fleet", content_type__model__in=models) & ~Q(codename__startswith="view_")


def role_permissions(role: Role) -> Q:
    """Which permissions a role holds, as a filter on Permission."""
    reads = Q(content_type__app_label="fleet", codename__startswith="view_")
    if role == Role.VIEWER:
        grants = reads
    elif role == Role.OPERATOR:
        grants = reads | _writes(OPERATOR_MODELS)
    elif role == Role.RELEASE_MANAGER:
        grants = reads | _writes(RELEASE_MODELS) | Q(content_type__app_label="fleet", codename__in=RELEASE_PERMISSIONS)
    else:
        # Users, groups and API tokens too: an admin manages who is in which role.
        grants = Q(content_type__app_label__in=["fleet", "auth", "authtoken"])
    return grants & ~NEVER


def sync_roles(using: str = "default") -> None:
    for role in Role:
        group, _ = Group.objects.using(using).get_or_create(name=role.value)
        group.permissions.set(Permission.objects.using(using).filter(role_permissions(role)))
