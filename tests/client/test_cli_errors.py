"""What a user reads when something goes wrong: each error names the problem and what to do."""

from __future__ import annotations

import os
import stat
import tomllib

import pytest
from rest_framework.authtoken.models import Token

from fleet.auth import stored_token_key
from fleet.models import Model, Rollout
from tests.fleet import helpers
from tests.support import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_tells_a_bad_token_to_log_in_again(run, plane_url):
    result = run("models", "list", url=plane_url, token="not-a-token")

    assert result.code == 1
    assert result.stderr.strip() == (
        "error: the plane refused the token (401: Invalid token.). "
        "Run `edgefleet login`, or set EDGEFLEET_TOKEN to a valid token."
    )


def test_it_names_an_unreachable_plane_and_where_its_url_came_from(run):
    url = f"http://127.0.0.1:{free_port()}"

    result = run("devices", "list", url=url, token="t")

    assert result.code == 1
    assert result.stderr.startswith(f"error: cannot reach the plane at {url}: ")
    assert "Check that it is running and that the URL (--url, EDGEFLEET_URL or the profile) is right." in result.stderr


def test_it_says_how_to_configure_a_plane_when_none_is_given(run):
    result = run("models", "list")

    assert result.code == 1
    assert "no plane to talk to: pass --url, set EDGEFLEET_URL, or run `edgefleet login --url URL`" in result.stderr


def test_it_shows_the_servers_reason_for_a_conflict(run, plane_url, release_token):
    version = helpers.make_published_version()

    result = run("versions", "publish", version.label, url=plane_url, token=release_token)

    assert result.code == 1
    assert result.stderr.startswith(f"error: POST /versions/{version.pk}/publish/ failed (409): ")
    assert "published" in result.stderr


def test_it_shows_the_servers_reason_for_refused_fields(run, plane_url, release_token):
    helpers.make_model("embedder")

    result = run("models", "create", "embedder", url=plane_url, token=release_token)

    assert result.code == 1
    assert "failed (400): name: model with this name already exists." in result.stderr


def test_it_says_which_permission_is_missing(run, plane_url):
    token = helpers.api_token(helpers.make_viewer())

    result = run("models", "create", "new-model", url=plane_url, token=token)

    assert result.code == 1
    assert "POST /models/ is not allowed for this user (403): You do not have permission" in result.stderr
    assert not Model.objects.exists()


def test_it_says_what_is_not_found(run, plane_url, release_token):
    result = run("versions", "show", "nothing:7", url=plane_url, token=release_token)

    assert result.code == 1
    assert "error: not found: GET /versions/nothing:7/ (404)" in result.stderr


def test_it_checks_the_rollout_file_before_any_call_and_names_each_line(run, tmp_path):
    spec = tmp_path / "rollout.yaml"
    spec.write_text(
        "version: embedder:2\n"
        "selector:\n"
        "  tag: [lab]\n"
        "stages:\n"
        "  - name: canary\n"
        "    device_count: 0\n"
        "  - percent: 25\n"
        "    device_count: 3\n"
    )
    # Nothing listens here: a call would fail differently.
    url = f"http://127.0.0.1:{free_port()}"

    result = run("rollouts", "apply", "-f", str(spec), url=url, token="t")

    assert result.code == 2
    assert result.stderr.splitlines()[1:] == [
        f"{spec}:3: selector: unknown key 'tag' (did you mean 'tags'?)",
        f"{spec}:3: selector: select devices by 'tags', by 'devices' (ids), or both",
        f"{spec}:6: stages[1].device_count: expected a whole number of at least 1; got 0",
        f"{spec}:7: stages[2]: give the stage a 'percent' of the selection or a 'device_count', not both",
    ]


def test_it_points_the_planes_refusal_of_a_rollout_file_at_its_line(run, plane_url, release_token, tmp_path):
    draft = helpers.make_version(helpers.make_model("embedder"))
    spec = tmp_path / "rollout.yaml"
    spec.write_text(f"version: {draft.pk}\nselector: {{tags: [lab]}}\nstages:\n  - percent: 100\n")

    result = run("rollouts", "apply", "-f", str(spec), url=plane_url, token=release_token)

    assert result.code == 1
    assert (
        f"error: the plane refused {spec}: line 1: version: Version {draft.pk} is not published (or does not "
        "exist): only a published version can be rolled out." in result.stderr
    )
    assert not Rollout.objects.exists()


def test_it_points_the_planes_refusal_of_a_stage_at_the_stages_line(run, plane_url, release_token, tmp_path):
    version = helpers.make_published_version()
    spec = tmp_path / "rollout.yaml"
    spec.write_text(
        f"version: {version.pk}\nselector: {{tags: [lab]}}\nstages:\n"
        "  - device_count: 1\n"
        "  - name: everyone\n"
        "    percent: 100\n"
        "    gates: {health: {p95_ratio: 0}}\n"
    )

    result = run("rollouts", "apply", "-f", str(spec), url=plane_url, token=release_token)

    assert result.code == 1
    assert f"error: the plane refused {spec}: line 5: stage 2 (everyone): health_p95_ratio: More than 0." in (
        result.stderr
    )
    assert not Rollout.objects.exists()


def test_it_warns_of_devices_in_a_stage_and_sends_it_as_device_count(run, plane_url, release_token, tmp_path):
    version = helpers.make_published_version()
    spec = tmp_path / "rollout.yaml"
    spec.write_text(f"version: {version.pk}\nselector: {{tags: [lab]}}\nstages:\n  - devices: 2\n  - percent: 100\n")

    result = run("rollouts", "apply", "-f", str(spec), "--no-start", url=plane_url, token=release_token)

    assert result.code == 0, result.stderr
    assert f"warning: {spec}:4: stages[1].devices: deprecated: write 'device_count', its new name" in result.stderr
    assert [s.device_count for s in Rollout.objects.get().stages.all()] == [2, None]


def test_login_stores_the_token_in_a_profile_readable_by_its_owner_only(run, plane_url, config_home):
    user = helpers.make_release_manager()
    user.set_password("s3cret-pass")
    user.save()

    result = run("login", "--username", user.username, "--password", "s3cret-pass", url=plane_url)

    assert result.code == 0, result.stderr
    path = config_home / "edgefleet" / "config.toml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # The plane keeps only a hash of the token; the profile holds the secret itself.
    profiles = tomllib.loads(path.read_text())["profiles"].values()
    assert [stored_token_key(p["token"]) for p in profiles] == [Token.objects.get(user=user).key]
    listed = run("-o", "json", "models", "list")  # no --url, no --token: the profile's
    assert listed.code == 0 and listed.json() == []


def test_login_saves_a_named_profile_and_commands_use_it(run, plane_url, config_home):
    user = helpers.make_release_manager()
    user.set_password("s3cret-pass")
    user.save()

    saved = run("--profile", "lab", "login", "--username", "rita", "--password", "s3cret-pass", url=plane_url)
    listed = run("--profile", "lab", "-o", "json", "devices", "list")
    missing = run("--profile", "prod", "devices", "list")

    assert saved.code == 0, saved.stderr
    assert listed.code == 0 and listed.json() == []
    assert missing.code == 1
    assert "no profile 'prod' in" in missing.stderr and "run `edgefleet login --profile prod`" in missing.stderr


def test_login_with_a_wrong_password_says_so(run, plane_url, config_home):
    helpers.make_release_manager()

    result = run("login", "--username", "rita", "--password", "wrong", url=plane_url)

    assert result.code == 1
    assert "error: the plane refused the token (400: Unable to log in with provided credentials.)" in result.stderr
    assert not (config_home / "edgefleet" / "config.toml").exists()


def test_the_environment_wins_over_a_saved_profile(run, plane_url, release_token, config_home, monkeypatch):
    path = config_home / "edgefleet" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(f'default_profile = "old"\n[profiles.old]\nurl = "http://127.0.0.1:{free_port()}"\ntoken = "x"\n')
    monkeypatch.setenv("EDGEFLEET_URL", plane_url)
    monkeypatch.setenv("EDGEFLEET_TOKEN", release_token)

    result = run("-o", "json", "models", "list")

    assert result.code == 0, result.stderr
    assert result.json() == []


def test_a_broken_config_file_is_named(run, config_home):
    path = config_home / "edgefleet" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("[profiles.default\nurl = 1\n")

    result = run("models", "list")

    assert result.code == 1
    assert f"error: cannot read {path}: " in result.stderr
    assert "Fix it, or delete it and run `edgefleet login` again." in result.stderr
