"""The stage rules, judged once in the domain (fleet/services/stages.py and RolloutStage.clean)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from fleet.models import Rollout
from fleet.services import rollouts, stages
from tests.fleet.helpers import make_device, make_published_version


def refusals(fields: list[dict]) -> list[str]:
    with pytest.raises(ValidationError) as refused:
        stages.build_stages(Rollout(), fields)
    return refused.value.message_dict["stages"]


@pytest.mark.parametrize(
    "stage, refusal",
    [
        ({"percent": 10, "device_count": 1}, "stage 1: Give each stage a 'percent' or a 'device_count', not both."),
        ({"name": "canary"}, "stage 1 (canary): Give each stage a 'percent' or a 'device_count', not both."),
        ({"percent": 0}, "stage 1: percent: More than 0 and at most 100."),
        ({"percent": "100.01"}, "stage 1: percent: More than 0 and at most 100."),
        ({"device_count": 0}, "stage 1: device_count: At least one device."),
        ({"percent": 5, "success_percent": 101}, "stage 1: success_percent: Between 0 and 100."),
        ({"percent": 5, "failure_percent": -1}, "stage 1: failure_percent: Between 0 and 100."),
        ({"percent": 5, "health_p95_ratio": 0}, "stage 1: health_p95_ratio: More than 0."),
        ({"percent": 5, "health_error_points": -1}, "stage 1: health_error_points: At least 0."),
        ({"percent": 5, "inconclusive_timeout": 0}, "stage 1: inconclusive_timeout: At least one second."),
        ({"percent": 5, "inconclusive_action": "panic"}, "stage 1: inconclusive_action: Value 'panic' is not a"),
    ],
)
def test_it_refuses_a_stage_that_breaks_its_own_rules_and_names_it(stage, refusal):
    assert any(message.startswith(refusal) for message in refusals([stage])), refusals([stage])


def test_it_names_every_bad_stage_at_once():
    found = refusals([{"device_count": 1}, {"name": "quarter", "percent": 0}, {}])

    assert found == [
        "stage 2 (quarter): percent: More than 0 and at most 100.",
        "stage 3: Give each stage a 'percent' or a 'device_count', not both.",
    ]


def test_it_wants_between_one_and_twenty_stages():
    assert refusals([]) == ["A rollout needs at least one stage."]
    assert refusals([{"percent": 100}] * (stages.MAX_STAGES + 1)) == ["At most 20 stages."]
    assert len(stages.build_stages(Rollout(), [{"percent": 100}] * stages.MAX_STAGES)) == stages.MAX_STAGES


def test_it_builds_the_stages_in_order_with_their_values():
    built = stages.build_stages(Rollout(), [{"name": "canary", "device_count": 1}, {"percent": "25"}])

    assert [(s.index, s.name, s.device_count, s.percent) for s in built] == [
        (0, "canary", 1, None),
        (1, "", None, Decimal("25")),
    ]


@pytest.mark.parametrize(
    "sizes, refusal",
    [
        ([{"percent": 50}, {"name": "quarter", "percent": 20}], "stage 2 (quarter)'s percent (20) is less than"),
        ([{"device_count": 5}, {"percent": 50}, {"device_count": 2}], "stage 3's device_count (2) is less than"),
    ],
)
def test_it_refuses_stages_that_shrink(sizes, refusal):
    built = stages.build_stages(Rollout(), sizes)

    with pytest.raises(stages.StagesShrink, match="Stage sizes are cumulative") as refused:
        stages.check_sizes_grow(built)
    assert refusal in str(refused.value)
    assert refused.value.status == 409


def test_sizes_of_each_kind_grow_on_their_own():
    # A count and a percentage are not compared: their sizes depend on the fleet.
    stages.check_sizes_grow(stages.build_stages(Rollout(), [{"device_count": 5}, {"percent": 1}, {"percent": 1}]))


@pytest.mark.django_db
def test_creating_a_rollout_reports_its_own_and_its_stages_problems_together():
    version = make_published_version()
    make_device("dev-1", tags=["lab"])

    with pytest.raises(ValidationError) as refused:
        rollouts.create_rollout(version, stages=[{"percent": 10, "device_count": 1}], actor="system")

    assert refused.value.message_dict == {
        "selector": ["Select devices by 'tags', by 'devices' (ids), or both."],
        "stages": ["stage 1: Give each stage a 'percent' or a 'device_count', not both."],
    }
    assert not Rollout.objects.exists()


@pytest.mark.django_db
def test_creating_a_rollout_refuses_shrinking_stages_and_keeps_nothing():
    version = make_published_version()
    make_device("dev-1", tags=["lab"])

    with pytest.raises(stages.StagesShrink):
        rollouts.create_rollout(version, stages=[{"percent": 50}, {"percent": 20}], tags=["lab"], actor="system")

    assert not Rollout.objects.exists()
