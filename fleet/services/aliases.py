"""Aliases: movable names (``stable``, ``canary``) for a model's published versions, with their history."""

from __future__ import annotations

from django.db import transaction

from fleet.errors import ServiceError
from fleet.models import Alias, AliasMove, Model, ModelVersion
from fleet.services.audit import Actor, actor_fields, record


class AliasError(ServiceError):
    """An alias move the current state does not allow; the text says why."""


class AliasNotFound(AliasError):
    status = 404

    """``model:ref`` names no version and no alias."""


def move_alias(
    model: Model,
    name: str,
    version: ModelVersion,
    *,
    actor: Actor,
    reason: str = "",
    expected: ModelVersion | None = None,
    check_expected: bool = False,
) -> Alias:
    """Point ``model:name`` at ``version``, creating the alias if it is new; kept in its history.

    With ``check_expected``, the move happens only if the alias still points at
    ``expected`` (None: does not exist yet), so two clients cannot both move it from
    the same version unawares.
    """
    if version.model_id != model.pk:
        raise AliasError(f"{version.label} is not a version of {model.name}.")
    if not version.is_published:
        raise AliasError(f"{version.label} is {version.status}; only a published version can carry an alias.")
    with transaction.atomic():
        # Lock the alias row: two concurrent moves would otherwise both read the same
        # "from" version, and the history would lose one of them.
        alias = Alias.objects.select_for_update().filter(model=model, name=name).first()
        before = alias.version if alias else None
        if check_expected and (before and before.pk) != (expected and expected.pk):
            raise AliasError(
                f"{model.name}:{name} points at {before.label if before else 'nothing'}, "
                f"not {expected.label if expected else 'nothing'}; look again and retry."
            )
        if alias is None:
            alias = Alias(model=model, name=name, version=version)
        alias.version = version
        alias.full_clean()
        alias.save()
        fields = actor_fields(actor)
        AliasMove.objects.create(
            alias=alias,
            from_version=before,
            to_version=version,
            from_label=before.label if before else "",
            to_label=version.label,
            actor=fields["actor"],
            actor_label=fields["actor_label"],
            reason=reason,
        )
        record(
            actor,
            "alias.moved",
            alias,
            before={"version": before.label} if before else None,
            after={"version": version.label},
            reason=reason,
        )
    return alias


def resolve(model: Model, ref: str) -> ModelVersion:
    """The version ``ref`` names: a number, or an alias of the model."""
    if ref.isdigit():
        version = model.versions.filter(number=int(ref)).first()
    else:
        alias = model.aliases.select_related("version__model").filter(name=ref).first()
        version = alias.version if alias else None
    if version is None:
        raise AliasNotFound(f"{model.name} has no version or alias {ref!r}.")
    return version


def resolve_label(label: str) -> ModelVersion:
    """The version ``model:ref`` names, e.g. ``minilm:stable`` or ``minilm:3``."""
    name, sep, ref = label.rpartition(":")
    model = Model.objects.filter(name=name).first() if sep else None
    if model is None:
        raise AliasNotFound(f"{label!r} names no model: write model:version or model:alias.")
    return resolve(model, ref)
