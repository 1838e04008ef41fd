from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import models

from fleet.models import AuditEvent

Actor = AbstractBaseUser | AnonymousUser | str | None


def actor_fields(actor: Actor) -> dict[str, Any]:
    """A user is stored by reference and by name; a device or the system by name only."""
    if isinstance(actor, str):
        return {"actor": None, "actor_label": actor}
    if actor is None or not actor.is_authenticated:
        return {"actor": None, "actor_label": "system"}
    return {"actor": actor, "actor_label": f"user:{actor.get_username()}"}


def audit_event(
    actor: Actor,
    action: str,
    obj: models.Model,
    *,
    before: dict | None = None,
    after: dict | None = None,
    reason: str = "",
    source_address: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        **actor_fields(actor),
        action=action,
        object_type=obj._meta.model_name or "",
        object_id=str(obj.pk),
        object_repr=str(obj)[:200],
        before=before,
        after=after,
        reason=reason,
        source_address=source_address,
    )


def record(actor: Actor, action: str, obj: models.Model, **kwargs: Any) -> AuditEvent:
    event = audit_event(actor, action, obj, **kwargs)
    event.save()
    return event
