"""Settings come from the environment; a bad value stops start-up with the variable's name."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO

PROBE = "import django; django.setup(); from django.conf import settings; print(settings.MQTT_BROKER.port)"


def start_env(**env: str | None) -> dict[str, str | None]:
    """The test run's environment less the plane's own settings; development (DEBUG) unless told."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MQTT_URL", "DEBUG", "SECRET_KEY")}
    return {**clean, "DJANGO_SETTINGS_MODULE": "controlplane.settings", "DEBUG": "true", **env}


def start_plane(**env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={k: v for k, v in start_env(**env).items() if v is not None},
        capture_output=True,
        text=True,
    )


def test_it_starts_on_development_defaults():
    result = start_plane()

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1883"


def test_it_turns_debug_off_where_debug_is_unset():
    probe = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"
    env = {k: v for k, v in start_env(SECRET_KEY="a-secret-of-the-deployment-" + "x" * 30).items() if k != "DEBUG"}

    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)

    assert result.stdout.strip() == "False", result.stderr


def test_it_refuses_to_start_without_debug_or_a_secret_key():
    result = start_plane(DEBUG=None)

    assert result.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is false" in result.stderr


@pytest.mark.parametrize(
    "env, named",
    [
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"BRIDGE_BATCH_SIZE": "lots"}, "BRIDGE_BATCH_SIZE='lots' is not a whole number"),
        ({"BRIDGE_BATCH_SIZE": "0"}, "BRIDGE_BATCH_SIZE=0 must be at least 1"),
        ({"MQTT_URL": "http://broker"}, "MQTT_URL: broker URL 'http://broker' must start with mqtt://"),
        ({"DATABASE_URL": "nonsense://x"}, "DATABASE_URL"),
        ({"DEBUG": "false"}, "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is false"),
        ({"SECRET_KEY_FILE": "/nonexistent/key"}, "SECRET_KEY_FILE='/nonexistent/key' cannot be read"),
        ({"ARTIFACT_CHUNKING": "rolling"}, "ARTIFACT_CHUNKING='rolling' is not one of cdc, fixed"),
        ({"ROLLOUT_WEBHOOKS": "https://ok.example/h,ftp://x"}, "ROLLOUT_WEBHOOKS: 'ftp://x' is not an http"),
    ],
)
def test_it_names_the_variable_that_is_wrong(env, named):
    result = start_plane(**env)

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr


def test_it_reads_a_secret_from_a_file(tmp_path):
    key = tmp_path / "secret"
    key.write_text("from-a-file\n")

    result = start_plane(DEBUG="false", SECRET_KEY_FILE=str(key))

    assert result.returncode == 0, result.stderr


def test_it_reads_the_planes_broker_password_from_a_file_not_the_url(tmp_path):
    password = tmp_path / "mqtt_password"
    password.write_text("from-a-file\n")
    probe = PROBE.replace(
        "print(settings.MQTT_BROKER.port)", "print(settings.MQTT_BROKER.username, settings.MQTT_BROKER.password)"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**start_env(), "MQTT_URL": "mqtt://edgefleet-plane@broker:1883", "MQTT_PASSWORD_FILE": str(password)},
        capture_output=True,
        text=True,
    )

    assert result.stdout.split() == ["edgefleet-plane", "from-a-file"], result.stderr


def test_sign_in_counters_are_shared_through_redis_when_cache_url_is_set():
    probe = (
        "import django; django.setup(); from django.core.cache import caches; cache = caches['default']; "
        "cache.set('edgefleet-probe', 7, 5); print(type(cache).__name__, cache.get('edgefleet-probe'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**start_env(), "CACHE_URL": "redis://127.0.0.1:6379/9"},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["RedisCache", "7"]


def test_it_sends_cookies_only_over_https_and_hsts_when_https_is_on():
    probe = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER)"
    )

    def run(**env):
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO, env=start_env(**env), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run() == "False False 0 None"
    assert run(HTTPS="true") == "True True 31536000 None"
    assert run(HTTPS="true", TRUSTED_PROXIES="10.0.0.0/8") == "True True 31536000 ('HTTP_X_FORWARDED_PROTO', 'https')"
