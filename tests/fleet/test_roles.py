"""Roles: every write endpoint of the router, tried by every role.

The endpoint list comes from the router itself, so a new endpoint fails
``test_it_knows_who_may_call_every_write_endpoint`` until someone decides which
roles may call it.
"""

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from fleet.api.urls import router
from fleet.choices import Role
from tests.fleet.helpers import make_member, make_outsider, token_client

pytestmark = pytest.mark.django_db


WRITE_METHODS = ("post", "put", "patch", "delete")
RM = {Role.RELEASE_MANAGER}
# Who, besides admins, may call each write endpoint: (basename, action) -> roles.
ALLOWED: dict[tuple[str, str], set[Role]] = {
    ("model", "create"): RM,
    ("version", "create"): RM,
    ("version", "partial_update"): RM,
    ("version", "publish"): RM,
    ("version", "artifacts"): RM,
    ("version", "optimize"): RM,
    ("version", "assign"): RM,
    ("version", "update"): RM,
    ("version", "destroy"): RM,
    ("version", "tags"): RM,
    ("version", "archive"): RM,
    ("device", "tags"): {Role.OPERATOR},
    ("device", "accept"): {Role.OPERATOR},
    ("device", "reject"): {Role.OPERATOR},
    ("device", "decommission"): {Role.OPERATOR},
    ("rollout", "create"): RM,
    **{("rollout", act): RM for act in ("start", "pause", "resume", "promote", "abort", "rollback")},
    ("variantpin", "create"): RM,
    ("variantpin", "destroy"): RM,
    ("alias", "update"): RM,
    ("enrollmenttoken", "create"): set(),
    ("enrollmenttoken", "revoke"): set(),
}


def write_endpoints() -> list[tuple[str, str, str, str]]:
    """(basename, action, method, url) for every write the router routes, on a missing object."""
    found = []
    for pattern in router.urls:
        view = pattern.callback
        if not hasattr(view, "actions"):
            continue  # the API root
        cls = view.cls
        # Every URL parameter names a missing object: parents of nested routes included.
        url = reverse(f"api:{pattern.name}", kwargs=dict.fromkeys(pattern.pattern.regex.groupindex, "999999"))
        basename = pattern.name.rsplit("-", 1)[0]
        for method, action in view.actions.items():
            if method in WRITE_METHODS and method in cls.http_method_names:
                found.append((basename, action, method, url))
    return sorted(set(found))


ENDPOINTS = write_endpoints()
IDS = [f"{method.upper()} {url} ({action})" for _, action, method, url in ENDPOINTS]


def test_it_knows_who_may_call_every_write_endpoint():
    unclassified = [(basename, action) for basename, action, _, _ in ENDPOINTS if (basename, action) not in ALLOWED]

    assert unclassified == []
    assert len(ENDPOINTS) >= 17


@pytest.mark.parametrize(("basename", "action", "method", "url"), ENDPOINTS, ids=IDS)
def test_it_answers_401_to_anonymous_writes(basename, action, method, url):
    response = getattr(token_client(None), method)(url, {}, format="json")

    assert response.status_code == 401


@pytest.mark.parametrize(("basename", "action", "method", "url"), ENDPOINTS, ids=IDS)
def test_it_answers_403_to_an_outsider(basename, action, method, url):
    response = getattr(token_client(make_outsider()), method)(url, {}, format="json")

    assert response.status_code == 403


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("basename", "action", "method", "url"), ENDPOINTS, ids=IDS)
def test_it_lets_each_role_write_only_what_it_owns(role, basename, action, method, url):
    client = token_client(make_member("member", role))

    response = getattr(client, method)(url, {}, format="json")

    if role == Role.ADMIN or role in ALLOWED[(basename, action)]:
        # Past the permission check: the object is missing, the body empty, or the method unused.
        assert response.status_code in (400, 404, 405, 409, 415), response.content
    else:
        assert response.status_code == 403, response.content


@pytest.mark.parametrize("role", list(Role))
def test_it_lets_every_role_read(role):
    client = token_client(make_member("member", role))

    for path in ("/api/v1/models/", "/api/v1/devices/", "/api/v1/rollouts/", "/api/v1/audit/"):
        assert client.get(path).status_code == 200, path


def test_it_gives_no_role_a_way_to_change_the_audit_log():
    for group in Group.objects.filter(name__in=list(Role)):
        codenames = set(group.permissions.values_list("codename", flat=True))
        assert "view_auditevent" in codenames
        assert not codenames & {"add_auditevent", "change_auditevent", "delete_auditevent"}, group.name


def test_it_keeps_roles_apart():
    perms = {role: set(Group.objects.get(name=role).permissions.values_list("codename", flat=True)) for role in Role}

    assert "change_device" in perms[Role.OPERATOR] and "change_device" not in perms[Role.RELEASE_MANAGER]
    assert "release_rollout" in perms[Role.RELEASE_MANAGER] and "release_rollout" not in perms[Role.OPERATOR]
    assert "add_deployment" in perms[Role.RELEASE_MANAGER] and "add_deployment" not in perms[Role.OPERATOR]
    assert not {p for p in perms[Role.VIEWER] if not p.startswith("view_")}
    assert {"add_user", "change_group", "add_token"} <= perms[Role.ADMIN]
