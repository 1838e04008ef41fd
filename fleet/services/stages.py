"""A rollout's stages and the rules they keep, checked in one place.

Each stage's own rules (a percent or a device count, sizes and gate values in range, a hold
deadline of at least a second) are ``RolloutStage.clean()``; the rules across stages (how
many, sizes that never shrink) are here. The API and the admin only reshape what they are
sent and call ``rollouts.create_rollout``, which builds the stages with ``build_stages`` and
then calls ``check_sizes_grow``. Every refusal names the stage it is about.
"""

from __future__ import annotations

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError

from fleet.errors import ServiceError
from fleet.models import Rollout, RolloutStage

MAX_STAGES = 20


class StagesShrink(ServiceError):
    """A later stage reaching fewer devices than an earlier one: sizes are cumulative.

    409, as the service has always answered it (the API's tests pin it), though it is a
    mistake in the request like the 400s of ``build_stages``.
    """


def build_stages(rollout: Rollout, stages: list[dict]) -> list[RolloutStage]:
    """The rollout's stages from their fields, in order, each checked on its own; not saved.

    Too few or too many stages, or a stage that breaks its own rules, raise ValidationError
    under ``stages``, each message naming its stage. ``check_sizes_grow`` comes after.
    """
    if not stages:
        raise ValidationError({"stages": "A rollout needs at least one stage."})
    if len(stages) > MAX_STAGES:
        raise ValidationError({"stages": f"At most {MAX_STAGES} stages."})
    rows = [RolloutStage(rollout=rollout, index=index, **fields) for index, fields in enumerate(stages)]
    problems = [problem for row in rows for problem in _problems(row)]
    if problems:
        raise ValidationError({"stages": problems})
    return rows


def _problems(stage: RolloutStage) -> list[str]:
    """The stage's own checks, each message naming the stage it is about."""
    try:
        stage.full_clean(exclude=["rollout"])
    except ValidationError as exc:
        named = stage_name(stage)
        if hasattr(exc, "error_dict"):
            return [
                f"{named}: {message}" if field == NON_FIELD_ERRORS else f"{named}: {field}: {message}"
                for field, messages in exc.message_dict.items()
                for message in messages
            ]
        return [f"{named}: {message}" for message in exc.messages]
    return []


def stage_name(stage: RolloutStage) -> str:
    return f"stage {stage.index + 1} ({stage.name})" if stage.name else f"stage {stage.index + 1}"


def check_sizes_grow(stages: list[RolloutStage]) -> None:
    """Sizes are cumulative, so each stage of a kind reaches at least as far as the one before."""
    for kind in ("percent", "device_count"):
        sized = [s for s in stages if getattr(s, kind) is not None]
        for before, after in zip(sized, sized[1:], strict=False):
            if getattr(after, kind) < getattr(before, kind):
                raise StagesShrink(
                    f"Stage sizes are cumulative: {stage_name(after)}'s {kind} ({getattr(after, kind)}) "
                    f"is less than {stage_name(before)}'s ({getattr(before, kind)})."
                )
