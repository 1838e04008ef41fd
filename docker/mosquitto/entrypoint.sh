#!/bin/sh
# The broker's entrypoint in docker/compose.yaml: on first start, create the
# dynamic-security plugin's file with the broker's admin login, then hand over to
# the image's own entrypoint. The admin password comes from a secret file, never
# from the repository; the plane's own login and the roles are made afterwards by
# `manage.py setup_broker`, over the broker's control topic.
set -eu

# Where secure.conf's plugin_opt_config_file points; settable for the test suite.
dynsec_file="${DYNSEC_FILE:-/mosquitto/data/dynamic-security.json}"
password_file="${MQTT_ADMIN_PASSWORD_FILE:-/run/secrets/mqtt_admin_password}"

if [ ! -f "$dynsec_file" ]; then
    if [ ! -s "$password_file" ]; then
        echo "entrypoint: $password_file is missing or empty; see docker/.env.example" >&2
        exit 1
    fi
    mosquitto_ctrl dynsec init "$dynsec_file" "${MQTT_ADMIN_USER:-admin}" "$(cat "$password_file")" >/dev/null
    echo "entrypoint: created $dynsec_file with the admin login ${MQTT_ADMIN_USER:-admin}"
fi

# The eclipse-mosquitto image's entrypoint gives /mosquitto to the mosquitto user.
if [ -x /docker-entrypoint.sh ]; then
    exec /docker-entrypoint.sh "$@"
fi
exec "$@"
