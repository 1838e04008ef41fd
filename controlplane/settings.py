"""Settings, read from the environment. docker/.env.example lists every variable.

The defaults run the demo on a laptop with nothing installed: SQLite, eager
Celery (no REDIS_URL), a broker on 127.0.0.1:1883.
"""

from pathlib import Path
from typing import Any

import dj_database_url
import msgspec
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from agent.contract.wire import WireError, parse_broker_url
from controlplane.envvars import env_bool, env_choice, env_int, env_list, env_secret, env_str, env_urls
from fleet.lib.addresses import parse_networks

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("EDGEFLEET_VAR_DIR", str(BASE_DIR / "var")))

# Off unless set: with it on, a 500 shows the code and the settings (masked: controlplane/
# reporting.py). The demo (scripts/demo.py) and the tests (Makefile) turn it on explicitly.
DEBUG = env_bool("DEBUG", False)
_DEV_SECRET = "dev-only-insecure-secret-key-set-SECRET_KEY-in-production"
SECRET_KEY = env_secret("SECRET_KEY", _DEV_SECRET)
if not DEBUG and SECRET_KEY == _DEV_SECRET:
    raise ImproperlyConfigured(
        "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is false; DEBUG is false unless set "
        "(DEBUG=true for development on this machine only)"
    )
# Error reports mask every secret setting, and scrub their values from the page.
DEFAULT_EXCEPTION_REPORTER_FILTER = "controlplane.reporting.SecretsFilter"
DEFAULT_EXCEPTION_REPORTER = "controlplane.reporting.SecretsReporter"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# Served over HTTPS (by the plane or a proxy in front of it): cookies only over HTTPS, and HSTS.
HTTPS = env_bool("HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600, minimum=0) if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_SSL_REDIRECT = HTTPS and env_bool("SECURE_SSL_REDIRECT", False)
# Prometheus scrapes /metrics over the compose network in plain HTTP, with its token already in
# that first request: a redirect would protect nothing and fail the scrape.
SECURE_REDIRECT_EXEMPT = [r"^metrics$"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    # Swagger UI's files served by the plane itself: no CDN, for operators on isolated networks.
    "drf_spectacular_sidecar",
    "fleet",
]

MIDDLEWARE = [
    # First: forwarding headers from a peer that is not a trusted proxy are dropped.
    "fleet.middleware.UntrustedForwardingMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (console, admin, Swagger UI) from the plane's own process, with DEBUG off too.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Audit rows written while serving a request carry its source address.
    "fleet.middleware.AuditSourceMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"
ASGI_APPLICATION = "controlplane.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, Any]:
    url = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'edgefleet.sqlite3'}")
    try:
        return dict(dj_database_url.parse(url, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Repeated sign-in failures, to the admin or the token endpoint, lock out (fleet.auth).
AUTHENTICATION_BACKENDS = ["fleet.auth.RateLimitedModelBackend"]
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, minimum=1)
LOGIN_FAILURE_LIMIT_PER_ADDRESS = env_int("LOGIN_FAILURE_LIMIT_PER_ADDRESS", 50, minimum=1)
LOGIN_FAILURE_WINDOW = env_int("LOGIN_FAILURE_WINDOW", 15 * 60, minimum=1)

# Reverse proxies in front of the plane (CIDR ranges, comma-separated). From these peers
# only, the client's address is read from X-Forwarded-For (the rightmost hop that is not
# one of them), for sign-in limits, throttles and the audit log. Empty: REMOTE_ADDR.
try:
    TRUSTED_PROXIES = parse_networks(env_list("TRUSTED_PROXIES", []))
except ValueError as exc:
    raise ImproperlyConfigured(f"TRUSTED_PROXIES: {exc}") from None
# A proxy's word that the request came over HTTPS, believed from TRUSTED_PROXIES only
# (fleet.middleware.UntrustedForwardingMiddleware drops it from any other peer).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS and TRUSTED_PROXIES else None

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# The console's pages send a signed-out operator to the admin's sign-in page.
LOGIN_URL = "admin:login"
# WhiteNoise serves the apps' static files where they are, so no collectstatic step is needed
# (gunicorn in compose, make cluster and the demo alike). STATIC_ROOT only for a web server in
# front that serves collectstatic's copy instead.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = env_str("STATIC_ROOT", "") or None

# --- Artifacts -----------------------------------------------------------------
ARTIFACT_ROOT = Path(env_str("ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
ARTIFACT_MAX_BYTES = env_int("ARTIFACT_MAX_BYTES", 2 * 1024**3, minimum=1)
# The (average, for content-defined) chunk size; 256 KiB by measurement (docs/benchmarks.md).
ARTIFACT_CHUNK_SIZE = env_int("ARTIFACT_CHUNK_SIZE", 256 * 1024, minimum=1024)
# "cdc": cut where the content says, so a new version shares chunks with the last (delta
# transfer); "fixed": every ARTIFACT_CHUNK_SIZE bytes. Applies to files stored from now on.
ARTIFACT_CHUNKING = env_choice("ARTIFACT_CHUNKING", "cdc", ("cdc", "fixed"))
# A worker checking an uploaded file holds it this many seconds; past that it is presumed
# dead, and a redelivered task or the sweep (fleet.retry_stale_artifacts) checks the file
# again. Longer than the slowest check (a 2 GiB model: about a minute), or the work is done twice.
ARTIFACT_PROCESSING_LEASE = env_int("ARTIFACT_PROCESSING_LEASE", 900, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
# The most an evaluation set (.npz) may take once loaded; checked from its headers before
# loading, at upload and wherever the plane reads one (fleet/lib/evaluation.py).
EVALUATION_SET_MAX_BYTES = env_int("EVALUATION_SET_MAX_BYTES", 128 * 1024 * 1024, minimum=1024)
# The Ed25519 key that signs every published artifact's manifest: base64 of its 32 raw
# bytes (`manage.py generate_signing_key`). Unset with DEBUG on, the plane makes one of its
# own in SIGNING_KEY_DEV_FILE on first use; unset with DEBUG off, publishing is refused.
SIGNING_KEY = env_secret("SIGNING_KEY", "")
SIGNING_KEY_DEV_FILE = VAR_DIR / "signing.key" if DEBUG else None
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# --- MQTT ------------------------------------------------------------------------
MQTT_URL = env_str("MQTT_URL", "mqtt://127.0.0.1:1883")
try:
    MQTT_BROKER = parse_broker_url(MQTT_URL)
except WireError as exc:
    raise ImproperlyConfigured(f"MQTT_URL: {exc}") from None
# The plane's broker password, kept out of MQTT_URL: MQTT_PASSWORD or MQTT_PASSWORD_FILE.
MQTT_PASSWORD = env_secret("MQTT_PASSWORD", "")
if MQTT_PASSWORD:
    MQTT_BROKER = msgspec.structs.replace(MQTT_BROKER, password=MQTT_PASSWORD)
MQTT_CLIENT_PREFIX = env_str("MQTT_CLIENT_PREFIX", "edgefleet-plane")
# A bridge with a name keeps its broker client id and a persistent session of this many seconds:
# restarted under the same name (a supervisor's job) it is handed what it had not stored (docs/scaling.md).
BRIDGE_NAME = env_str("BRIDGE_NAME", "")
BRIDGE_SESSION_EXPIRY = env_int("BRIDGE_SESSION_EXPIRY", 3600, minimum=0)
BRIDGE_QUEUE_SIZE = env_int("BRIDGE_QUEUE_SIZE", 20_000, minimum=1)
BRIDGE_BATCH_SIZE = env_int("BRIDGE_BATCH_SIZE", 500, minimum=1)
BRIDGE_FLUSH_SECONDS = env_int("BRIDGE_FLUSH_MS", 200, minimum=1) / 1000
# What one device may be sent of model files (fleet/bridge/chunks.py, docs/security.md): bytes a
# second with a burst, and bytes the broker has not yet acknowledged; and all devices together.
BRIDGE_CHUNK_DEVICE_RATE = env_int("BRIDGE_CHUNK_DEVICE_RATE", 256 * 2**20, minimum=1)
BRIDGE_CHUNK_DEVICE_BURST = env_int("BRIDGE_CHUNK_DEVICE_BURST", 64 * 2**20, minimum=4 * 2**20)
BRIDGE_CHUNK_DEVICE_INFLIGHT = env_int("BRIDGE_CHUNK_DEVICE_INFLIGHT", 32 * 2**20, minimum=4 * 2**20)
BRIDGE_CHUNK_TOTAL_INFLIGHT = env_int("BRIDGE_CHUNK_TOTAL_INFLIGHT", 256 * 2**20, minimum=4 * 2**20)
# Prometheus (docs/metrics.md): each bridge and each Celery worker serves /metrics on its own
# port (0: off), bound to METRICS_ADDR; the plane's /metrics/ answers loopback clients, or any
# client that sends "Authorization: Bearer <METRICS_TOKEN>" once METRICS_TOKEN is set.
BRIDGE_METRICS_PORT = env_int("BRIDGE_METRICS_PORT", 0, minimum=0)
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0, minimum=0)
METRICS_ADDR = env_str("METRICS_ADDR", "127.0.0.1")
METRICS_TOKEN = env_secret("METRICS_TOKEN", "")
# Heartbeats (fleet/services/heartbeat_retention.py): raw rows are kept this many days (on
# PostgreSQL, whole daily partitions are dropped), hourly rollups this many; partitions are
# made this many days ahead.
HEARTBEAT_RETENTION_DAYS = env_int("HEARTBEAT_RETENTION_DAYS", 14, minimum=1)
HEARTBEAT_ROLLUP_RETENTION_DAYS = env_int("HEARTBEAT_ROLLUP_RETENTION_DAYS", 400, minimum=1)
HEARTBEAT_PARTITIONS_AHEAD = env_int("HEARTBEAT_PARTITIONS_AHEAD", 3, minimum=1)
# A device is offline once no heartbeat came for this many seconds.
DEVICE_OFFLINE_AFTER = env_int("DEVICE_OFFLINE_AFTER", 90, minimum=1)
# Rollout events (rolled back, completed, held past its deadline) are POSTed as JSON to these.
ROLLOUT_WEBHOOKS = env_urls("ROLLOUT_WEBHOOKS")

# --- Cache ---------------------------------------------------------------------------
# Sign-in failure counters live here (fleet/auth.py). Per process unless CACHE_URL names
# a Redis database: with several web workers, set it so they count together.
CACHE_URL = env_str("CACHE_URL", "")
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
    if CACHE_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}

# --- Celery ----------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
# Without Redis, tasks run inline in the process that enqueues them.
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A task taken by a worker that dies before finishing it (acks_late) goes back to the queue after
# this many seconds, for another worker: shorter recovers sooner, but a task running longer than
# this is handed out a second time (every task is idempotent; docs/scaling.md).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=1)}
CELERY_BEAT_SCHEDULE = {
    "mark-offline-devices": {"task": "fleet.mark_offline_devices", "schedule": 30.0},
    "reconcile-deployments": {"task": "fleet.reconcile_deployments", "schedule": 60.0},
    # Soak times end and rate-limited stages fill up without any device report.
    "evaluate-rollouts": {"task": "fleet.evaluate_rollouts", "schedule": 15.0},
    # Uploads whose worker died, or whose task was lost, are checked again.
    "retry-stale-artifacts": {"task": "fleet.retry_stale_artifacts", "schedule": 300.0},
    # Hourly, once the bridges have stored the hour that ended: rollups, partitions, retention.
    "maintain-heartbeats": {"task": "fleet.maintain_heartbeats", "schedule": crontab(minute=5)},
}

# --- API -------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # DRF's Token header, the key stored hashed (fleet.auth.stored_token_key).
        "fleet.api.authentication.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # DjangoModelPermissions, but reads need the view permission too.
    "DEFAULT_PERMISSION_CLASSES": ["fleet.api.permissions.ModelPermissions"],
    "EXCEPTION_HANDLER": "fleet.api.exceptions.exception_handler",
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "fleet.api.pagination.Pages",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Views without a user login (enrollment) are throttled per client address.
    "DEFAULT_THROTTLE_RATES": {"enroll": env_str("ENROLL_RATE", "30/min")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Edgefleet control plane API",
    "DESCRIPTION": "Model registry, devices and deployments for fleets of edge devices.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Versions and artifacts both have a "status"; name each enum after its choices.
    "ENUM_NAME_OVERRIDES": {
        "VersionStatus": "fleet.choices.VersionStatus",
        "ArtifactStatus": "fleet.choices.ArtifactStatus",
        "DeploymentState": "fleet.choices.DeploymentState",
        "RolloutState": "fleet.choices.RolloutState",
        "EnrollmentState": "fleet.choices.EnrollmentState",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

MQTT_CA_FILE = env_str("MQTT_CA_FILE", "")
MQTT_CERT_FILE = env_str("MQTT_CERT_FILE", "")
MQTT_KEY_FILE = env_str("MQTT_KEY_FILE", "")

# --- Enrollment and broker credentials (docs/security.md) ---------------------------
# Refuse hellos and reports from devices that are not accepted (pending, rejected,
# decommissioned or never enrolled). Off by default so the demo runs on an anonymous broker
# with nothing else installed; docker/compose.yaml turns it on (docs/security.md).
ENROLLMENT_REQUIRED = env_bool("ENROLLMENT_REQUIRED", False)
# How far a device's signed timestamp may be from the plane's clock, in seconds.
ENROLLMENT_CLOCK_SKEW = env_int("ENROLLMENT_CLOCK_SKEW", 300, minimum=1)
# The broker runs the dynamic-security plugin: the plane creates and removes device logins.
MQTT_DYNSEC = env_bool("MQTT_DYNSEC", False)
# The broker's admin login, e.g. mqtt://admin@broker:1883; its password from MQTT_ADMIN_PASSWORD(_FILE).
MQTT_ADMIN_URL = env_str("MQTT_ADMIN_URL", "")
MQTT_ADMIN_PASSWORD = env_secret("MQTT_ADMIN_PASSWORD", "")
# The broker address handed to devices with their credentials; MQTT_URL's host and port by default.
MQTT_DEVICE_URL = env_str("MQTT_DEVICE_URL", "")
if MQTT_DYNSEC and not MQTT_ADMIN_URL:
    raise ImproperlyConfigured("MQTT_DYNSEC=true needs MQTT_ADMIN_URL (and MQTT_ADMIN_PASSWORD or its _FILE)")
