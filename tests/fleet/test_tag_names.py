"""A tag's name is a slug of at most 64 characters: one rule (Tag.name_problems), for every way a tag comes in."""

import pytest
from django.core.exceptions import ValidationError

from fleet.choices import Role
from fleet.models import Rollout, Tag
from fleet.services import devices, rollouts
from tests.fleet.helpers import make_device, make_member, make_published_version, token_client
from tests.fleet.test_admin_rollouts import add_form, signed_in

pytestmark = pytest.mark.django_db

LONG = "lab-" + "x" * 66  # 70 characters
TOO_LONG = f"Tag '{LONG[:40]}…': Ensure this value has at most 64 characters (it has 70)."
STAGES = [{"percent": 100}]


def test_it_refuses_a_rollout_selecting_a_tag_longer_than_64_characters_in_the_service():
    version = make_published_version()

    with pytest.raises(ValidationError) as refused:
        rollouts.create_rollout(version, stages=STAGES, tags=["lab", LONG], actor="system")

    assert refused.value.message_dict == {"selector": [TOO_LONG]}
    assert not Rollout.objects.exists()


def test_it_refuses_a_rollout_selecting_a_tag_no_device_can_carry_in_the_service():
    version = make_published_version()

    with pytest.raises(ValidationError) as refused:
        rollouts.create_rollout(version, stages=STAGES, tags=["Lab Room", ""], actor="system")

    assert refused.value.message_dict["selector"] == [
        "Tag '': This field cannot be blank.",
        "Tag 'Lab Room': Use lower-case letters, digits, '.', '_' or '-'.",
    ]


def test_it_takes_a_tag_of_64_characters():
    version = make_published_version()

    rollout = rollouts.create_rollout(version, stages=STAGES, tags=["x" * 64], actor="system")

    assert rollout.selector_tags == ["x" * 64]


def test_it_answers_400_with_the_domains_reason_for_a_long_tag_in_the_api(operator):
    version = make_published_version()
    body = {"version": version.pk, "selector": {"tags": [LONG]}, "stages": STAGES}

    response = token_client(operator).post("/api/v1/rollouts/", body, format="json")

    assert response.status_code == 400
    assert response.json() == {"selector": [TOO_LONG]}
    assert not Rollout.objects.exists()


def test_it_shows_the_domains_reason_for_a_long_tag_in_the_admin():
    version = make_published_version()
    make_device("lab-1", tags=["lab"])

    page = signed_in(make_member("rita", Role.RELEASE_MANAGER)).post(
        "/admin/fleet/rollout/add/", add_form(version, tags=f"lab {LONG}")
    )

    assert f"selector: {TOO_LONG}".replace("'", "&#x27;") in page.content.decode()
    assert not Rollout.objects.exists()


def test_it_refuses_a_device_tag_longer_than_64_characters_in_the_service():
    device = make_device("dev-1", tags=["lab"])

    with pytest.raises(ValidationError) as refused:
        devices.set_tags(device, ["lab", LONG], actor="system")

    assert refused.value.message_dict == {"tags": [TOO_LONG]}
    assert list(device.tags.values_list("name", flat=True)) == ["lab"]
    assert not Tag.objects.filter(name=LONG).exists()
