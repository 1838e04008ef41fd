"""Every write in the admin, tried by each role (fleet.roles) signed in to the real admin.

A role without the permission gets 403 on a page, or is never offered the action (and a
posted one changes nothing and audits nothing). The audit log is read-only for everyone,
superusers included.
"""

import base64
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.contrib.admin import helpers
from django.contrib.auth.models import Group, User
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import TokenProxy

from fleet.choices import EnrollmentState, Role, RolloutState, VersionStatus
from fleet.models import (
    Alias,
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrollmentToken,
    Heartbeat,
    Model,
    ModelVersion,
    Pipeline,
    Rollout,
    Tag,
    VariantPin,
)
from fleet.services import aliases, enrollment, rollouts
from tests.fleet.helpers import add_ready_artifact, make_device, make_member, make_published_version, make_version

pytestmark = pytest.mark.django_db

VIEWER, OPERATOR, RELEASE, ADMIN = Role.VIEWER, Role.OPERATOR, Role.RELEASE_MANAGER, Role.ADMIN
OPERATES = {OPERATOR, ADMIN}
RELEASES = {RELEASE, ADMIN}
NOBODY: set[Role] = set()

# Who may open each add page.
ADDS = {
    Model: RELEASES,
    ModelVersion: RELEASES,
    Artifact: RELEASES,
    Alias: RELEASES,
    VariantPin: RELEASES,
    Rollout: RELEASES,
    EnrollmentToken: {ADMIN},
    User: {ADMIN},
    Group: {ADMIN},
    # Recorded by devices and services only.
    Tag: NOBODY,
    Device: NOBODY,
    Deployment: NOBODY,
    Heartbeat: NOBODY,
    Pipeline: NOBODY,
    AuditEvent: NOBODY,
}
# Who is offered each action of each changelist; "delete_selected" is Django's bulk delete.
ACTIONS = {
    Device: {"accept": OPERATES, "reject": OPERATES, "decommission": OPERATES, "assign_version": RELEASES},
    EnrollmentToken: {"revoke": {ADMIN}},
    ModelVersion: {"publish": RELEASES, "archive": RELEASES, "delete_unused": RELEASES, "optimize": RELEASES},
    Rollout: {a: RELEASES for a in ("start", "pause", "resume", "promote", "abort", "rollback")},
    VariantPin: {"delete_selected": RELEASES},
    Model: {},
    Alias: {},
    Artifact: {},
    Tag: {},
    Deployment: {},
    Heartbeat: {},
    Pipeline: {},
    AuditEvent: {},
}


def url(model, view, *args):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def signed_in(role: Role | str) -> Client:
    if role == "superuser":
        user = User.objects.create_superuser("root", "root@example.com", "correct horse battery staple")
    else:
        user = make_member(f"member-{role}", role)
        user.is_staff = True
        user.save()
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def fleet(fake_publisher):
    """One of each thing an action works on: a pending device, a token, a draft, a draft rollout."""
    version = make_published_version()
    _, secret = enrollment.create_token(name="shelf", expires_in=timedelta(hours=1), actor="system")
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    enrollment.enroll(secret, device_id="dev-1", public_key=base64.b64encode(key).decode())
    draft = make_version(version.model)
    add_ready_artifact(draft)
    aliases.move_alias(version.model, "stable", version, actor="system")
    make_device("dev-2", tags=["lab"])
    rollouts.create_rollout(version, stages=[{"percent": 100}], tags=["lab"], actor="system")
    return {
        Device: Device.objects.get(device_id="dev-1"),
        EnrollmentToken: EnrollmentToken.objects.get(),
        ModelVersion: draft,
        Rollout: Rollout.objects.get(),
        Alias: Alias.objects.get(),
    }


@pytest.mark.parametrize("role", list(Role))
def test_it_opens_an_add_page_only_to_roles_that_may_add(role):
    client = signed_in(role)

    got = {model._meta.model_name: client.get(url(model, "add")).status_code for model in ADDS}

    assert got == {model._meta.model_name: 200 if role in roles else 403 for model, roles in ADDS.items()}


@pytest.mark.parametrize("role", list(Role))
def test_it_offers_each_role_only_its_actions(role):
    client = signed_in(role)

    offered = {}
    for model in ACTIONS:
        form = client.get(url(model, "changelist")).context["action_form"]
        offered[model._meta.model_name] = {name for name, _ in form.fields["action"].choices if name} if form else set()

    expected = {
        m._meta.model_name: {a for a, roles in actions.items() if role in roles} for m, actions in ACTIONS.items()
    }
    assert offered == expected


@pytest.mark.parametrize("role", [VIEWER, OPERATOR, RELEASE])
def test_a_posted_action_the_role_lacks_changes_nothing(fleet, role):
    client = signed_in(role)
    refused = [
        (model, action)
        for model in (Device, EnrollmentToken, ModelVersion, Rollout)
        for action, roles in ACTIONS[model].items()
        if role not in roles
    ]
    audited = AuditEvent.objects.count()

    for model, action in refused:
        response = client.post(
            url(model, "changelist"), {"action": action, helpers.ACTION_CHECKBOX_NAME: [fleet[model].pk], "apply": "1"}
        )
        # The changelist again or "no action selected": refused either way.
        assert response.status_code in (200, 302, 403), (model, action)

    assert refused
    assert AuditEvent.objects.count() == audited
    assert Deployment.objects.count() == 0
    assert Device.objects.get(device_id="dev-1").enrollment == EnrollmentState.PENDING


@pytest.mark.parametrize("role", sorted(OPERATES))
def test_an_operator_or_admin_accepts_a_device(fleet, role):
    device = fleet[Device]

    signed_in(role).post(url(Device, "changelist"), {"action": "accept", helpers.ACTION_CHECKBOX_NAME: [device.pk]})

    assert Device.objects.get(pk=device.pk).enrollment == EnrollmentState.ACCEPTED
    assert AuditEvent.objects.get(action="device.accepted").actor_label == f"user:member-{role}"


@pytest.mark.parametrize("role", sorted(RELEASES))
def test_a_release_manager_or_admin_publishes_a_draft_and_starts_a_rollout(fleet, role):
    client = signed_in(role)

    client.post(
        url(ModelVersion, "changelist"), {"action": "publish", helpers.ACTION_CHECKBOX_NAME: [fleet[ModelVersion].pk]}
    )
    client.post(url(Rollout, "changelist"), {"action": "start", helpers.ACTION_CHECKBOX_NAME: [fleet[Rollout].pk]})

    assert ModelVersion.objects.get(pk=fleet[ModelVersion].pk).status == VersionStatus.PUBLISHED
    assert Rollout.objects.get().state == RolloutState.RUNNING


def test_only_an_admin_revokes_a_token(fleet):
    signed_in(ADMIN).post(
        url(EnrollmentToken, "changelist"),
        {"action": "revoke", helpers.ACTION_CHECKBOX_NAME: [fleet[EnrollmentToken].pk]},
    )

    assert EnrollmentToken.objects.get().revoked_at is not None
    assert AuditEvent.objects.filter(action="enrollment_token.revoked", actor_label="user:member-admin").exists()


@pytest.mark.parametrize("role", list(Role))
def test_only_operators_and_admins_change_a_devices_tags(fleet, role):
    device = fleet[Device]
    data = {"tag_names": "lab, floor-2"}
    for prefix in ("deployments", "rollups", "heartbeats"):
        data |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "0"}

    response = signed_in(role).post(url(Device, "change", device.pk), data)

    allowed = role in OPERATES
    assert response.status_code == (302 if allowed else 403)
    assert sorted(device.tags.values_list("name", flat=True)) == (["floor-2", "lab"] if allowed else [])
    assert AuditEvent.objects.filter(action="device.tags_set", actor_label=f"user:member-{role}").exists() == allowed


@pytest.mark.parametrize("role", list(Role))
def test_only_release_managers_and_admins_edit_a_drafts_notes_or_move_an_alias(fleet, role):
    client = signed_in(role)
    draft, alias = fleet[ModelVersion], fleet[Alias]
    allowed = role in RELEASES

    notes_page = client.get(url(ModelVersion, "change", draft.pk))
    alias_page = client.get(url(Alias, "change", alias.pk))

    assert (b'name="_save"' in notes_page.content) == allowed
    assert (b'name="_save"' in alias_page.content) == allowed
    if not allowed:
        assert client.post(url(ModelVersion, "change", draft.pk), {"notes": "rewritten"}).status_code == 403
        assert client.post(url(Alias, "change", alias.pk), {"version": alias.version_id}).status_code == 403


@pytest.mark.parametrize("role", [*Role, "superuser"])
def test_nobody_adds_changes_or_deletes_an_audit_event(fleet, role):
    client = signed_in(role)
    event = AuditEvent.objects.first()
    count = AuditEvent.objects.count()

    page = client.get(url(AuditEvent, "change", event.pk))
    change = client.post(url(AuditEvent, "change", event.pk), {"action": "forged", "actor_label": "nobody"})
    delete = client.post(url(AuditEvent, "delete", event.pk), {"post": "yes"})
    bulk = client.post(
        url(AuditEvent, "changelist"),
        {"action": "delete_selected", helpers.ACTION_CHECKBOX_NAME: [event.pk], "post": "yes"},
    )

    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert change.status_code == 403
    assert delete.status_code == 403
    assert bulk.status_code in (200, 302)  # "no action selected": delete_selected is not offered
    assert client.get(url(AuditEvent, "add")).status_code == 403
    assert AuditEvent.objects.count() == count
    assert AuditEvent.objects.get(pk=event.pk).action == event.action


def test_it_audits_what_an_admin_does_to_users_groups_and_tokens():
    client = signed_in(ADMIN)
    operators = Group.objects.get(name=OPERATOR)

    client.post(
        url(User, "add"),
        {"username": "newbie", "password1": "a long enough passphrase", "password2": "a long enough passphrase"},
    )
    newbie = User.objects.get(username="newbie")
    client.post(
        url(User, "change", newbie.pk),
        {
            "username": "newbie",
            "is_active": "on",
            "is_staff": "on",
            "groups": [operators.pk],
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
        },
        REMOTE_ADDR="198.51.100.9",
    )
    client.post(url(TokenProxy, "add"), {"user": newbie.pk})
    client.post(
        reverse("admin:auth_user_password_change", args=[newbie.pk]),
        {"password1": "another long passphrase", "password2": "another long passphrase", "usable_password": "true"},
    )
    client.post(url(User, "delete", newbie.pk), {"post": "yes"})

    events = {e.action: e for e in AuditEvent.objects.filter(actor_label="user:member-admin")}
    assert set(events) == {"user.added", "user.changed", "token.added", "user.password_set", "user.deleted"}
    changed = events["user.changed"]
    assert (changed.before["groups"], changed.after["groups"]) == ([], [OPERATOR])
    assert (changed.before["is_staff"], changed.after["is_staff"]) == (False, True)
    assert changed.source_address == "198.51.100.9"
    assert events["user.added"].before is None
    assert events["user.deleted"].before["groups"] == [OPERATOR]
    assert events["token.added"].object_type == "user"  # never the token's key
    assert "password" not in str(changed.after)
