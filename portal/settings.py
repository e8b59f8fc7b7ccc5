"""Settings: everything from environment variables, with defaults that work on one machine.

`.env.example` documents every variable. `make run` copies it to `.env` (git-ignored), which
these settings read under the environment (portal.env.load_env_file: a variable already set
wins); the tests set ENV_FILE empty, so they see only what they set.
"""

import os
from decimal import Decimal
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from portal.env import (
    database_from_url,
    env_bool,
    env_decimal,
    env_int,
    env_list,
    env_str,
    load_env_file,
    mqtt_from_url,
    redis_url_checked,
)

BASE_DIR = Path(__file__).resolve().parent.parent
load_env_file(BASE_DIR)

DEBUG = env_bool("DEBUG", False)
_DEV_SECRET = "dev-insecure-secret-key-only-for-DEBUG-True"
SECRET_KEY = env_str("SECRET_KEY", _DEV_SECRET if DEBUG else None)
if not DEBUG and (SECRET_KEY == _DEV_SECRET or len(SECRET_KEY) < 32):
    raise ImproperlyConfigured("SECRET_KEY must be a random string of 32+ characters when DEBUG=False")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "http://127.0.0.1:8000,http://localhost:8000")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "portal",
    "meters",
    "payments",
    "mqtt_worker",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

DATABASE_URL = env_str("DATABASE_URL", "sqlite:///var/db.sqlite3")
DATABASES = {"default": database_from_url("DATABASE_URL", DATABASE_URL, BASE_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = redis_url_checked("REDIS_URL", env_str("REDIS_URL", "redis://127.0.0.1:6379/0"))
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "smartmeter"),
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "capacity": 1000, "expiry": 30},
    }
}

# Celery: the broker is Redis; results are not kept (tasks write their outcome to the database).
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TIMEZONE = "UTC"
# Periodic work (celery beat). Each task is a thin wrapper around a service and is safe to run
# twice at once: the rows it works on are claimed atomically.
CELERY_BEAT_SCHEDULE = {
    # Outbox sweep: commands whose after-commit hint was lost (a crash) are published here.
    "publish-pending-commands": {
        "task": "mqtt_worker.tasks.publish_pending_commands", "schedule": 5.0, "options": {"expires": 10},
    },
    # M-Pesa: STK pushes still pending after ~90 s are queried with back-off.
    "reconcile-pending-payments": {"task": "payments.tasks.reconcile_pending_payments", "schedule": 30.0},
    # Callbacks stored but left unprocessed (a crash, a database error) are processed again.
    "sweep-callbacks": {"task": "payments.tasks.sweep_callbacks", "schedule": 30.0, "options": {"expires": 60}},
    # Firebase mirror: meters whose state changed are written to the Realtime Database.
    "firebase-mirror-sync": {"task": "meters.tasks.firebase_mirror_sync", "schedule": 2.0, "options": {"expires": 10}},
}

MQTT_URL = env_str("MQTT_URL", "mqtt://127.0.0.1:1883")
MQTT = mqtt_from_url("MQTT_URL", MQTT_URL)
MQTT_CA_FILE = env_str("MQTT_CA_FILE", " ").strip() or None
MQTT_CLIENT_ID = env_str("MQTT_CLIENT_ID", "ingest-0")
# Empty: one worker with plain subscriptions (survives broker restarts on Mosquitto 2.0.11).
# A name: N workers split the load through `$share/<name>/…` (see README, "Scaling out").
MQTT_SHARED_GROUP = os.environ.get("MQTT_SHARED_GROUP", "").strip()
MQTT_SESSION_EXPIRY_S = env_int("MQTT_SESSION_EXPIRY_S", 86400, minimum=0)
MQTT_BATCH_SIZE = env_int("MQTT_BATCH_SIZE", 1000, minimum=1)
MQTT_BATCH_WAIT_MS = env_int("MQTT_BATCH_WAIT_MS", 10, minimum=0)
# Batches in the database at once (each on its own connection); acks stay in arrival order.
MQTT_PIPELINE_DEPTH = env_int("MQTT_PIPELINE_DEPTH", 2, minimum=1)
MQTT_PUBLISHER_CLIENT_ID = env_str("MQTT_PUBLISHER_CLIENT_ID", "publisher")

# M-Pesa Daraja. Defaults are Safaricom's public sandbox test values; production sets its own.
MPESA_BASE_URL = env_str("MPESA_BASE_URL", "https://sandbox.safaricom.co.ke").rstrip("/")
MPESA_CONSUMER_KEY = env_str("MPESA_CONSUMER_KEY", "dev-consumer-key")
MPESA_CONSUMER_SECRET = env_str("MPESA_CONSUMER_SECRET", "dev-consumer-secret")
MPESA_SHORTCODE = env_str("MPESA_SHORTCODE", "174379")
MPESA_PASSKEY = env_str(
    "MPESA_PASSKEY", "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
)
MPESA_TRANSACTION_TYPE = env_str("MPESA_TRANSACTION_TYPE", "paybill")
if MPESA_TRANSACTION_TYPE not in ("paybill", "till"):
    raise ImproperlyConfigured("MPESA_TRANSACTION_TYPE must be paybill or till")
MPESA_TILL_NUMBER = env_str("MPESA_TILL_NUMBER", " ").strip()
MPESA_C2B_VERSION = env_str("MPESA_C2B_VERSION", "v1")
if MPESA_C2B_VERSION not in ("v1", "v2"):
    raise ImproperlyConfigured("MPESA_C2B_VERSION must be v1 or v2")
MPESA_CALLBACK_BASE_URL = env_str("MPESA_CALLBACK_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
MPESA_CALLBACK_SECRET = env_str("MPESA_CALLBACK_SECRET", "dev-callback-secret" if DEBUG else None)
MPESA_CALLBACK_ALLOWED_IPS = env_list("MPESA_CALLBACK_ALLOWED_IPS", "")
# How many reverse proxies stand in front of the web process; the client address is taken
# from that hop of X-Forwarded-For, never from its leftmost (client-controlled) entry.
TRUSTED_PROXY_HOPS = env_int("TRUSTED_PROXY_HOPS", 0, minimum=0)
MPESA_MIN_AMOUNT_KES = env_int("MPESA_MIN_AMOUNT_KES", 1, minimum=1)
MPESA_MAX_AMOUNT_KES = env_int("MPESA_MAX_AMOUNT_KES", 250000, minimum=1)
MPESA_HTTP_TIMEOUT_S = env_int("MPESA_HTTP_TIMEOUT_S", 10, minimum=1)
# Money by several routes (payments.services): how far apart a push and the callback or C2B
# confirmation of its money may be; how long a push whose answer was lost stays `checking`
# before staff see it; how old a stored callback left unprocessed must be for the sweeper.
MPESA_MATCH_WINDOW_S = env_int("MPESA_MATCH_WINDOW_S", 24 * 3600, minimum=60)
MPESA_CHECKING_REVIEW_AFTER_S = env_int("MPESA_CHECKING_REVIEW_AFTER_S", 1800, minimum=60)
MPESA_CALLBACK_SWEEP_AFTER_S = env_int("MPESA_CALLBACK_SWEEP_AFTER_S", 60, minimum=5)

FIREBASE_CREDENTIALS = env_str("FIREBASE_CREDENTIALS", " ").strip() or None
FIREBASE_DATABASE_URL = env_str("FIREBASE_DATABASE_URL", " ").strip() or None

# --- Firmware updates over the air (meters.ota; README "Firmware updates (OTA)") ---
# The release key's public half: the 65-byte uncompressed P-256 point in hex, as
# `python firmware/tools/sign_firmware.py keygen` prints it. Empty: no release can be checked,
# so none can be uploaded or rolled out.
OTA_PUBLIC_KEY = env_str("OTA_PUBLIC_KEY", " ").strip()
# Where meters fetch images: this site's public base URL (the web process serves
# /firmware/images/…). Meters accept https only, with a certificate the broker's CA signed;
# OTA_ALLOW_HTTP=True lets rollouts send http:// URLs (the simulator and tests only).
OTA_IMAGE_BASE_URL = env_str("OTA_IMAGE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
if not OTA_IMAGE_BASE_URL.startswith(("https://", "http://")):
    raise ImproperlyConfigured("OTA_IMAGE_BASE_URL must start with https:// (or http:// with OTA_ALLOW_HTTP)")
OTA_ALLOW_HTTP = env_bool("OTA_ALLOW_HTTP", False)
# A rollout pauses itself when more than this percent of the meters sent the update fail to
# come back (failed, rolled back, or silent for OTA_SILENCE_TIMEOUT_S after the command or
# their last progress); staff then resume or abort. Defaults for new rollouts.
OTA_PAUSE_FAILURE_PERCENT = env_int("OTA_PAUSE_FAILURE_PERCENT", 20, minimum=0)
if OTA_PAUSE_FAILURE_PERCENT > 100:
    raise ImproperlyConfigured("OTA_PAUSE_FAILURE_PERCENT is a percentage (0-100)")
OTA_SILENCE_TIMEOUT_S = env_int("OTA_SILENCE_TIMEOUT_S", 1800, minimum=60)
OTA_MAX_IN_FLIGHT = env_int("OTA_MAX_IN_FLIGHT", 50, minimum=1)
# How often celery beat checks running rollouts (timeouts, the pause rule, the next meters).
OTA_CHECK_INTERVAL_S = env_int("OTA_CHECK_INTERVAL_S", 30, minimum=1)
CELERY_BEAT_SCHEDULE["ota-rollouts-tick"] = {
    "task": "meters.tasks.ota_rollouts_tick", "schedule": float(OTA_CHECK_INTERVAL_S),
    "options": {"expires": max(OTA_CHECK_INTERVAL_S * 2, 10)},
}
# --- end of firmware updates ---

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    # Token first: an unauthenticated API request gets 401 with WWW-Authenticate, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "portal.schema.ApiAutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.pagination.ApiPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "portal.exceptions.api_exception_handler",
    "COERCE_DECIMAL_TO_STRING": True,
    # Per-account and per-address sign-in attempts, and STK pushes started per user.
    "DEFAULT_THROTTLE_RATES": {
        "auth": env_str("API_THROTTLE_AUTH", "10/minute"),
        "auth_ip": env_str("API_THROTTLE_AUTH_IP", "60/minute"),
        "payments": env_str("API_THROTTLE_PAYMENTS", "10/minute"),
    },
    # The client address for throttling is taken from the trusted proxy hop, never from a
    # client-supplied X-Forwarded-For (DRF's default when this is None).
    "NUM_PROXIES": TRUSTED_PROXY_HOPS,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Prepaid smart-meter API",
    "DESCRIPTION": (
        "REST API for the mobile app and the utility's tools. Sign in with POST /api/v1/auth/token/ and send "
        "`Authorization: Bearer <token>`. Decimal values are strings (kWh with 6 places, KES with 2), times are "
        "ISO 8601 UTC. Every error has the form "
        '`{"error": {"code": "...", "message": "...", "field": "...", "details": {...}}}` (see Error).'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
}

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}


# ---- Production (issue 12): broker accounts and TLS, HTTPS, staff roles, secrets, sign-in lockout,
# metrics, alerts and notifications. One block; README "Going to production" walks through it.

# MQTT. The command publisher has a broker user of its own (default: the worker's URL); the broker's
# account files are written by `manage.py mqtt_auth` into MQTT_AUTH_DIR, and the broker named by
# MQTT_BROKER_PID_FILE is sent SIGHUP to re-read them.
MQTT_PUBLISHER_URL = env_str("MQTT_PUBLISHER_URL", MQTT_URL)
MQTT_PUBLISHER = mqtt_from_url("MQTT_PUBLISHER_URL", MQTT_PUBLISHER_URL)
if MQTT_CA_FILE and not os.path.isabs(MQTT_CA_FILE):
    MQTT_CA_FILE = str(BASE_DIR / MQTT_CA_FILE)
MQTT_AUTH_DIR = BASE_DIR / env_str("MQTT_AUTH_DIR", "var/mosquitto/auth")
MQTT_BROKER_PID_FILE = BASE_DIR / env_str("MQTT_BROKER_PID_FILE", "var/mosquitto/mosquitto.pid")
MQTT_AUTH_POLL_S = env_int("MQTT_AUTH_POLL_S", 2, minimum=1)

# The web side behind TLS (a reverse proxy terminates it): secure cookies, HSTS, redirects to
# https. On by default whenever DEBUG=False; HTTPS_ONLY=False only for a plain-HTTP test setup.
HTTPS_ONLY = env_bool("HTTPS_ONLY", not DEBUG)
if HTTPS_ONLY:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # the load balancer's plain-HTTP health check
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
# Only a proxy we trust (TRUSTED_PROXY_HOPS ≥ 1) may tell us the request came over https.
if TRUSTED_PROXY_HOPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"

# The M-Pesa callback secret is all that stands between a forger and a C2B credit.
if not DEBUG and len(MPESA_CALLBACK_SECRET) < 32:
    raise ImproperlyConfigured(
        "MPESA_CALLBACK_SECRET must be a random string of 32+ characters when DEBUG=False "
        "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    )

# Secrets never reach a log: the console handler and django.request mask them (portal.logsafety).
LOGGING["filters"] = {"mask_secrets": {"()": "portal.logsafety.MaskSecrets"}}
LOGGING["handlers"]["console"]["filters"] = ["mask_secrets"]
LOGGING["loggers"]["django.request"] = {"filters": ["mask_secrets"]}

# Sign-in lockout for the portal, the admin and the API's token sign-in (django-axes): per
# account and, separately, per client address, read from the trusted proxy hop.
INSTALLED_APPS += ["axes", "notifications"]
MIDDLEWARE += ["axes.middleware.AxesMiddleware"]
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, minimum=1)
AXES_COOLOFF_TIME = env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1) / 60  # hours
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "portal.security.axes_client_ip"
AXES_VERBOSE = False

# Staff roles are Django groups (portal migration 0002_staff_roles); adjustments of more than
# this many kWh either way wait for a second staff member (meters.adjustments).
ADJUSTMENT_APPROVAL_KWH = env_decimal("ADJUSTMENT_APPROVAL_KWH", "50", minimum=Decimal("0"))

# /metrics (Prometheus): staff session, `Authorization: Bearer METRICS_TOKEN`, or an address in
# METRICS_ALLOWED_IPS. Processes on one host share PROMETHEUS_MULTIPROC_DIR (prometheus-client's).
METRICS_TOKEN = env_str("METRICS_TOKEN", " ").strip()
METRICS_ALLOWED_IPS = env_list("METRICS_ALLOWED_IPS", "")
MIDDLEWARE.insert(0, "portal.metrics.RequestMetricsMiddleware")

# Alerts and notifications (notifications app, Celery beat).
METER_REPORT_INTERVAL_S = env_int("METER_REPORT_INTERVAL_S", 30, minimum=1)
LOW_BALANCE_KWH = env_decimal("LOW_BALANCE_KWH", "5", minimum=Decimal("0"))
COMMAND_ACK_ALERT_S = env_int("COMMAND_ACK_ALERT_S", 300, minimum=1)
PAYMENT_CHECKING_ALERT_S = env_int("PAYMENT_CHECKING_ALERT_S", 600, minimum=1)
DEAD_LETTER_SPIKE_COUNT = env_int("DEAD_LETTER_SPIKE_COUNT", 50, minimum=1)
DEAD_LETTER_SPIKE_WINDOW_S = env_int("DEAD_LETTER_SPIKE_WINDOW_S", 300, minimum=1)
NOTIFY_MAX_ATTEMPTS = env_int("NOTIFY_MAX_ATTEMPTS", 3, minimum=1)
STAFF_ALERT_EMAILS = env_list("STAFF_ALERT_EMAILS", "")
# SMS through Africa's Talking (its `africastalking` SDK). AFRICASTALKING_BASE_URL empty: the SDK's
# own endpoints; `make run` and the tests: the stand-in `python -m devtools.fake_africastalking`.
AFRICASTALKING_USERNAME = env_str("AFRICASTALKING_USERNAME", "sandbox")
AFRICASTALKING_API_KEY = env_str("AFRICASTALKING_API_KEY", " ").strip()
AFRICASTALKING_SENDER_ID = env_str("AFRICASTALKING_SENDER_ID", " ").strip()
AFRICASTALKING_BASE_URL = env_str("AFRICASTALKING_BASE_URL", " ").strip().rstrip("/")
# The portal's e-mail settings (issue 11) may set the backend above; without them, the console.
globals().setdefault("EMAIL_BACKEND", env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend"))
CELERY_BEAT_SCHEDULE.update({
    # Offline meters, low balances, credited payments, stuck commands, payments to review,
    # dead-letter spikes, register resets: each alert fires once (notification keys).
    "alerts": {"task": "notifications.tasks.run_alerts", "schedule": 60.0, "options": {"expires": 120}},
    # Sends what is due, retries what failed (e-mail and SMS).
    "deliver-notifications": {"task": "notifications.tasks.deliver_notifications", "schedule": 10.0,
                              "options": {"expires": 30}},
})
